"""What the entry points share: model and sampling options, loading with one-line errors, and error text.

`glm-chat`, `glm-web` and `glm-serve` import this module and never each other.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

# torch (through glm.engine) is imported only once the options have parsed, so that `--help` and option errors
# answer at once instead of after a second or two of imports.

DEFAULT_MODEL = "THUDM/chatglm-6b"  # glm.loader.DEFAULT_MODEL, repeated so that --help needs no torch (tested)

History = list[tuple[str, str]]


class CLIError(Exception):
    """A problem to report as one line (`glm-chat: error: ...`), never as a traceback."""


# ---------------------------------------------------------------------------------------------------- options


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line: the usage block argparse prints first buries the actual message."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind, s: str, what: str):
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
    return v


def max_length_type(s: str) -> int:
    v = _number(int, s, "a positive integer")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of tokens, got {v}")
    return v


def _sampling_type(field: str, kind, what: str):
    """An argparse type for one SamplingConfig field: parsed here, judged by SamplingConfig's own rules."""

    def parse(s: str):
        from glm.generation import GenerationError, SamplingConfig

        v = _number(kind, s, what)
        try:
            SamplingConfig(**{field: v})
        except GenerationError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{field} ")) from None
        return v

    parse.__name__ = field  # argparse names the type in some messages
    return parse


top_p_type = _sampling_type("top_p", float, "a number in (0, 1]")
temperature_type = _sampling_type("temperature", float, "a number >= 0")
top_k_type = _sampling_type("top_k", int, "an integer >= 0")
repetition_penalty_type = _sampling_type("repetition_penalty", float, "a number > 0")


def seed_type(s: str) -> int | None:
    if s.lower() in ("none", "off", ""):
        return None
    return _number(int, s, "an integer")


def delay_type(s: str) -> int:
    v = _number(int, s, "an integer >= 0")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Which checkpoint to load and how: shared by glm-chat and glm-web."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, metavar="REPO_OR_FOLDER",
                   help=f"Hugging Face repo id or a local checkpoint folder (default: {DEFAULT_MODEL})")
    g.add_argument("--revision", default=None, metavar="REV",
                   help="Hub branch, tag or commit (default: the main branch)")
    g.add_argument("--quant", type=int, choices=(4, 8), default=None,
                   help="quantize the weights to int4 or int8 while loading (int4: about 4 GB for ChatGLM-6B)")
    g.add_argument("--group-size", type=int, choices=(32, 64, 128), default=None,
                   help="int4 only: one scale per GROUP_SIZE inputs instead of one per output row")
    g.add_argument("--quant-lm-head", action="store_true",
                   help="with --quant: quantize the output layer too (1 GB in fp16; faster decoding on a CPU)")
    g.add_argument("--ptuning", default=None, metavar="DIR",
                   help="apply a P-Tuning v2 prefix (a glm-finetune or official ptuning output folder)")
    g.add_argument("--compile", action="store_true",
                   help="decode through torch.compile with CUDA graphs (fastest on a GPU; the first reply "
                        "waits for compilation)")
    g.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="auto: float16 on CUDA; on CPU bfloat16 for ChatGLM-6B, float32 for small models "
                        "(default: auto)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """How replies are generated: shared by glm-chat and glm-web (where the first three are slider defaults)."""
    g = parser.add_argument_group("generation")
    g.add_argument("--max-length", type=max_length_type, default=2048, metavar="N",
                   help="tokens of prompt (history included) plus reply, per turn, as chat(max_length=...) "
                        "(default: 2048)")
    g.add_argument("--top-p", type=top_p_type, default=0.7, metavar="P",
                   help="nucleus sampling threshold (default: 0.7)")
    g.add_argument("--temperature", type=temperature_type, default=0.95, metavar="T",
                   help="sampling temperature; 0 is greedy (default: 0.95)")
    g.add_argument("--top-k", type=top_k_type, default=50, metavar="K",
                   help="sample among the K likeliest tokens; 0: all (default: 50, as the official chat)")
    g.add_argument("--repetition-penalty", type=repetition_penalty_type, default=1.0, metavar="R",
                   help="> 1 discourages repeating tokens (default: 1.0, none)")
    g.add_argument("--greedy", action="store_true", help="always pick the likeliest token (deterministic)")
    g.add_argument("--seed", type=seed_type, default=None, metavar="N",
                   help="seed every reply's sampling (reproducible)")
    # Test hook, hidden from --help: sleeps between streamed tokens (the replies themselves are unchanged) so
    # that a test can press Ctrl+C or Stop in the middle of a reply of the tiny, very fast test model.
    g.add_argument("--delay-ms", type=delay_type, default=0, help=argparse.SUPPRESS)


def check_model_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.group_size is not None and args.quant != 4:
        parser.error("--group-size applies to --quant 4 only")



# ---------------------------------------------------------------------------------------------------- loading


def model_name(model: str) -> str:
    p = Path(os.path.expanduser(model))
    return p.resolve().name if p.is_dir() else model


def _human_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def is_oom(e: BaseException) -> bool:
    """Out of memory, whether CUDA's (torch.OutOfMemoryError), Python's, or the CPU allocator's RuntimeError."""
    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg)


