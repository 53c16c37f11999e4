"""`glm.load` and the object it returns: model + tokenizer + the public API."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from glm import chat as _chat
from glm.generation import (
    Batch,
    Decoder,
    GenerationError,
    SamplingConfig,
    full_mask,
    generate_stream,
    make_generator,
)
from glm.loader import DEFAULT_MODEL, build_model, resolve, save_checkpoint
from glm.model import GLM
from glm.tokenizer import Tokenizer

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None) picks CUDA when present; asking for CUDA without it is an error that says what to do."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA was requested but no CUDA GPU is available to torch: use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{dev} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps"):
        raise ValueError(f"unsupported device {device!r}: use cpu or cuda")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, n_params: int = 0) -> torch.dtype:
    """'auto' (or None): float16 on CUDA, as the release. On a CPU float32 for small models (exact); for ChatGLM-6B
    itself, whose float32 weights (25 GB) do not fit a laptop, the half type this CPU runs fastest, found by a short
    probe (bfloat16 unless float16 decodes faster without prefilling slower; see glm.kernels.cpu_float)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.float16
        if n_params < 1_000_000_000:
            return torch.float32
        from glm.kernels.cpu_float import announce_cpu_half_dtype

        return announce_cpu_half_dtype()
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, float16, bfloat16 or auto")
    return DTYPES[dtype]


def _as_prompts(input_ids) -> tuple[list[list[int]], bool]:
    """(prompts, batched): a list of ids is one prompt, a list of lists a batch."""
    batched = bool(input_ids) and isinstance(input_ids[0], (list, tuple))
    return ([list(p) for p in input_ids] if batched else [list(input_ids)]), batched


def _n_params(folder: Path) -> int:
    """Parameter count implied by a checkpoint's config.json (0 if it cannot be read)."""
    from glm.config import GLMConfig

    try:
        c = GLMConfig.from_json(folder / "config.json")
    except Exception:  # noqa: BLE001 - build_model reports a bad config properly
        return 0
    h, f = c.hidden_size, c.inner_hidden_size
    return c.num_layers * (4 * h * h + 2 * h * f) + c.vocab_size * h * (1 if c.tie_word_embeddings else 2)


class ChatGLM:
    """A loaded model with its tokenizer. Create it with `glm.load`."""

    def __init__(self, model: GLM, tokenizer: Tokenizer | None, path: Path | None = None, load_seconds: float = 0.0,
                 compile: bool = False):
        self.model = model
        # Caches (and the compiled decode step) live here and are reused from one call to the next.
        self.decoder = Decoder(model, compile=compile)
        self.tokenizer = tokenizer
        self.path = path
        self.load_seconds = load_seconds

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def __repr__(self) -> str:
        q = self.config.quantization_bit
        return f"ChatGLM({self.path}, device={self.device}, dtype={self.dtype}, quant={f'int{q}' if q else None})"

    def memory_bytes(self) -> int:
        """Bytes held by the weights (parameters and buffers)."""
        seen, total = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    @torch.inference_mode()
    def logits(self, input_ids: list[int]) -> torch.Tensor:
        """float32 logits (len, vocab) of one uncached forward over a prompt."""
        batch = Batch.from_prompts([list(input_ids)], self.config, self.device)
        mask = full_mask(batch, prefix=self.config.pre_seq_len or 0)
        return self.model(batch.ids, batch.position_ids, mask)[0]

    def stream_generate(
        self, input_ids, max_new_tokens: int | None = None, *, max_length: int | None = None, do_sample: bool = False,
        stop_at_eos: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 50,
        repetition_penalty: float = 1.0, seed: int | None = None, generator: torch.Generator | None = None,
        logits_hook=None,
    ) -> Iterator[torch.Tensor]:
        """Yield the new ids (B,) step by step; `input_ids` a list of ids or a list of lists (left-padded batch)."""
        prompts, _ = _as_prompts(input_ids)
        sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                                  repetition_penalty=repetition_penalty)
        gen = generator if generator is not None else make_generator(seed, self.device)
        return generate_stream(self.model, prompts, max_new_tokens=max_new_tokens, max_length=max_length,
                               sampling=sampling, stop_at_eos=stop_at_eos, generator=gen, logits_hook=logits_hook,
                               decoder=self.decoder)

    def generate(self, input_ids, max_new_tokens: int | None = None, **kwargs):
        """New ids after the prompt: a list for one prompt, a list of lists for a batch.

        With `stop_at_eos` (default) a row ends with its `<eop>`; nothing after it is returned.
        """
        _, batched = _as_prompts(input_ids)
        rows: list[list[int]] | None = None
        eos = self.config.eos_token_id
        stop = kwargs.get("stop_at_eos", True)
        for step in self.stream_generate(input_ids, max_new_tokens, **kwargs):
            ids = step.tolist()
            if rows is None:
                rows = [[] for _ in ids]
                done = [False] * len(ids)
            for r, t in enumerate(ids):
                if not done[r]:
                    rows[r].append(t)
                    done[r] = stop and t == eos
        rows = rows or [[]]
        return rows if batched else rows[0]

    def chat(self, query: str, history=None, max_length: int = 2048, do_sample: bool = True, top_p: float = 0.7,
             temperature: float = 0.95, **sampling):
        """The official `chat`: returns `(reply, history)`. Defaults are the official ones (top_k 50 included)."""
        return _chat.chat(self, query, history, max_length=max_length, do_sample=do_sample, top_p=top_p,
                          temperature=temperature, **sampling)

    def stream_chat(self, query: str, history=None, max_length: int = 2048, do_sample: bool = True,
                    top_p: float = 0.7, temperature: float = 0.95, **sampling):
        """The official `stream_chat`: yields `(reply so far, history)` after every token."""
        return _chat.stream_chat(self, query, history, max_length=max_length, do_sample=do_sample, top_p=top_p,
                                 temperature=temperature, **sampling)

    def save(self, folder: str | os.PathLike) -> Path:
        """Save weights (safetensors), config and tokenizer so that `glm.load(folder)` restores this model."""
        return save_checkpoint(self.model, folder, tokenizer_folder=self.path)


