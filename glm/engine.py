"""`glm.load` and the object it returns: model + tokenizer + the public API."""

from __future__ import annotations

import functools
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from glm import chat as _chat
from glm.errors import GenerationError
from glm.generation import CHAT_DEFAULTS, Batch, GenerationConfig, Request, Scheduler, check_ids
from glm.loader import DEFAULT_MODEL, build_model, resolve, save_checkpoint
from glm.model import GLM
from glm.tokenizer import StopMatcher, Tokenizer

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None) picks CUDA when present; a device this machine lacks is a ValueError saying what to do."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(device)[:40]!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA was requested but no CUDA GPU is available to torch: use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{dev} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("MPS (Apple GPU) was requested but torch has no MPS device here: use --device cpu")
        if dev.index not in (None, 0):
            raise ValueError(f"{dev} does not exist: use --device mps")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {str(device)[:40]!r}: use cpu, cuda, cuda:N, mps or auto")
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


def _as_prompts(input_ids) -> tuple[list, bool]:
    """(prompts, batched): a list of ids (or a 1-D tensor) is one prompt, a list of lists (or a 2-D tensor) a batch."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            return list(input_ids), True
        return [input_ids], False
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple, torch.Tensor)):
        return list(input_ids), True
    return [input_ids], False


def _n_params(folder: Path) -> int:
    """Parameter count implied by a checkpoint's config.json (0 if it cannot be read)."""
    from glm.config import ConfigError, GLMConfig

    try:
        c = GLMConfig.from_json(folder / "config.json")
    except ConfigError:  # build_model reports it
        return 0
    h, f = c.hidden_size, c.inner_hidden_size
    return c.num_layers * (4 * h * h + 2 * h * f) + c.vocab_size * h * (1 if c.tie_word_embeddings else 2)


