"""Generating for every row of an evaluation or test file, batched through the scheduler (`ChatGLM.submit`), with
the official evaluation settings of `ptuning/main.py`."""

from __future__ import annotations

import queue
import time
from collections.abc import Sequence

from glm.finetune.prefix import net_of
from glm.generation import CHAT_DEFAULTS, GenerationConfig

# `ptuning/main.py` passes these to `trainer.evaluate` and `trainer.predict` (max_length: prompt plus prediction).
OFFICIAL_GENERATION = CHAT_DEFAULTS.replace(max_length=512, do_sample=True, top_p=0.7, temperature=0.95)


def generate_rows(
    m,
    prompts: Sequence[list[int]],
    config: GenerationConfig = OFFICIAL_GENERATION,
    *,
    seed: int | None = 42,
    max_batch: int = 16,
    progress: bool = False,
    desc: str = "predicting",
) -> tuple[list[str], float]:
    """The decoded, stripped prediction of every prompt, and the seconds it took.

    Every prompt is submitted at once to a scheduler of `max_batch` cache rows over `m`'s model (a fresh one, so
    that a prefix or adapter that has just trained is what generates), which decodes up to `max_batch` rows per
    step and admits the next row as soon as one finishes. Row i samples with seed `seed + i`: a prediction does not
    depend on the batch it ran in. Dropout is off while generating.
    """
    net = net_of(m)
    modes = {mod: mod.training for mod in net.modules()}
    net.eval()
    # A scheduler of its own: the one of `m` (if any) holds caches filled with the prefix as it was at load.
    engine = type(m)(net, m.tokenizer, getattr(m, "path", None), max_batch=max_batch)
    done: queue.SimpleQueue = queue.SimpleQueue()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=desc, unit="row", dynamic_ncols=True)
    reqs = []
    t0 = time.perf_counter()
    try:
        for i, p in enumerate(prompts):
            c = config if seed is None else config.replace(seed=seed + i)
            reqs.append(engine.submit(p, c, sink=lambda ev, i=i: None if isinstance(ev, int) else done.put(ev)))
        for _ in prompts:
            ev = done.get()
            if isinstance(ev, BaseException):
                raise ev
            if bar is not None:
                bar.update(1)
    finally:
        for r in reqs:
            r.cancel()
        if bar is not None:
            bar.close()
        for mod, was in modes.items():
            mod.training = was
    seconds = time.perf_counter() - t0
    return [m.tokenizer.decode(r.result.tokens).strip() for r in reqs], seconds


__all__ = ["OFFICIAL_GENERATION", "generate_rows"]