def oom_message(doing: str, args) -> str:
    hint = "--quant 4" if not getattr(args, "quant", None) else "--quant 4 and a smaller --max-length"
    return f"out of memory {doing} on {getattr(args, 'device', '?')}: try {hint}, or another --device"


def summary(m, name: str) -> str:
    """The one line printed after loading: what runs where, and how big it is."""
    q = m.config.quantization_bit
    gs = getattr(m.config, "quantization_group_size", None)
    quant = f"int{q}" + (f" (group size {gs})" if gs else "") if q else "no quant"
    dtype = str(m.dtype).removeprefix("torch.")
    return (f"glm: {name} on {m.device}, {dtype}, {quant}, {_human_bytes(m.memory_bytes())} weights, "
            f"loaded in {m.load_seconds:.1f} s")


def load_from_args(args: argparse.Namespace, log=None):
    """`glm.load` with the parsed model options; prints the summary line to `log` (stderr).

    Every expected failure (unknown model, offline without a cached copy, no CUDA, bad checkpoint, out of
    memory) becomes a CLIError with a one-line message.
    """
    log = log if log is not None else sys.stderr
    import torch  # noqa: F401 - import errors here are real installation problems, not the user's

    import glm

    # huggingface_hub logs a warning for every retry when the Hub cannot be reached; the one-line error below
    # says it all. (Read when huggingface_hub is imported; its download progress bars are not logging.)
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    try:
        m = glm.load(args.model, revision=args.revision, device=args.device, dtype=args.dtype, quant=args.quant,
                     group_size=args.group_size, quantize_lm_head=args.quant_lm_head and bool(args.quant),
                     ptuning=getattr(args, "ptuning", None), compile=args.compile, progress=isatty(log))
    except (glm.CheckpointError, glm.ConfigError, glm.GenerationError, ValueError) as e:
        raise CLIError(str(e)) from None
    except ImportError as e:  # e.g. --quant before glm.quant is available, or a missing optional package
        raise CLIError(f"cannot load {args.model}: {e}") from None
    except OSError as e:  # unreadable folder, missing tokenizer file, ...
        raise CLIError(f"cannot load {args.model}: {e}") from None
    except (MemoryError, RuntimeError) as e:
        if is_oom(e):
            raise CLIError(oom_message("loading the model", args)) from None
        raise
    if m.tokenizer is None:
        raise CLIError(f"{m.path} has no ice_text.model (the tokenizer), so it cannot chat: use a full checkpoint")
    print(summary(m, model_name(args.model)), file=log, flush=True)
    return m


def isatty(f) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------- replies


@dataclass
class Sampling:
    """Per-turn generation settings; the defaults are the official chat's."""

    max_length: int = 2048
    greedy: bool = False
    top_p: float = 0.7
    temperature: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Sampling:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def describe(self) -> str:
        return (f"max-length {self.max_length}, top-p {self.top_p}, temperature {self.temperature}, "
                f"top-k {self.top_k}, repetition-penalty {self.repetition_penalty}, "
                f"greedy {'on' if self.greedy else 'off'}, seed {'none' if self.seed is None else self.seed}")


