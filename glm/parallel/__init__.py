"""Tensor parallelism on torch.distributed: one model split over N ranks (`glm.load(..., tensor_parallel=N)`).

    shard   which part of every tensor a rank holds (Megatron-style), read as the checkpoint loads
    world   the ranks: started by rank 0 or by torchrun, their process groups, the watchdog and timeouts
    mirror  loading on every rank, rank 0's Runner mirrored on the others, and their loop
    worker  the entry point of a rank that rank 0 started

Nothing here is imported by `import glm`; `glm.load` imports it when asked for tensor parallelism.
"""
