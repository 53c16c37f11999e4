"""Model configuration: the fields of the release's `config.json`, as a dataclass."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that does not describe a ChatGLM-6B (GLM v1) model."""


@dataclass
class GLMConfig:
    """Architecture of a GLM v1 checkpoint.

    Field names follow the release's `config.json`. Defaults for keys a config lacks are those of the reference
    code (the v0.1.0 snapshot: vocab 150528 and special ids 1500xx), so read every id from the checkpoint.
    Runtime knobs (device, dtype, batch, max length) do not live here.
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
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.head_dim % 4:
            raise ConfigError(f"head_dim {self.head_dim} must be a multiple of 4 for the 2D rotary embedding")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def alpha(self) -> float:
        # The reference scales the residual by sqrt(2 * 28) whatever num_layers is: it never passes num_layers down.
        return math.sqrt(2 * 28)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GLMConfig:
        model_type = d.get("model_type", "chatglm")
        archs = d.get("architectures") or ["ChatGLMModel"]
        if model_type != "chatglm" or not any(a.startswith("ChatGLM") for a in archs):
            raise ConfigError(
                f"unsupported architecture {archs} (model_type {model_type!r}): "
                "this engine runs ChatGLM-6B (GLM v1) only"
            )
        # ChatGLM2/3 reuse model_type "chatglm" but are a different architecture (multi-query attention, RMSNorm).
        if "multi_query_attention" in d or "padded_vocab_size" in d or d.get("position_encoding_2d") is False:
            raise ConfigError("this checkpoint is ChatGLM2/3 (GLM v2), not ChatGLM-6B v1: it is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("quantization_bit") not in (None, 0, 4, 8):
            raise ConfigError(f"quantization_bit must be 4 or 8, got {kwargs['quantization_bit']}")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> GLMConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}: point --model at a ChatGLM-6B checkpoint folder") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}): re-download the checkpoint") from None
        return cls.from_dict(d)

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
