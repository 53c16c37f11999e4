"""Full-parameter fine-tuning (`glm-finetune --full`, the official `ds_train_finetune.sh`): every weight trains.

The weights are float32 master copies sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`) over the ranks: each
rank holds 1/N of the weights, of their gradients and of AdamW's two moments. Forward and backward run in
`compute_dtype` (bfloat16 on a GPU: FSDP gathers each block's weights in it just before use), and the gradients are
reduced in float32. One process runs the same way, in a process group of one. The output is a whole checkpoint in
the official layout (`model.safetensors` under the release's names, its config.json and tokenizer), which
`glm.load` and the official code read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from glm.errors import DataError
from glm.finetune.distributed import Ranks
from glm.finetune.part import Part
from glm.finetune.prefix import net_of
from glm.loader import save_checkpoint
from glm.lora import lora_modules

# The official code files of a Hub checkpoint: the official Trainer copies them next to the weights it saves, so
# that `AutoModel.from_pretrained(folder, trust_remote_code=True)` finds them.
CODE_FILES = ("configuration_chatglm.py", "modeling_chatglm.py", "quantization.py", "tokenization_chatglm.py")


def check_full(cfg) -> None:
    """Refuse what full fine-tuning cannot train: packed integer weights, a prefix, a LoRA adapter."""
    if cfg.quantization_bit:
        raise DataError("--full trains the float weights: drop --quant, or start from a float checkpoint "
                        "(an -int4/-int8 one has none)")
    if cfg.pre_seq_len:
        raise DataError("--full trains the model itself, with no P-Tuning prefix: drop --ptuning / --pre-seq-len "
                        "(or drop --full to continue a prefix)")


def shard(net, ranks: Ranks, compute_dtype: torch.dtype) -> None:
    """FSDP2 over `net`, in place: one unit a block, the embeddings, final layernorm and lm_head in the root unit
    (the head may be tied to the embedding). Each unit becomes float32 just before it is sharded, so the host holds
    one extra block, not a float32 copy of the model; the shards go to `ranks.device`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ranks.device.type, (ranks.world,))
    mp = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                              reduce_dtype=torch.float32)
    net.requires_grad_(True)
    for block in net.layers:
        fully_shard(block.float(), mesh=mesh, mp_policy=mp)
    fully_shard(net.float(), mesh=mesh, mp_policy=mp)  # also moves the buffers (rotary frequencies) there


def full_part(m, ranks: Ranks, compute_dtype: torch.dtype = torch.float32) -> Part:
    """Every weight of `m` as the trainable part, sharded over `ranks` (a group of at least one must be up).

    Saving gathers the whole float32 model, and the optimizer's whole state, on rank 0 (on its CPU), keyed by
    parameter name: a checkpoint that any number of ranks resumes.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    net = net_of(m)
    check_full(net.config)
    if lora_modules(net):
        raise DataError("--full trains the model itself: drop --lora (merge an adapter first with glm.save)")
    shard(net, ranks, compute_dtype)
    gather = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole on rank 0, nothing on the others
    base = getattr(m, "path", None)

    def save(folder: Path) -> None:
        state = get_model_state_dict(net, options=gather)
        if ranks.main:
            save_official(net, state, folder, base)

    def load_optimizer_state(opt, state: dict) -> None:
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(net, opt, state if ranks.main else {}, options=opts)

    return Part("every weight", list(net.parameters()), net, [net], save,
                lambda opt: get_optimizer_state_dict(net, opt, options=gather), load_optimizer_state, ranks)


def save_official(net, state: dict, folder: Path, base: Path | None) -> None:
    """A whole checkpoint as the official Trainer leaves one: weights under the release's names, the base's
    config.json (its `auto_map` included) with the saved dtype, the tokenizer and the official code files."""
    out = save_checkpoint(net, folder, tokenizer_folder=base, state=state)
    cfg_file = Path(base) / "config.json" if base is not None else None
    if cfg_file is not None and cfg_file.is_file():
        d = json.loads(cfg_file.read_text(encoding="utf-8"))
        d["torch_dtype"] = json.loads((out / "config.json").read_text(encoding="utf-8"))["torch_dtype"]
        (out / "config.json").write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for name in CODE_FILES:
            src = Path(base) / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)


__all__ = ["CODE_FILES", "check_full", "full_part", "save_official", "shard"]
