#!/usr/bin/env python
"""Grammar engines on ChatGLM's vocabulary: llguidance (what glm uses) against xgrammar, when it is installed.

For each engine: the time to take in the vocabulary (130528 ids, as `Tokenizer.token_bytes` gives them), to compile
each JSON Schema of tests/generation/test_grammar.py, and to compute the next-token masks of 1 and of 8 matchers
(one decode step), along the same token paths for both (random walks through each schema's grammar, drawn with
llguidance). The masks are compared too: the count of allowed ids must agree at every step. Prints JSON rows.

    python scripts/bench_grammar.py                 # llguidance only
    pip install xgrammar  # (it pulls in transformers: a throwaway venv with --system-site-packages)
    python scripts/bench_grammar.py --steps 24
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "generation")]

from glm.config import GLMConfig  # noqa: E402
from glm.generation.grammar import JSON_OPTIONS, Matcher, Vocabulary, allowed_tokens  # noqa: E402
from glm.tokenizer import REWRITTEN, Tokenizer  # noqa: E402

TINY = ROOT / "tests" / "fixtures" / "chatglm-tiny"


def walks(vocab: Vocabulary, schemas: list[dict], steps: int, seed: int = 0) -> list[list[int]]:
    """A random token path through each schema's grammar (up to `steps` tokens, EOS excluded)."""
    rng, out = random.Random(seed), []
    for schema in schemas:
        m, path = Matcher(vocab, vocab.compile_json(schema)), []
        for _ in range(steps):
            ok = allowed_tokens([m], len(vocab.tokens))[0]
            ok[vocab.eos_id] = False
            ids = ok.nonzero()[:, 0].tolist()
            if not ids:
                break
            t = rng.choice(ids)
            path.append(t)
            if m.advance(t):
                break
        out.append(path)
    return out


def time_llguidance(vocab_args, schemas, paths, V) -> tuple[dict, list[list[int]]]:
    t0 = time.perf_counter()
    vocab = Vocabulary(*vocab_args)
    t_vocab = time.perf_counter() - t0
    grammars, t_compile = [], []
    for s in schemas:
        t0 = time.perf_counter()
        grammars.append(vocab.compile_json(s))
        t_compile.append(time.perf_counter() - t0)
    counts, t1, t8 = [], [], []
    for g, path in zip(grammars, paths):
        solo, batch = Matcher(vocab, g), [Matcher(vocab, g) for _ in range(8)]
        row = []
        for t in path:
            t0 = time.perf_counter()
            ok = allowed_tokens([solo], V)
            t1.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            allowed_tokens(batch, V)
            t8.append(time.perf_counter() - t0)
            row.append(int(ok.sum()))
            for m in [solo, *batch]:
                m.advance(t)
        counts.append(row)
    return {"engine": "llguidance", "vocab_s": round(t_vocab, 3),
            "compile_ms_median": round(statistics.median(t_compile) * 1e3, 2),
            "compile_ms_max": round(max(t_compile) * 1e3, 2),
            "mask_ms_b1": round(statistics.mean(t1) * 1e3, 3), "mask_ms_b8": round(statistics.mean(t8) * 1e3, 3),
            "steps": len(t1)}, counts


def unpack(bits: torch.Tensor, V: int) -> torch.Tensor:
    """(n, V) bool of a bitmask, as glm.generation.grammar unpacks llguidance's."""
    return torch.from_numpy(np.unpackbits(bits.numpy().view(np.uint8), axis=1, count=V, bitorder="little")
                            .view(np.bool_))


def time_xgrammar(tokens: list[bytes], eos: int, schemas, paths, V) -> tuple[dict, list[list[int]]]:
    import xgrammar as xgr

    t0 = time.perf_counter()
    # No-text ids (llguidance's b"\xff" names) are empty for xgrammar, which then treats them as special.
    info = xgr.TokenizerInfo([b"" if b.startswith(b"\xff") else b for b in tokens], xgr.VocabType.RAW,
                             vocab_size=V, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info)
    t_vocab = time.perf_counter() - t0
    compiled, t_compile = [], []
    for s in schemas:
        t0 = time.perf_counter()
        compiled.append(compiler.compile_json_schema(json.dumps(s), any_whitespace=False, separators=(",", ":")))
        t_compile.append(time.perf_counter() - t0)
    bits1, bits8 = xgr.allocate_token_bitmask(1, V), xgr.allocate_token_bitmask(8, V)
    batcher = xgr.BatchGrammarMatcher()
    counts, t1, t8, rejected = [], [], [], 0
    for c, path in zip(compiled, paths):
        solo, batch = xgr.GrammarMatcher(c), [xgr.GrammarMatcher(c) for _ in range(8)]
        row = []
        for t in path:
            t0 = time.perf_counter()
            solo.fill_next_token_bitmask(bits1, 0)
            ok = unpack(bits1, V)
            t1.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            batcher.batch_fill_next_token_bitmask(batch, bits8)
            unpack(bits8, V)
            t8.append(time.perf_counter() - t0)
            row.append(int(ok.sum()))
            if not all(m.accept_token(t) for m in [solo, *batch]):
                rejected += 1
                break
        counts.append(row)
    return {"engine": f"xgrammar {version('xgrammar')}", "vocab_s": round(t_vocab, 3),
            "compile_ms_median": round(statistics.median(t_compile) * 1e3, 2),
            "compile_ms_max": round(max(t_compile) * 1e3, 2),
            "mask_ms_b1": round(statistics.mean(t1) * 1e3, 3), "mask_ms_b8": round(statistics.mean(t8) * 1e3, 3),
            "steps": len(t1), "paths_rejected": rejected}, counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=24, help="tokens per path (default 24)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from test_grammar import SCHEMAS, UNBOUNDED

    schemas = SCHEMAS + UNBOUNDED + [{"type": "object"}, {"type": "string"}]
    cfg = GLMConfig.from_json(TINY / "config.json")
    tok = Tokenizer.from_config(TINY / "ice_text.model", cfg)
    V = cfg.vocab_size
    t0 = time.perf_counter()
    tokens = tok.token_bytes(V)
    print(json.dumps({"token_bytes_s": round(time.perf_counter() - t0, 3), "vocab": V, "json": JSON_OPTIONS}))
    vocab_args = (tokens, tok.encode_bytes, tok.eos_id, REWRITTEN)
    paths = walks(Vocabulary(*vocab_args), schemas, args.steps)
    row, ll_counts = time_llguidance(vocab_args, schemas, paths, V)
    print(json.dumps(row), flush=True)
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        print(json.dumps({"engine": "xgrammar", "skipped": "not installed"}))
        return 0
    row, xg_counts = time_xgrammar(tokens, tok.eos_id, schemas, paths, V)
    differ = [(i, k, a, b) for i, (ra, rb) in enumerate(zip(ll_counts, xg_counts))
              for k, (a, b) in enumerate(zip(ra, rb)) if a != b]
    row["mask_counts_differ"] = len(differ)
    row["first_differences"] = differ[:5]  # (schema, step, llguidance's count, xgrammar's)
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
