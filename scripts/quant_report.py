#!/usr/bin/env python
"""Accuracy of weight-only quantization: int8, int4 per-channel (the official scheme), int4 grouped (32/64/128),
the quantized head tied to the embedding, and the CPU kernel's fast mode (int8 activations) next to the exact one.

For each scheme: the SQNR of every quantized weight (20·log10(‖w‖/‖w − dequant(quant(w))‖)), and on model outputs
the SQNR of the logits, the KL divergence KL(p_float ‖ p_quant) and the top-1 agreement of the next-token
distributions along the float model's greedy path (teacher-forced, so every scheme is scored on the same tokens).
Fast-mode rows also give their top-1 agreement with the exact path of the same scheme.

    python scripts/quant_report.py                       # the glm-tiny fixture and a 2-layer full-width model
    python scripts/quant_report.py --layers 4 --write docs/quantization.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import glm_inputs  # noqa: E402

import glm  # noqa: E402
from glm.config import GLMConfig  # noqa: E402
from glm.quant import (  # noqa: E402
    dequantize,
    quantize_,
    quantize_grouped,
    quantize_per_channel,
    quantized_linear_names,
    set_cpu_kernel,
    sqnr,
    tie_quantized_embedding,
)

SCHEMES = [("int8", 8, None), ("int4", 4, None), ("int4-g128", 4, 128), ("int4-g64", 4, 64), ("int4-g32", 4, 32)]
# Output-only rows: (name, bits, group, quantized head tied to the embedding, CPU kernel mode, exact row to compare)
VARIANTS = [(n, b, g, False, "exact", None) for n, b, g in SCHEMES] + [
    ("int4 + head", 4, None, True, "exact", None),
    ("int8 fast", 8, None, False, "fast", "int8"),
    ("int4 fast", 4, None, False, "fast", "int4"),
    ("int4-g128 fast", 4, 128, False, "fast", "int4-g128"),
    ("int4 + head fast", 4, None, True, "fast", "int4 + head"),
]
LINEARS = quantized_linear_names()


def weight_sqnr(w: torch.Tensor, bits: int, group: int | None) -> float:
    w = w.float()
    q, s = quantize_grouped(w, bits, group) if group else quantize_per_channel(w, bits)
    return sqnr(w, dequantize(q, s, bits, group, packed=False))


def layer_table(model) -> dict[str, list[float]]:
    """Per-linear SQNR (dB) for each scheme, in layer order."""
    out = {name: [] for name, _, _ in SCHEMES}
    for layer in model.layers:
        for lin in LINEARS:
            w = layer.get_submodule(lin).weight
            for name, bits, group in SCHEMES:
                out[name].append(weight_sqnr(w, bits, group))
    return out


def quantized_copy(model, bits, group, head: bool, cpu_kernel: str):
    """A deep copy of a float model with its block linears (and with `head`, lm_head) quantized.

    When the model ties lm_head to the embedding (the release does), the embedding then looks its rows up in the
    quantized head.
    """
    import copy

    qm = copy.deepcopy(model)
    quantize_(qm, bits, group, include_lm_head=head)
    if head and model.lm_head.weight is model.word_embeddings.weight:
        tie_quantized_embedding(qm)
    return set_cpu_kernel(qm, cpu_kernel)


@torch.inference_mode()
def path_logits(model, ids: list[int]) -> torch.Tensor:
    return model(*glm_inputs([ids], model.config, model.device))[0]


def output_metrics(fp_model, prompts: list[list[int]], steps: int) -> dict[str, tuple[float, float, float, float]]:
    """Greedy paths of the float model, then logit SQNR, KL and top-1 agreement of each variant along them."""
    ref_logits, starts, paths = [], [], []
    for prompt in prompts:
        path = list(prompt)
        for _ in range(steps):
            path.append(int(path_logits(fp_model, path)[-1].argmax()))
        paths.append(path)
        starts.append(len(prompt) - 1)  # the position that predicts the first new token
        ref_logits.append(path_logits(fp_model, path)[starts[-1] : -1].float())
    ref_logits = torch.cat(ref_logits)
    ref = ref_logits.log_softmax(-1)
    res, argmax = {}, {}
    for name, bits, group, head, kernel, exact in VARIANTS:
        qm = quantized_copy(fp_model, bits, group, head, kernel)
        logits = torch.cat([path_logits(qm, p)[s:-1].float() for p, s in zip(paths, starts)])
        lq = logits.log_softmax(-1)
        kl = (ref.exp() * (ref - lq)).sum(-1).mean().item()
        argmax[name] = lq.argmax(-1)
        top1 = (ref.argmax(-1) == argmax[name]).float().mean().item()
        vs_exact = (argmax[exact] == argmax[name]).float().mean().item() if exact else None
        res[name] = (sqnr(ref_logits, logits), kl, top1, vs_exact)
        del qm
    return res


def report(title: str, model, prompts: list[list[int]], steps: int) -> list[str]:
    sq = layer_table(model)
    out = output_metrics(model, prompts, steps)
    lines = [f"### {title}", "", "| scheme | weight SQNR dB (mean) | min | max |", "| --- | ---: | ---: | ---: |"]
    for name, _, _ in SCHEMES:
        v = sq[name]
        lines.append(f"| {name} | {sum(v) / len(v):.2f} | {min(v):.2f} | {max(v):.2f} |")
    lines += ["", f"Outputs along the float model's greedy paths ({len(prompts)} prompts × {steps} positions):", "",
              "| variant | logit SQNR dB | KL(float ‖ quant) | top-1 agreement, float | top-1 agreement, exact |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for name, *_ in VARIANTS:
        db, kl, top1, vs_exact = out[name]
        lines.append(f"| {name} | {db:.2f} | {kl:.3e} | {top1:.3f} | {'' if vs_exact is None else f'{vs_exact:.3f}'} |")
    deltas = [f"{name} {100 * (out[name][2] - out[exact][2]):+.1f}" for name, *_, exact in VARIANTS if exact]
    lines += ["", "Top-1 agreement with float of each fast row minus its exact row's, in points: "
              + ", ".join(deltas) + "."]
    lines += ["", f"Per-layer SQNR (dB), {len(model.layers)} layers × {len(LINEARS)} linears "
                  f"({', '.join(LINEARS)}):", "", "| layer.linear | " + " | ".join(n for n, _, _ in SCHEMES) + " |",
              "| --- |" + " ---: |" * len(SCHEMES)]
    for i in range(len(model.layers)):
        for j, lin in enumerate(LINEARS):
            k = i * len(LINEARS) + j
            lines.append(f"| {i}.{lin} | " + " | ".join(f"{sq[n][k]:.2f}" for n, _, _ in SCHEMES) + " |")
    return lines + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="blocks of the random full-width model (0: skip it)")
    p.add_argument("--prompts", type=int, default=4, help="random prompts per model")
    p.add_argument("--steps", type=int, default=64, help="greedy steps scored per prompt")
    p.add_argument("--write", default=None, help="write the markdown report to this file")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    lines = ["# Quantization", "",
             "## CPU kernel modes", "",
             "On a CPU, quantized linears run our C++ kernel (`glm/kernels/cpu_wq.cpp`), in one of two modes:", "",
             "- **exact** (the default): activations stay in float and the weights are dequantized in registers; the "
             "result is `F.linear(x, q * scale, b)` in fp32 up to summation order, whatever the activation dtype. "
             "The parity tests (fixture logits within 1e-4) run on it.",
             "- **fast**: each block of 32 activations is quantized to int8 with one fp32 scale (ggml's q8_0), the "
             "dot products run on integers (`vpdpbusd` with AVX-512 VNNI, `vpmaddubsw` on AVX2) and each block's sum "
             "is scaled once. The weights are read once for up to 8 rows, so a batch of 8 costs little more than one "
             "row. Not exact: the tables below give its cost next to the exact path's.", "",
             "Choose with `glm.load(..., cpu_kernel=\"fast\")` or `--cpu-kernel fast` (on a model at hand, "
             "`m = glm.load(...)`: `import glm.quant; glm.quant.set_cpu_kernel(m, \"fast\")`); "
             "`python scripts/bench.py --modes int4,int4-fast` times both. Past `QuantLinear.exact_max_rows` (32) "
             "rows in exact mode and `fast_max_rows` (128) in fast mode, long prompts dequantize slices of the weight "
             "and run one bf16 GEMM each, which is faster there. Both modes read one copy of the weight, in the "
             "kernel's layout; `glm.save` writes the official layout back.", "",
             "## Accuracy", "",
             f"Generated by `python scripts/quant_report.py --layers {args.layers} --prompts {args.prompts} --steps "
             f"{args.steps}` on "
             f"{time.strftime('%Y-%m-%d')} (CPU, float32 arithmetic). Weight SQNR is "
             "20·log10(‖w‖/‖w − dequant(quant(w))‖); KL and top-1 agreement compare next-token distributions of the "
             "quantized model with the float one along the float model's greedy path (teacher-forced). \"exact\" is "
             "the default CPU path (float activations, `F.linear(x, q * scale, b)`); \"fast\" quantizes activations "
             "to int8 per block of 32 (`glm.quant.set_cpu_kernel(model, \"fast\")`). \"+ head\" also quantizes "
             "lm_head (`quantize_lm_head=True`); where the model ties the embedding to it, as the release does, the "
             "embedding then looks its rows up in the quantized head.", ""]
    from bench import build_random, random_prompts

    tiny = glm.load(ROOT / "tests" / "fixtures" / "glm-tiny")
    lines += report("glm-tiny fixture (hidden 128, 3 layers, vocab 1024, head not tied)", tiny.model,
                    [random_prompts(tiny.config, 1, 9, seed=i)[0] for i in range(args.prompts)], args.steps)
    if args.layers:
        cfg = GLMConfig.from_name("chatglm-6b")
        cfg.num_layers = args.layers
        # Not tied: with random weights a tied head mostly predicts the input token again, which says nothing.
        model = build_random(cfg, torch.device("cpu"), torch.float32, None, None)
        lines += report(f"Random ChatGLM-6B-shaped model (hidden 4096, {args.layers} layers, N(0, 0.02) weights, "
                        "head not tied)", model,
                        [random_prompts(cfg, 1, 16, seed=i)[0] for i in range(args.prompts)], args.steps)
        lines += ["Random Gaussian weights have no outliers, so their SQNR is the best case; the relative order of "
                  "the schemes is what carries over to the real checkpoint.", ""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        Path(args.write).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