class ChatGLM:
    """A loaded model with its tokenizer and its scheduler (the KV cache rows). Create it with `glm.load`."""

    tensor_parallel: int | None = None  # the ranks this model is split over (glm.load's tensor_parallel)

    def __init__(self, model: GLM, tokenizer: Tokenizer | None, path: Path | None = None, load_seconds: float = 0.0,
                 compile: bool = False, max_batch: int = 1, max_context: int | None = None,
                 max_waiting: int | None = None, runner=None):
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.load_seconds = load_seconds
        # Every generation of this model, from every caller and thread, shares these cache rows; `submit` is the
        # only way in. `runner`: glm.parallel's mirrored Runner under tensor parallelism.
        self.scheduler = Scheduler(model, max_batch=max_batch, max_context=max_context, compile=compile,
                                   max_waiting=max_waiting, **({"runner": runner} if runner else {}))
        self._logprobs_lock = threading.Lock()  # prompt_logprobs: one (len, vocab) logits tensor at a time
        self._vocab = None  # the vocabulary as the grammar engine reads it, built at the first json_schema
        self._vocab_lock = threading.Lock()

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def adapters(self) -> list[str]:
        """The names of the adapters added with `add_adapter`, in order."""
        return list(self.scheduler.runner.adapters.names)

    def add_adapter(self, name: str, folder: str | os.PathLike) -> None:
        """Serve the adapter in `folder`, a LoRA adapter as PEFT saves it or a P-Tuning v2 prefix as the official
        scripts save it, as `name`: a request picks it with `adapter=name` (generate, chat, submit, ...), and the
        rows of one decode batch may each use another adapter, or none. The base weights are not touched (the
        LoRA update stays unmerged, also on a quantized base). Raises CheckpointError for a folder that does not
        fit this model, ValueError for a bad or taken name; nothing is changed then.
        """
        if not isinstance(name, str) or not name.strip() or len(name) > 256:
            raise ValueError(f"an adapter name must be a non-empty string of up to 256 characters, got {name!r:.60}")
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} was already added: give each adapter its own name")
        runner = self.scheduler.runner
        if self.tensor_parallel:
            raise ValueError("adapters cannot be added to a model split over tensor-parallel ranks: load it without "
                             "tensor_parallel")
        if runner.compile:
            raise ValueError("adapters cannot be added to a model loaded with compile=True (its compiled decode "
                             "step has no per-row adapters): load it without compile")
        from glm.loader.adapters import read_adapter

        adapter = read_adapter(self.model, folder)  # every check first: a bad folder changes nothing
        with self.scheduler.between_steps():
            runner.adapters.add(name, adapter)

    @property
    def max_context(self) -> int:
        """Tokens of prompt plus reply that one request may take (the context limit)."""
        return self.scheduler.max_context

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
    def logits(self, input_ids, *, adapter: str | None = None) -> torch.Tensor:
        """float32 logits (len, vocab) of one uncached forward over a prompt (with `adapter`: that adapter's)."""
        ids = check_ids(input_ids, self.config)
        if len(ids) > self.max_context:
            raise GenerationError(f"the prompt is {len(ids)} tokens, over the context limit of {self.max_context}")
        runner = self.scheduler.runner  # under tensor parallelism every rank runs this forward
        return runner.logits(ids, runner.adapters.id(adapter))

    @torch.inference_mode()
    def prompt_logprobs(self, input_ids, k: int = 0, chunk: int = 64, *, adapter: str | None = None
                        ) -> list[tuple[int, float | None, list]]:
        """(id, log-probability given the ids before it, its top-k [(id, logprob)]) of each prompt token, the
        first one's (None, []): one uncached forward without the last position's logits, log-softmaxed `chunk`
        positions at a time, never as a second (len, vocab) tensor. One call at a time holds its logits."""
        ids = check_ids(input_ids, self.config)
        if len(ids) > self.max_context:
            raise GenerationError(f"the prompt is {len(ids)} tokens, over the context limit of {self.max_context}")
        out = [(ids[0], None, [])]
        with self._logprobs_lock:
            if adapter is not None or self.tensor_parallel:  # through the runner: an adapter, or every rank
                logits = self.logits(ids, adapter=adapter)[:-1].float()
            else:
                batch = Batch.from_prompts([ids], self.config, self.device)
                at = torch.arange(len(ids), device=self.device)[None] < len(ids) - 1  # (1, T): all but the last
                logits = self.model(batch.ids, batch.position_ids,
                                    batch.mask(prefix=self.config.pre_seq_len or 0), logits_at=at)  # (T - 1, V)
            nxt = torch.tensor(ids[1:], device=self.device)[:, None]
            for a in range(0, len(ids) - 1, chunk):
                rows = logits[a : a + chunk]
                lse = rows.logsumexp(-1, keepdim=True)
                got = (rows.gather(1, nxt[a : a + chunk]) - lse)[:, 0].tolist()
                top = [[]] * len(got)
                if k:
                    v, i = rows.topk(k)
                    top = [list(zip(a_, b_)) for a_, b_ in zip(i.tolist(), (v - lse).tolist())]
                out += [(t, lp, tp) for t, lp, tp in zip(ids[a + 1 : a + 1 + chunk], got, top)]
        return out

    def submit(self, input_ids, config: GenerationConfig, *, logits_hook=None, sink=None, n: int | None = None,
               postprocess: Callable[[str], str] | None = None, adapter: str | None = None) -> Request | list[Request]:
        """Queue one prompt: the one way into generation, for every caller. Iterate the returned Request for its
        new ids (or pass `sink`, called with each event from the scheduler's thread); `.result` once it has ended.

        With `n`, a list of n choices that share one prefill and then decode as rows of their own (choice j
        samples with seed `seed + j`); `sink` is then called as `sink(j, event)`. Stop strings are matched on
        `postprocess(text)` when given (a chat reply's `process_response`: what the reader gets). `adapter`: the
        name of an adapter added with `add_adapter` (None: the base model). With `config.json_schema` the reply is
        JSON valid against it (see glm.generation.grammar).
        Raises GenerationError for a bad prompt, setting or adapter, and QueueFull when `max_waiting` requests wait.
        """
        aid = self.scheduler.runner.adapters.id(adapter)
        stop_match = grammar = None
        if isinstance(config, GenerationConfig) and config.stop and self.tokenizer is not None:
            stop_match = functools.partial(StopMatcher, self.tokenizer, config.stop, postprocess)
        if isinstance(config, GenerationConfig) and config.json_schema is not None and self.tokenizer is not None:
            grammar = self._grammar(config.json_schema)
        return self.scheduler.submit(input_ids, config, logits_hook=logits_hook, sink=sink, stop_match=stop_match,
                                     n=n, adapter=aid, grammar=grammar)

    def _grammar(self, schema: dict):
        """A factory of matchers of `schema` (GenerationError if it cannot be enforced); the vocabulary's bytes
        are handed to llguidance once per model, at the first constrained request."""
        from glm.generation.grammar import Matcher, Vocabulary
        from glm.tokenizer import REWRITTEN

        with self._vocab_lock:
            if self._vocab is None:
                tok = self.tokenizer
                self._vocab = Vocabulary(tok.token_bytes(self.config.vocab_size), tok.encode_bytes, tok.eos_id,
                                         REWRITTEN)
        return functools.partial(Matcher, self._vocab, self._vocab.compile_json(schema))

    def generate_stream(self, input_ids, max_new_tokens: int | None = None, *, logits_hook=None,
                        adapter: str | None = None, **settings) -> Iterator[int]:
        """Yield the new ids of one prompt as they come. Settings: those of `GenerationConfig`."""
        req = self.submit(input_ids, GenerationConfig.from_settings(max_new_tokens=max_new_tokens, **settings),
                          logits_hook=logits_hook, adapter=adapter)
        try:
            yield from req
        finally:
            req.cancel()  # a caller that stops early frees the row at once
        _warn_nan([req])

    def generate(self, input_ids, max_new_tokens: int | None = None, *, logits_hook=None, adapter: str | None = None,
                 **settings):
        """New ids after the prompt: a list for one prompt, a list of lists for a batch (each row as if alone).

        With `stop_at_eos` (default) a row ends with its `<eop>`, included. Settings: those of
        `GenerationConfig` (max_length, do_sample, temperature, top_p, top_k, repetition_penalty, seed, stop).
        `adapter`: the name of an adapter added with `add_adapter` (None: the base model).
        """
        prompts, batched = _as_prompts(input_ids)
        config = GenerationConfig.from_settings(max_new_tokens=max_new_tokens, **settings)
        reqs: list[Request] = []
        try:
            for p in prompts:
                reqs.append(self.submit(p, config, logits_hook=logits_hook, adapter=adapter))
            rows = [list(r) for r in reqs]
        finally:
            for r in reqs:
                r.cancel()
        _warn_nan(reqs)
        return rows if batched else rows[0]

    def chat(self, query: str, history=None, *, adapter: str | None = None, **settings):
        """The official `chat`: returns `(reply, history)`. Settings: those of `GenerationConfig`; the defaults
        are the official ones (`glm.generation.CHAT_DEFAULTS`: max_length 2048, do_sample, top_p 0.7, temperature
        0.95, top_k 50). `adapter`: the name of an adapter added with `add_adapter`."""
        return _chat.chat(self, query, history, CHAT_DEFAULTS.replace(**settings), adapter=adapter)

    def stream_chat(self, query: str, history=None, *, final: bool = False, adapter: str | None = None,
                    **settings):
        """The official `stream_chat`: yields `(reply so far, history)` after every token (with `final=True`, the
        last value is exactly `chat`'s reply). Settings and `adapter` as `chat`."""
        return _chat.stream_chat(self, query, history, CHAT_DEFAULTS.replace(**settings), final=final,
                                 adapter=adapter)

    def save(self, folder: str | os.PathLike, merge_lora: bool = False) -> Path:
        """Save weights (safetensors), config and tokenizer so that `glm.load(folder)` restores this model.

        A model with a LoRA adapter is saved with `merge_lora=True`: the update is folded into the float weights
        first (in place: this model then holds the merged weights, with the same outputs).
        """
        from glm.lora import lora_modules
        from glm.lora import merge_lora as merge

        if self.tensor_parallel:
            raise ValueError("this model is split over tensor-parallel ranks and this process holds only its shard: "
                             "save the model loaded without tensor_parallel")
        if self.adapters:
            raise ValueError(f"this model serves adapters added with add_adapter ({', '.join(self.adapters)}): save "
                             "a model loaded without them")
        if lora_modules(self.model):
            if not merge_lora:
                raise ValueError("this model has a LoRA adapter: save it with merge_lora=True (the official layout "
                                 "has no place for unmerged factors)")
            merge(self.model)
        return save_checkpoint(self.model, folder, tokenizer_folder=self.path)


