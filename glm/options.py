"""What the entry points share: model and sampling options, loading with one-line errors, and error text.

`glm-chat`, `glm-web` and `glm-serve` import this module and never each other.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from glm.errors import CLIError, ParallelError

# torch (through glm.engine) is imported only once the options have parsed, so that `--help` and option errors
# answer at once instead of after a second or two of imports.

DEFAULT_MODEL = "THUDM/chatglm-6b"  # glm.loader.DEFAULT_MODEL, repeated so that --help needs no torch (tested)

History = list[tuple[str, str]]


# ---------------------------------------------------------------------------------------------------- options


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line: the usage block argparse prints first buries the actual message."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind, s: str, what: str):
    """`s` as an int or a float: a type check only (whether the value is in range is not this function's to say)."""
    try:
        return kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None


def setting_type(field: str, kind, none: tuple[str, ...] = ()):
    """An argparse type for one GenerationConfig field: parsed here as `kind` (int or float), judged by
    GenerationConfig itself, whose message (without the field name, which argparse puts in front) is the error.
    Words in `none` stand for None. GenerationConfig is imported when an option is parsed, not with this module,
    so that --help needs no torch."""
    what = "an integer" if kind is int else "a number"
    if none:
        what += f" or {none[0]}"

    def parse(s: str):
        from glm.generation import GenerationConfig, GenerationError

        v = None if s.strip().lower() in none else _number(kind, s, what)
        try:
            GenerationConfig(**{field: v})
        except GenerationError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{field} ")) from None
        return v

    parse.__name__ = field  # argparse names the type in some messages
    return parse


max_length_type = setting_type("max_length", int)
top_p_type = setting_type("top_p", float)
temperature_type = setting_type("temperature", float)
top_k_type = setting_type("top_k", int)
repetition_penalty_type = setting_type("repetition_penalty", float)
seed_type = setting_type("seed", int, none=("none", "off", ""))


def count_type(lo: int, hi: int):
    """An argparse type for an integer in [lo, hi]."""

    def parse(s: str) -> int:
        v = _number(int, s, f"an integer in [{lo}, {hi}]")
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {s!r}")
        return v

    parse.__name__ = "integer"
    return parse


def add_model_args(parser: argparse.ArgumentParser, aliases: dict[str, tuple[str, ...]] | None = None) -> None:
    """Which checkpoint to load and how: shared by glm-chat and glm-web. `aliases`: more names of an option
    (glm-finetune takes the official ptuning scripts' names too)."""
    aliases = aliases or {}
    g = parser.add_argument_group("model")
    add = lambda name, **kw: g.add_argument(name, *aliases.get(name, ()), **kw)  # noqa: E731
    add("--model", default=DEFAULT_MODEL, metavar="REPO_OR_FOLDER",
        help=f"Hugging Face repo id or a local checkpoint folder (default: {DEFAULT_MODEL})")
    add("--revision", default=None, metavar="REV",
        help="Hub branch, tag or commit (default: the main branch)")
    add("--quant", type=int, choices=(4, 8), default=None,
        help="quantize the weights to int4 or int8 while loading (int4: about 4 GB for ChatGLM-6B)")
    add("--group-size", type=int, choices=(32, 64, 128), default=None,
        help="int4 only: one scale per GROUP_SIZE inputs instead of one per output row")
    add("--quant-lm-head", action="store_true",
        help="with --quant or a quantized checkpoint: quantize the output layer too (1 GB in fp16; "
             "faster decoding on a CPU)")
    add("--cpu-kernel", choices=("exact", "fast"), default="exact",
        help="quantized models on a CPU: exact (float activations, as the official code) or fast "
             "(int8 activations: faster, above all with several users; default: exact)")
    add("--ptuning", default=None, metavar="DIR",
        help="apply a P-Tuning v2 prefix (a glm-finetune or official ptuning output folder)")
    add("--lora", default=None, metavar="DIR",
        help="apply a LoRA adapter as PEFT saves it (adapter_config.json + adapter_model.*), unmerged")
    add("--compile", action="store_true",
        help="decode through torch.compile with CUDA graphs (fastest on a GPU; the first reply "
             "waits for compilation)")
    add("--max-context", type=count_type(2, 1 << 20), default=None, metavar="N",
        help="tokens of prompt plus reply one conversation turn may take; longer ones are refused "
             "(default: the model's max_sequence_length, 2048 for ChatGLM-6B)")
    add("--tensor-parallel", type=count_type(1, 4096), default=None, metavar="N",
        help="split the model over N ranks (one per GPU, or N CPU processes); this process starts the "
             "others, or is one of N started by torchrun (see docs/parallel.md)")
    add("--device", default="auto", metavar="DEVICE",
        help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)")
    add("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
        help="auto: float16 on CUDA; on CPU float32 for small models, and for ChatGLM-6B the "
             "half type this CPU runs fastest, found by a short probe (default: auto)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """How replies are generated: shared by glm-chat and glm-web (where the first three are slider defaults).

    An option not given is None, and takes its value from `glm.generation.CHAT_DEFAULTS` (the official chat's
    defaults) in `settings_from_args`: the numbers are written there only, not here, where importing them would
    import torch and slow down --help.
    """
    g = parser.add_argument_group("generation (an option not given takes the official chat's value)")
    g.add_argument("--max-length", type=max_length_type, default=None, metavar="N",
                   help="tokens of prompt (history included) plus reply, per turn, as chat(max_length=...)")
    g.add_argument("--top-p", type=top_p_type, default=None, metavar="P", help="nucleus sampling threshold")
    g.add_argument("--temperature", type=temperature_type, default=None, metavar="T",
                   help="sampling temperature; 0 is greedy")
    g.add_argument("--top-k", type=top_k_type, default=None, metavar="K",
                   help="sample among the K likeliest tokens; 0: all")
    g.add_argument("--repetition-penalty", type=repetition_penalty_type, default=None, metavar="R",
                   help="> 1 discourages repeating tokens; 1 is none")
    g.add_argument("--greedy", action="store_true", help="always pick the likeliest token (deterministic)")
    g.add_argument("--seed", type=seed_type, default=None, metavar="N",
                   help="seed every reply's sampling (reproducible); none: unseeded")


def check_model_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.group_size is not None and args.quant != 4:
        parser.error("--group-size applies to --quant 4 only")


def adapter_spec(s: str) -> tuple[str, str]:
    """`--adapter NAME=DIR` as (NAME, DIR)."""
    name, sep, folder = s.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=DIR (a name for the adapter, then its folder), got {s!r}")
    return name, folder


adapter_spec.__name__ = "NAME=DIR"  # argparse names the type in some messages


def add_adapter_args(group) -> None:
    """`--adapter NAME=DIR`, repeatable: adapters served beside the base model (glm-serve)."""
    group.add_argument("--adapter", type=adapter_spec, action="append", default=[], metavar="NAME=DIR",
                       help="also serve the LoRA adapter (as PEFT saves it) or P-Tuning v2 prefix in DIR as the model "
                            "NAME; repeatable. A request's model picks its adapter, the base model's name none")


def check_adapters(parser: argparse.ArgumentParser, args: argparse.Namespace, base_name: str) -> None:
    """Every `--adapter` name is its own and not the base model's (checked before anything loads)."""
    if args.adapter and getattr(args, "tensor_parallel", None):
        parser.error("--adapter does not work with --tensor-parallel: the ranks serve the base model only")
    seen = {base_name}
    for name, _ in args.adapter:
        if name in seen:
            what = "the base model's name" if name == base_name else "given twice"
            parser.error(f"--adapter {name}=...: the name {name!r} is {what}; give each adapter its own name")
        seen.add(name)



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


def summary(m, name: str, ptuning: str | None = None) -> str:
    """The one line printed after loading: what runs where, and how big it is; `ptuning`: the folder of the P-Tuning
    prefix applied (`--ptuning`), if any."""
    q = m.config.quantization_bit
    gs = getattr(m.config, "quantization_group_size", None)
    quant = f"int{q}" + (f" (group size {gs})" if gs else "") if q else "no quant"
    if q and m.config.quantize_lm_head:
        quant += " with the output layer"
    if m.device.type == "cpu" and any(getattr(mod, "cpu_kernel", None) == "fast" for mod in m.model.modules()):
        quant += ", fast CPU kernel"
    if m.config.pre_seq_len:  # set by a prefix applied with --ptuning, or stored with the checkpoint
        quant += f", P-Tuning prefix {m.config.pre_seq_len}" + (f" from {ptuning}" if ptuning else "")
    from glm.lora import lora_modules

    lora = list(lora_modules(m.model).values())
    if lora:
        quant += f", LoRA r={lora[0].lora_A.shape[0]} on {len(lora)} linears"
    if m.adapters:
        quant += f", adapters {', '.join(m.adapters)}"
    dtype = str(m.dtype).removeprefix("torch.")
    where = f"{m.device}" if not m.tensor_parallel else f"{m.tensor_parallel} {m.device.type} ranks (tensor parallel)"
    per = " per rank" if m.tensor_parallel else ""
    return (f"glm: {name} on {where}, {dtype}, {quant}, {_human_bytes(m.memory_bytes())} weights{per}, "
            f"loaded in {m.load_seconds:.1f} s")


def load_from_args(args: argparse.Namespace, log=None, max_batch: int = 1, max_waiting: int | None = None):
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
                     group_size=args.group_size, quantize_lm_head=args.quant_lm_head,
                     ptuning=getattr(args, "ptuning", None), lora=getattr(args, "lora", None),
                     compile=args.compile, max_batch=max_batch,
                     max_context=args.max_context, max_waiting=max_waiting,
                     cpu_kernel=getattr(args, "cpu_kernel", "exact"), progress=isatty(log),
                     tensor_parallel=getattr(args, "tensor_parallel", None))
    except (glm.CheckpointError, glm.ConfigError, glm.GenerationError, ValueError, ParallelError) as e:
        raise CLIError(str(e)) from None
    except ImportError as e:  # e.g. --quant before glm.quant is available, or a missing optional package
        raise CLIError(f"cannot load {args.model}: {e}") from None
    except OSError as e:  # unreadable folder, missing tokenizer file, ...
        raise CLIError(f"cannot load {args.model}: {e}") from None
    except (MemoryError, RuntimeError) as e:
        if is_oom(e):
            raise CLIError(oom_message("loading the model", args)) from None
        raise
    if m.tensor_parallel:
        from glm.parallel.world import exit_on_failure

        exit_on_failure()  # a rank that dies fails what runs, then ends this program with status 1: never a hang
    if m.tokenizer is None:
        raise CLIError(f"{m.path} has no ice_text.model (the tokenizer), so it cannot chat: use a full checkpoint")
    for name, folder in getattr(args, "adapter", None) or []:
        try:
            m.add_adapter(name, folder)
        except (glm.CheckpointError, glm.ConfigError, ValueError) as e:
            raise CLIError(f"--adapter {name}={folder}: {e}") from None
    print(summary(m, model_name(args.model), getattr(args, "ptuning", None)), file=log, flush=True)
    return m


def isatty(f) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------- replies


# The sampling options, by their GenerationConfig field names.
SETTING_OPTIONS = ("max_length", "top_p", "temperature", "top_k", "repetition_penalty", "seed")


def settings_from_args(args: argparse.Namespace):
    """The GenerationConfig of the sampling options: `CHAT_DEFAULTS` with the options given replacing its values."""
    from glm.generation import CHAT_DEFAULTS

    given = {f: getattr(args, f) for f in SETTING_OPTIONS if getattr(args, f) is not None}
    if args.greedy:
        given["do_sample"] = False
    return CHAT_DEFAULTS.replace(**given)


def describe(c) -> str:
    """A GenerationConfig's settings as the option names say them."""
    return (f"max-length {c.max_length}, top-p {c.top_p}, temperature {c.temperature}, top-k {c.top_k}, "
            f"repetition-penalty {c.repetition_penalty}, greedy {'off' if c.do_sample else 'on'}, "
            f"seed {'none' if c.seed is None else c.seed}")


def bind_error(host: str, port: int | None) -> str | None:
    """Why a server could not listen on host:port (port None: any), as one line; None when it can."""
    import errno
    import socket

    try:
        fam, typ, proto, _, addr = socket.getaddrinfo(host, port or 0, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        return f"unknown address {host!r} ({e}): use 127.0.0.1, 0.0.0.0 or an address of this machine"
    with socket.socket(fam, typ, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is taken: choose another with --port"
            return f"cannot listen on {host}: {e.strerror}: use 127.0.0.1, 0.0.0.0 or an address of this machine"
    return None


def prepare_server(args: argparse.Namespace, packages: tuple[str, ...], install: str):
    """What a server entry point checks before it serves: its packages are installed (found without importing
    them, which takes seconds) and its address can be listened on, both before the model loads, which can take
    minutes; then the model, with `--max-batch` cache rows. Raises CLIError."""
    import importlib.util

    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise CLIError(f"this needs {', '.join(missing)}: {install}")
    why = bind_error(args.host, args.port)
    if why:
        raise CLIError(why)
    return load_from_args(args, max_batch=args.max_batch, max_waiting=getattr(args, "max_waiting", None))
