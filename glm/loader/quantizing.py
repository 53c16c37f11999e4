"""The quantized side of loading: empty QuantLinears for a checkpoint stored quantized, and quantize-on-load.

Only `glm.loader.building` imports this module, and only for a quantized checkpoint or `quant=`: a float load
never imports glm.quant (nor builds its CPU kernel).
"""

from __future__ import annotations

from torch import nn

from glm.config import GLMConfig
from glm.quant import QuantLinear, quantized_linear_names, swap_linear, tie_quantized_embedding


def _quant_linear_names(num_layers: int, include_lm_head: bool) -> list[str]:
    """Module names of the linears a quantized model holds as QuantLinear (the list lives in glm.quant)."""
    block = quantized_linear_names(include_lm_head=False)
    names = [f"layers.{i}.{s}" for i in range(num_layers) for s in block]
    return names + (["lm_head"] if include_lm_head else [])


def swap_in_quant_linears(model: nn.Module, cfg: GLMConfig) -> None:
    """Replace float linears by (meta) QuantLinear modules, for checkpoints stored quantized."""
    for name in _quant_linear_names(cfg.num_layers, cfg.quantize_lm_head):
        swap_linear(model, name, cfg.quantization_bit, cfg.quantization_group_size, empty=True)
    if cfg.quantize_lm_head and cfg.tie_word_embeddings:
        tie_quantized_embedding(model)  # the table is the stored lm_head.weight


def prepare_stored(model: nn.Module) -> None:
    """Put every QuantLinear of a model loaded quantized into the CPU kernel's layout, one at a time (no-op on
    other devices)."""
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.prepare()


class StreamingQuantizer:
    """Quantizes each linear of a float checkpoint as soon as its tensors are all assigned, to keep peak memory low.

    Its weight is kept as stored until then (memory-mapped, no float copy), so it is quantized from the
    checkpoint's own values, as the official quantizer quantizes the fp16 release.

    Args:
        bits, group_size: the scheme.
        names: module names of the linears to quantize.
        tied: whether lm_head is tied to the embedding (then it is quantized from the embedding table).
        config_updates: what to record in the model's config once done.
    """

    def __init__(self, bits: int, group_size: int | None, names: list[str], tied: bool, config_updates: dict):
        self.bits, self.group_size, self.tied = bits, group_size, tied
        self.pending = {n: {"weight", "bias"} for n in names}  # linear -> tensors still to read before quantizing
        self.config_updates = config_updates

    @classmethod
    def plan(cls, cfg: GLMConfig, quant: int | None, group_size: int | None,
             quantize_lm_head: bool) -> StreamingQuantizer | None:
        """What to quantize while loading a checkpoint with config `cfg` (None: nothing)."""
        tied = cfg.tie_word_embeddings
        if not cfg.quantization_bit:
            if not quant:
                return None
            names = _quant_linear_names(cfg.num_layers, quantize_lm_head)
            return cls(quant, group_size, names, tied, dict(quantization_bit=quant, quantization_group_size=group_size,
                                                            quantize_lm_head=quantize_lm_head))
        if quantize_lm_head and not cfg.quantize_lm_head:
            # The official -int4/-int8 checkpoints keep a float head: quantize it like the blocks.
            return cls(cfg.quantization_bit, cfg.quantization_group_size, ["lm_head"], tied,
                       dict(quantize_lm_head=True))
        return None

    def keeps_as_stored(self, name: str) -> bool:
        """Whether the tensor `name` is about to be quantized, so is to be kept as stored."""
        mod_name, _, attr = name.rpartition(".")
        return (attr == "weight" and mod_name in self.pending) or self._is_tied_head(name)

    def _is_tied_head(self, name: str) -> bool:
        return self.tied and name == "word_embeddings.weight" and "lm_head" in self.pending

    def assigned(self, model: nn.Module, name: str, dtype) -> None:
        """Tensor `name` is in the model: quantize what it completes."""
        if self._is_tied_head(name):
            # Quantize the tied head now and look the embedding up in it: the float table goes at once.
            model.lm_head.weight = model.word_embeddings.weight
            swap_linear(model, "lm_head", self.bits, self.group_size)
            tie_quantized_embedding(model)
            model.word_embeddings.dtype = dtype  # rows come out in the model's dtype, not the stored one
            del self.pending["lm_head"]
        mod_name, _, attr = name.rpartition(".")
        if mod_name in self.pending:
            self.pending[mod_name].discard(attr)
            if not self.pending[mod_name]:  # this linear is complete
                swap_linear(model, mod_name, self.bits, self.group_size)
                del self.pending[mod_name]

    def finish(self, model: nn.Module) -> None:
        """Quantize the linears without a bias (lm_head), and record the scheme in the model's config."""
        for mod_name in list(self.pending):
            swap_linear(model, mod_name, self.bits, self.group_size)
        self.pending.clear()
        for field, value in self.config_updates.items():
            setattr(model.config, field, value)


__all__ = ["StreamingQuantizer", "prepare_stored", "swap_in_quant_linears"]