def _warn_nan(reqs: list[Request]) -> None:
    if any(r.result is not None and r.result.nan for r in reqs):
        warnings.warn(_chat.NAN_WARNING, RuntimeWarning, stacklevel=3)


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
    lora: str | os.PathLike | None = None,
    merge_lora: bool = False,
    compile: bool = False,
    max_batch: int = 1,
    max_context: int | None = None,
    max_waiting: int | None = None,
    cpu_kernel: str = "exact",
    progress: bool = False,
    tensor_parallel: int | None = None,
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
        quantize_lm_head: quantize lm_head too (1 GB in fp16), with `quant` or on a checkpoint stored quantized.
        ptuning: a P-Tuning v2 checkpoint folder (its config.json and prefix encoder) to apply on top.
        lora: a LoRA adapter folder as PEFT saves it, applied unmerged (on a quantized base nothing is requantized).
        merge_lora: fold the adapter into the float weights at load (float bases only).
        compile: decode through `torch.compile(mode="reduce-overhead")`: CUDA graphs on a GPU (fixed shapes).
        max_batch: cache rows, i.e. requests decoded together (each row holds up to max_context tokens).
        max_context: tokens of prompt plus reply per request (default: the config's max_sequence_length, 2048);
            longer requests are refused, and generation stops there.
        max_waiting: requests that may wait for a free row; past that `submit` raises QueueFull (None: no limit).
        cpu_kernel: quantized models on a CPU: "exact" (float activations, the parity path) or "fast" (int8
            activations per block of 32: faster, above all for batches; see docs/quantization.md).
        progress: show progress bars.
        tensor_parallel: split the model over N ranks (Megatron-style, torch.distributed: NCCL on GPUs, one per
            rank, gloo on CPUs). This process is rank 0 and starts the other N-1 itself; under `torchrun` it is
            one of the N started, and on the other ranks this call serves rank 0 and then exits the process.
            See docs/parallel.md.
    """
    if quant not in (None, 0, 4, 8):
        raise ValueError(f"quant must be 4 or 8, got {quant!r}")
    if group_size is not None:
        if group_size not in (32, 64, 128):
            raise ValueError(f"group_size must be 32, 64 or 128, got {group_size!r}")
        if quant != 4:
            raise ValueError("group_size applies to quant=4 only")
    from glm.config import CPU_KERNELS  # a leaf module: a float load never imports glm.quant

    if cpu_kernel not in CPU_KERNELS:  # before any download (set_cpu_kernel checks the same, after loading)
        raise ValueError(f"cpu_kernel must be one of {', '.join(CPU_KERNELS)}, got {cpu_kernel!r}")
    if merge_lora and lora is None:
        raise ValueError("merge_lora=True needs lora=DIR")
    if tensor_parallel is not None:
        _check_parallel(tensor_parallel, device, compile, lora)
    dev = resolve_device(device)
    resolve_dtype(dtype, dev)  # reject a bad name before any download
    t0 = time.perf_counter()
    folder = resolve(model, revision)
    dt = resolve_dtype(dtype, dev, _n_params(folder))
    if tensor_parallel is not None:
        asked = dict(dtype=str(dtype), quant=quant or None, group_size=group_size, quantize_lm_head=quantize_lm_head,
                     ptuning=ptuning is not None, cpu_kernel=cpu_kernel)  # the options, as every rank was given them
        return _load_parallel(tensor_parallel, dev, folder, dt, ptuning, t0, asked, max_batch=max_batch,
                              max_context=max_context, max_waiting=max_waiting)
    net = build_model(folder, device=dev, dtype=dt, quant=quant or None, group_size=group_size,
                      quantize_lm_head=quantize_lm_head, ptuning=Path(ptuning) if ptuning else None, progress=progress)
    if cpu_kernel != "exact":
        if not net.config.quantization_bit:
            raise ValueError("cpu_kernel='fast' applies to quantized models: add quant=4 or 8, or load an "
                             "-int4/-int8 checkpoint")
        from glm.quant import set_cpu_kernel

        set_cpu_kernel(net, cpu_kernel)
    if lora is not None:
        from glm.loader.lora import apply_lora
        from glm.lora import merge_lora as merge

        apply_lora(net, lora)
        if merge_lora:
            merge(net)
    tok_file = folder / "ice_text.model"
    # A bare weights folder (like the tiny test models) has no tokenizer: ids in, ids out still work.
    tokenizer = Tokenizer.from_config(tok_file, net.config) if tok_file.is_file() else None
    return ChatGLM(net, tokenizer, folder, time.perf_counter() - t0, compile=compile, max_batch=max_batch,
                   max_context=max_context, max_waiting=max_waiting)


def _check_parallel(n, device, compile: bool, lora) -> None:
    """The tensor_parallel argument and what it cannot be combined with, refused in one line before any work."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"tensor_parallel must be an integer >= 1 (the number of ranks), got {n!r}")
    if compile:
        raise ValueError("tensor_parallel does not work with compile: drop one of them")
    if lora is not None:
        raise ValueError("tensor_parallel does not take a LoRA adapter: merge it first (glm.save(glm.load(base, "
                         "lora=DIR, merge_lora=True), OUT)) and load OUT")
    if device is not None and ":" in str(device):
        raise ValueError(f"tensor_parallel puts rank r on cuda:r (LOCAL_RANK under torchrun), so it takes a device "
                         f"kind without an index: use 'cuda' rather than {str(device)[:20]!r}")


def _load_parallel(n: int, dev: torch.device, folder: Path, dt: torch.dtype, ptuning, t0: float, asked: dict,
                   **rows) -> ChatGLM:
    from glm.parallel.mirror import Spec, load_parallel

    spec = Spec(str(folder.resolve()), str(dt).removeprefix("torch."), quant=asked["quant"],
                group_size=asked["group_size"], quantize_lm_head=asked["quantize_lm_head"],
                ptuning=str(Path(ptuning).resolve()) if ptuning else None, cpu_kernel=asked["cpu_kernel"], asked=asked)
    net, runner, _ = load_parallel(n, dev, spec)
    tok_file = folder / "ice_text.model"
    tokenizer = Tokenizer.from_config(tok_file, net.config) if tok_file.is_file() else None
    m = ChatGLM(net, tokenizer, folder, time.perf_counter() - t0, runner=runner, **rows)
    m.tensor_parallel = n
    return m


__all__ = ["ChatGLM", "GenerationError", "load", "resolve_device", "resolve_dtype"]
