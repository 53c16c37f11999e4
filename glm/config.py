"""Model configuration: the fields of the release's `config.json`, as a dataclass checked like a schema."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glm.errors import ConfigError

# Largest value each size may take: far above any GLM v1 checkpoint, and small enough that building the model on
# the meta device stays instant, so that an absurd config.json is refused before anything is allocated.
LIMITS = {
    "vocab_size": 1 << 21,
    "hidden_size": 1 << 16,
    "num_layers": 1024,
    "num_attention_heads": 1 << 12,
    "inner_hidden_size": 1 << 18,
    "max_sequence_length": 1 << 16,
    "pre_seq_len": 1 << 14,
}
TOKEN_IDS = ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id")
BOOLS = ("position_encoding_2d", "tie_word_embeddings", "use_cache", "quantization_embeddings", "quantize_lm_head",
         "prefix_projection")
MAX_CONFIG_BYTES = 1 << 20  # the release's config.json is under 1 KB
FIX = "fix config.json or re-download the checkpoint"
GLM2 = "this checkpoint is ChatGLM2/3 (GLM v2), not ChatGLM-6B v1: it is not supported"
# The CPU kernel modes of quantized linears (see glm.quant.set_cpu_kernel). They live here, in a leaf module, so
# that `glm.load` checks its cpu_kernel= argument without importing glm.quant (a float model never needs it).
CPU_KERNELS = ("exact", "fast")


def _show(v: Any, limit: int = 40) -> str:
    """A short JSON-like rendering of a config value for an error message."""
    try:
        s = json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError):  # not JSON, or an int too long to print
        s = f"a {v.bit_length()}-bit integer" if isinstance(v, int) else f"a {type(v).__name__}"
    return s if len(s) <= limit else s[: limit - 3] + "..."


def read_json(path: Path, max_bytes: int, error: type[Exception], fix: str) -> Any:
    """The parsed JSON of `path`; anything unreadable raises `error` with a one-line message ending in `fix`.

    FileNotFoundError passes through, for the caller to explain.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise error(f"cannot read {path} ({e.strerror or e}): {fix}") from None
    if len(data) > max_bytes:
        raise error(f"{path} is over {max_bytes >> 10} KiB, too big to be what it claims: {fix}")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text: {fix}") from None
    except RecursionError:
        raise error(f"{path} is nested too deeply to be what it claims: {fix}") from None
    except ValueError as e:  # JSONDecodeError, or an integer literal with thousands of digits
        raise error(f"{path} is not valid JSON ({e}): {fix}") from None