def load(
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = "float32",
    quant: int | None = None,
    group_size: int | None = None,
    quantize_lm_head: bool = False,
    ptuning: str | os.PathLike | None = None,
    compile: bool = False,
    progress: bool = False,
) -> ChatGLM:
    """Load ChatGLM-6B from a Hub repo id or a local folder.

    Args:
        model: repo id (e.g. "THUDM/chatglm-6b", "THUDM/chatglm-6b-int4") or a checkpoint folder.
        revision: Hub revision (branch, tag or commit).
        device: "cpu", "cuda", "cuda:N" or "auto".
        dtype: "float32", "float16", "bfloat16" or "auto" (float16 on CUDA; on a CPU float32, or bfloat16 for
            models over 1B parameters).
        quant: 8 or 4 to quantize the block linears while loading (weight-only); None keeps the stored weights.
        group_size: None for per-output-channel scales (the official scheme), or 32/64/128 (int4 only).
        quantize_lm_head: quantize lm_head too (1 GB in fp16).
        ptuning: a P-Tuning v2 checkpoint folder (its config.json and prefix encoder) to apply on top.
        compile: decode through `torch.compile(mode="reduce-overhead")`: CUDA graphs on a GPU (fixed shapes).
        progress: show progress bars.
    """
    if quant not in (None, 0, 4, 8):
        raise ValueError(f"quant must be 4 or 8, got {quant!r}")
    if group_size is not None:
        if group_size not in (32, 64, 128):
            raise ValueError(f"group_size must be 32, 64 or 128, got {group_size!r}")
        if quant != 4:
            raise ValueError("group_size applies to quant=4 only")
    dev = resolve_device(device)
    resolve_dtype(dtype, dev)  # reject a bad name before any download
    t0 = time.perf_counter()
    folder = resolve(model, revision)
    dt = resolve_dtype(dtype, dev, _n_params(folder))
    net = build_model(folder, device=dev, dtype=dt, quant=quant or None, group_size=group_size,
                      quantize_lm_head=quantize_lm_head, ptuning=Path(ptuning) if ptuning else None, progress=progress)
    tok_file = folder / "ice_text.model"
    # A bare weights folder (like the tiny test models) has no tokenizer: ids in, ids out still work.
    tokenizer = Tokenizer.from_config(tok_file, net.config) if tok_file.is_file() else None
    return ChatGLM(net, tokenizer, folder, time.perf_counter() - t0, compile=compile)


__all__ = ["ChatGLM", "GenerationError", "load", "resolve_device", "resolve_dtype"]
