"""One model on N ranks: loading every rank's shard, rank 0's Runner mirrored on the others, and their loop.

Everything above the model runs once, on rank 0: the scheduler, the sampler, the tokenizer, the servers. The
natural seam is the Runner (glm.generation.runner), which maps token ids to logits per cache row: rank 0's
`MirroredRunner` sends each of its calls (ensure, prefill, fork, decode, release, logits) to the other ranks before
making it, and each of them makes the same call on a Runner of its own over its shard, with the KV caches of its
heads. All ranks so run the same forwards and meet at the same collectives; the logits are gathered on every rank
and only rank 0 samples.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from glm.config import GLMConfig
from glm.errors import ParallelError, one_line
from glm.generation.runner import Runner
from glm.loader import build_model, checkpoint_files
from glm.parallel.shard import ShardPlan, check_size
from glm.parallel.world import World, join


@dataclass
class Spec:
    """What every rank loads: rank 0's settings, resolved. `asked`: the options as given, which ranks started by
    torchrun (each with its own command line) must agree on."""

    folder: str
    dtype: str
    quant: int | None = None
    group_size: int | None = None
    quantize_lm_head: bool = False
    ptuning: str | None = None
    cpu_kernel: str = "exact"
    asked: dict = field(default_factory=dict)

    def fingerprint(self) -> dict:
        """What must be the same on every rank: the checkpoint's files (config and sizes), the prefix's, the options."""
        return {"checkpoint": _digest(Path(self.folder)),
                "prefix": _digest(Path(self.ptuning)) if self.ptuning else None, "options": self.asked}


def _digest(folder: Path) -> str:
    """The checkpoint folder's name and a digest of its config.json and its weight files' names and sizes."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in checkpoint_files(folder):
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    return f"{folder.name} ({h.hexdigest()[:12]})"


def load_parallel(size: int, device: torch.device, spec: Spec) -> tuple:
    """This process's part of a model over `size` ranks. On rank 0: (its shard, a factory of the mirrored Runner for
    `glm.generation.Scheduler`, the world). On the other ranks (under torchrun) it serves rank 0 until it closes,
    then raises SystemExit(0)."""
    cfg = GLMConfig.from_json(Path(spec.folder) / "config.json")
    check_size(cfg, size, spec.quant, spec.group_size)
    if spec.cpu_kernel != "exact" and not (spec.quant or cfg.quantization_bit):
        raise ValueError("cpu_kernel='fast' applies to quantized models: add quant=4 or 8, or load an -int4/-int8 "
                         "checkpoint")
    world = join(size, device)
    if world.rank != 0:
        serve(world, own=spec)
        raise SystemExit(0)
    mid = world.new_model_id()
    model, err = world.call("load", mid, (spec,), lambda s: _load_here(world, s, None))
    if model is None:
        if world.size > 1 and not world.procs and mid == 1:
            world.failed = str(err)  # under torchrun the other ranks fail their first load too, and exit
        raise err
    return model, lambda *a: MirroredRunner(world, mid, *a), world


def _load_here(world: World, spec: Spec, own: Spec | None):
    """Every rank, together: compare what each was asked to load, then load its shard. Returns (the shard, None),
    or (None, the error every rank agrees on); rank 0 gets its own loading error as it was raised."""
    mine = own or spec
    try:
        fp = mine.fingerprint()
    except (OSError, ParallelError, ValueError, RuntimeError) as e:  # a missing folder or file: reported below
        fp = {"error": f"{type(e).__name__}: {e}"}
    fps = world.exchange(fp)
    why = _disagreement(fps)
    if why:
        return None, ParallelError(why)
    model = error = None
    try:
        model = build_shard(Spec(**{**asdict(spec), "folder": mine.folder, "ptuning": mine.ptuning}), world)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory on one rank: every rank must hear of it, in step
        error = e
    errors = world.exchange(None if error is None else f"{type(error).__name__}: {one_line(str(error))}")
    bad = next((r for r, e in enumerate(errors) if e is not None), None)
    if bad is None:
        return model, None
    if world.rank == 0 and bad == 0:
        return None, error
    return None, ParallelError(f"tensor-parallel rank {bad} could not load its shard: {errors[bad][:300]}")