@dataclass
class GLMConfig:
    """Architecture of a GLM v1 checkpoint.

    Field names follow the release's `config.json`. Defaults for keys a config lacks are those of the reference
    code (the v0.1.0 snapshot: vocab 150528 and special ids 1500xx), so read every id from the checkpoint.
    Runtime knobs (device, dtype, batch, max length) do not live here. Every field is checked on construction
    (type, range, and what the fields must satisfy together): a bad value raises ConfigError naming the field.
    """

    vocab_size: int = 150528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    bos_token_id: int = 150004  # <sop>
    eos_token_id: int = 150005  # <eop>
    mask_token_id: int = 150000  # [MASK]
    gmask_token_id: int = 150001  # [gMASK]
    pad_token_id: int = 0
    tie_word_embeddings: bool = True
    use_cache: bool = True
    torch_dtype: str = "float16"
    quantization_bit: int = 0  # 0: float weights; 4 or 8: the official int4/int8 releases
    quantization_embeddings: bool = False
    quantization_group_size: int | None = None  # ours: grouped int4 (None = per output channel, the official one)
    quantize_lm_head: bool = False  # ours: lm_head stored quantized too
    pre_seq_len: int | None = None  # P-Tuning v2 prefix length
    prefix_projection: bool = False  # P-Tuning v2 prefix through an MLP (glm.model.PrefixEncoder)
    model_type: str = "chatglm"
    architectures: list[str] = dataclasses.field(default_factory=lambda: ["ChatGLMModel"])

    def __post_init__(self) -> None:
        self._check_supported()
        for name, hi in LIMITS.items():
            self._check_int(name, 1, hi, optional=name == "pre_seq_len")
        for name in TOKEN_IDS:
            self._check_int(name, 0, self.vocab_size - 1)
        for name in BOOLS:
            if type(getattr(self, name)) is not bool:
                self._bad(name, "true or false", getattr(self, name))
        eps = self.layernorm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < 1):  # NaN fails too
            self._bad("layernorm_epsilon", "a number between 0 and 1 (1e-05 in the release)", eps)
        self.layernorm_epsilon = float(eps)
        if not isinstance(self.torch_dtype, str):
            self._bad("torch_dtype", 'a dtype name such as "float16"', self.torch_dtype)
        self._check_features()

    def _bad(self, name: str, what: str, value: Any) -> None:
        raise ConfigError(f"{name} must be {what}, got {_show(value)}: {FIX}")

    def _check_int(self, name: str, lo: int, hi: int, optional: bool = False) -> None:
        v = getattr(self, name)
        if optional and v is None:
            return
        # bool is an int in Python, and 28.0 is not a layer count: both are refused.
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            self._bad(name, f"an integer from {lo} to {hi}" + (" or null" if optional else ""), v)

    def _check_supported(self) -> None:
        mt, archs = self.model_type, self.architectures
        if not isinstance(mt, str) or not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"model_type must be a string and architectures a list of strings, got {_show(mt)} "
                              f"and {_show(archs)}: {FIX}")
        if mt != "chatglm" or not any(a.startswith("ChatGLM") for a in archs):
            raise ConfigError(f"unsupported architecture {_show(archs)} (model_type {_show(mt)}): "
                              "this engine runs ChatGLM-6B (GLM v1) only")
        if self.position_encoding_2d is False:
            raise ConfigError(GLM2)
        if self.quantization_embeddings is True:
            raise ConfigError("quantization_embeddings=true (quantized embeddings, as in chatglm-6b-int4-qe) is not "
                              "supported: use the int4 or int8 release, or the float one with quant=4 or 8")

    def _check_features(self) -> None:
        """What the sizes and features must satisfy together."""
        h, n = self.hidden_size, self.num_attention_heads
        if h % n:
            raise ConfigError(f"hidden_size {h} is not divisible by num_attention_heads {n}: {FIX}")
        if self.head_dim % 4:  # 2D rotary: each half of a head rotates channel pairs
            raise ConfigError(f"head_dim {self.head_dim} (hidden_size / num_attention_heads) must be a multiple "
                              f"of 4 for the 2D rotary embedding: {FIX}")
        specials = [getattr(self, k) for k in TOKEN_IDS[:4]]
        if len(set(specials)) < len(specials):
            raise ConfigError(f"bos, eos, mask and gmask token ids must differ, got {specials}: {FIX}")
        bits, gs = self.quantization_bit, self.quantization_group_size
        if type(bits) is not int or bits not in (0, 4, 8):
            self._bad("quantization_bit", "0 (float weights), 4 or 8", bits)
        if bits == 4 and self.inner_hidden_size % 2:
            raise ConfigError(f"int4 packs two inputs a byte: inner_hidden_size {self.inner_hidden_size} must be "
                              f"even: {FIX}")
        if gs is not None:
            self._check_int("quantization_group_size", 1, h)
            if bits != 4 or h % gs or self.inner_hidden_size % gs:
                raise ConfigError(f"quantization_group_size {gs} needs quantization_bit 4 and must divide "
                                  f"hidden_size {h} and inner_hidden_size {self.inner_hidden_size}: {FIX}")
        if self.quantize_lm_head and not bits:
            raise ConfigError(f"quantize_lm_head=true needs quantization_bit 4 or 8: {FIX}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def alpha(self) -> float:
        # The reference scales the residual by sqrt(2 * 28) whatever num_layers is: it never passes num_layers down.
        return math.sqrt(2 * 28)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GLMConfig:
        """The config of a parsed config.json; ConfigError (one line) for anything that is not GLM v1."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object of settings, got {_show(d)}: {FIX}")
        # ChatGLM2/3 reuse model_type "chatglm" but are a different architecture (multi-query attention, RMSNorm).
        if "multi_query_attention" in d or "padded_vocab_size" in d:
            raise ConfigError(GLM2)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("architectures") in (None, []):  # configs written by hand often leave it out
            kwargs.pop("architectures", None)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> GLMConfig:
        path = Path(path)
        try:
            d = read_json(path, MAX_CONFIG_BYTES, ConfigError, "re-download the checkpoint")
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}: point --model at a ChatGLM-6B checkpoint folder") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_name(cls, name: str) -> GLMConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # THUDM/chatglm-6b as released.
    "chatglm-6b": dict(
        vocab_size=130528,
        bos_token_id=130004,
        eos_token_id=130005,
        mask_token_id=130000,
        gmask_token_id=130001,
        pad_token_id=3,
    ),
    # The shape of tests/fixtures/glm-tiny.
    "tiny": dict(
        vocab_size=1024,
        hidden_size=128,
        num_layers=3,
        num_attention_heads=8,
        inner_hidden_size=512,
        bos_token_id=1004,
        eos_token_id=1005,
        mask_token_id=1000,
        gmask_token_id=1001,
        pad_token_id=3,
        tie_word_embeddings=False,
    ),
}