def _disagreement(fps: list[dict]) -> str | None:
    for r, fp in enumerate(fps):
        if "error" in fp:
            return f"tensor-parallel rank {r} cannot read the checkpoint: {one_line(fp['error'])[:300]}"
    for r, fp in enumerate(fps[1:], 1):
        for key in ("checkpoint", "prefix", "options"):
            if fp[key] != fps[0][key]:
                return (f"ranks disagree on the {'P-Tuning prefix' if key == 'prefix' else key}: rank {r} has "
                        f"{fp[key]} and rank 0 {fps[0][key]}; start every rank with the same --model and options")
    return None


def build_shard(spec: Spec, world: World):
    """This rank's shard of the model, read shard by shard from the checkpoint, its collectives connected."""
    folder = Path(spec.folder)
    plan = ShardPlan(GLMConfig.from_json(folder / "config.json"), world.rank, world.size)
    net = build_model(folder, device=world.device, dtype=getattr(torch, spec.dtype), quant=spec.quant,
                      group_size=spec.group_size, quantize_lm_head=spec.quantize_lm_head,
                      ptuning=Path(spec.ptuning) if spec.ptuning else None, shard=plan)
    if spec.cpu_kernel != "exact":
        from glm.quant import set_cpu_kernel

        set_cpu_kernel(net, spec.cpu_kernel)
    return plan.finish(net, world)


class MirroredRunner(Runner):
    """Rank 0's Runner: each call goes to the other ranks first (see the module docstring)."""

    def __init__(self, world: World, mid: int, model, max_batch: int, max_context: int, compile: bool = False):
        if compile:
            raise ParallelError("tensor parallelism does not compile the decode step: drop compile")
        world.call("runner", mid, (max_batch, max_context), lambda *a: None)
        super().__init__(model, max_batch, max_context)
        self.world, self.mid = world, mid

    def __del__(self):
        world = getattr(self, "world", None)
        if world is not None:
            world.forget(self.mid)  # the other ranks drop the model with rank 0's next call

    def ensure(self, need: int) -> None:
        return self.world.call("ensure", self.mid, (need,), super().ensure)

    def release(self, i: int) -> None:
        if self.world.failed is not None or self.world.closed:
            return super().release(i)  # the scheduler frees the rows of failed requests: nothing to keep in step
        return self.world.call("release", self.mid, (i,), super().release)

    def prefill(self, rows, prompts, adapters=None):
        if adapters is not None and any(adapters):  # engine.add_adapter refuses them: the ranks hold no adapters
            raise ParallelError("tensor parallelism serves no adapters")
        return self.world.call("prefill", self.mid, (rows, prompts), super().prefill)

    def fork(self, src, dsts) -> None:
        return self.world.call("fork", self.mid, (src, dsts), super().fork)

    def decode(self, rows, tokens):
        return self.world.call("decode", self.mid, (rows, tokens), super().decode)

    def logits(self, prompt, adapter: int = 0):
        if adapter:
            raise ParallelError("tensor parallelism serves no adapters")
        return self.world.call("logits", self.mid, (prompt,), super().logits)


def serve(world: World, own: Spec | None = None) -> None:
    """A rank other than 0: make rank 0's calls until it closes. `own`: what this rank was asked to load, under
    torchrun (the first model must be the same as rank 0's)."""
    models: dict = {}
    with torch.inference_mode():
        while True:
            op, mid, args, gone = world.receive()
            for g in gone:
                models.pop(g, None)
            if op == "close":
                break
            if op == "ping":
                continue
            if op == "load":
                model, err = _load_here(world, args[0], own)
                if model is None and own is not None:
                    raise err  # under torchrun: this rank's own command fails as rank 0's does
                own = None
                if model is not None:
                    models[mid] = model
            elif op == "runner":
                models[mid] = Runner(models[mid], *args)
            else:
                getattr(models[mid], op)(*args)
    world.close()


__all__ = ["MirroredRunner", "Spec", "build_shard", "load_parallel", "serve"]
