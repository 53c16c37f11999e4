#!/usr/bin/env python
"""Peak host memory of `glm.load(..., quant=...)` on a checkpoint of the real ChatGLM-6B shape.

Writes a random fp16 checkpoint in the release's layout (sharded `pytorch_model-*.bin` + index, or reuses one),
then loads it in a fresh process per mode and reports that process's peak RSS (VmHWM), its RSS once loaded, the
load time, and the peak after generating a few tokens. Quantize-while-loading should keep the peak near the
quantized size plus one block, not the fp16 size.

    python scripts/load_memory.py --layers 28 --dir /tmp/glm-random-6b --modes int4-qhead,int4,int8,bf16
    python scripts/load_memory.py --layers 4 --dir /tmp/glm-random-4 --modes bf16 --tensor-parallel 2  # per rank

With `--tensor-parallel N` the model is split over N ranks (rank 0 the child, the others its children), and the
figures are each rank's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glm.config import GLMConfig  # noqa: E402
from glm.loader import module_to_checkpoint  # noqa: E402
from glm.model import GLM  # noqa: E402

# The parent samples the child's RssAnon (memory the process owns, not the page cache of the memory-mapped shards,
# which VmHWM would count although the kernel can drop it at will) every 20 ms from outside: a sampling thread
# inside the child would change how glibc spreads its allocations over arenas, and so the figure itself.
CHILD = r"""
import json, sys, time, torch
from pathlib import Path
def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
torch.set_num_threads(2)
import glm
sys.path.insert(0, "scripts")
from bench import GreedyDecoder
folder, quant, dtype, qhead = sys.argv[1], int(sys.argv[2]) or None, sys.argv[3], sys.argv[4] == "1"
tp = int(sys.argv[5]) or None
t0 = time.perf_counter()
m = glm.load(folder, dtype=dtype, quant=quant, quantize_lm_head=qhead, tensor_parallel=tp)
t1 = time.perf_counter()
anon = status("RssAnon:")
print("LOADED", flush=True)
time.sleep(0.1)
cfg = m.config
prompt = list(range(100, 114)) + [cfg.gmask_token_id, cfg.bos_token_id]
if tp:  # every rank decodes: through the engine, whose runner rank 0 mirrors on the others
    m.generate(prompt, 8, stop_at_eos=False)
else:
    GreedyDecoder(m.model, 1, 64).run([prompt], 8)
time.sleep(0.1)
print(json.dumps({"load_s": round(t1 - t0, 1), "anon_loaded_gb": round(anon / 1e9, 3),
                  "vm_hwm_gb": round(status("VmHWM:") / 1e9, 3)}), flush=True)
"""


def _anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
        except (OSError, ValueError, IndexError):
            pass
    return kids


def measure(folder: Path, quant: int, dtype: str, qhead: bool = False, tp: int = 0) -> dict:
    """Run the child, sampling its owned memory (and its ranks', with `tp`); returns its report plus the peaks while
    loading and after."""
    import selectors

    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(quant), dtype, str(int(qhead)), str(tp)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    peak = peak_load = 0
    ranks: dict[int, int] = {}  # the other ranks' pids -> their peak
    lines, polls = [], 0
    while proc.poll() is None:
        peak = max(peak, _anon(proc.pid))
        if tp and polls % 25 == 0:  # look for the ranks it started every half second
            for kid in _children(proc.pid):
                ranks.setdefault(kid, 0)
        for kid in ranks:
            ranks[kid] = max(ranks[kid], _anon(kid))
        polls += 1
        if sel.select(timeout=0.02):
            line = proc.stdout.readline()
            if line.startswith("LOADED"):
                peak_load = peak
            elif line:
                lines.append(line)
    lines += proc.stdout.readlines()
    if proc.returncode:
        raise RuntimeError(proc.stderr.read())
    report = json.loads(lines[-1])
    report = {**report, "peak_anon_load_gb": round(peak_load / 1e9, 3), "peak_anon_gb": round(peak / 1e9, 3)}
    if tp:
        report["other_ranks_peak_anon_gb"] = [round(v / 1e9, 3) for v in ranks.values()]
    return report


def write_checkpoint(folder: Path, layers: int, shards: int = 8) -> None:
    """A random fp16 checkpoint of the release's layout (tied embeddings, as the release)."""
    cfg = GLMConfig.from_name("chatglm-6b")
    cfg.num_layers = layers
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = GLM(cfg)
    names = [(n, p.shape) for n, p in model.named_parameters() if n != "lm_head.weight"]
    per_shard = -(-len(names) // shards)
    weight_map, g = {}, torch.Generator().manual_seed(0)
    for s in range(shards):
        part = names[s * per_shard : (s + 1) * per_shard]
        if not part:
            break
        fname = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        state = {}
        for name, shape in part:
            ck = module_to_checkpoint(name)
            if "layernorm" in name:
                t = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
            else:
                t = torch.empty(shape, dtype=torch.float16)
                for r in range(0, shape[0], 4096):
                    t[r : r + 4096] = torch.randn((min(4096, shape[0] - r), *shape[1:]), generator=g) * 0.02
            state[ck] = t.half()
            weight_map[ck] = fname
        torch.save(state, folder / fname)
        del state
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    d = cfg.to_dict()
    d.update(architectures=["ChatGLMModel"], tie_word_embeddings=True, torch_dtype="float16")
    for k in ("quantization_group_size", "quantize_lm_head", "pre_seq_len", "prefix_projection"):
        d.pop(k, None)
    (folder / "config.json").write_text(json.dumps(d, indent=2))


# name: (quant, dtype, quantize_lm_head); with the head quantized, the release's tied embedding is looked up in it.
MODES = {"bf16": (0, "bfloat16", False), "fp16": (0, "float16", False), "int8": (8, "bfloat16", False),
         "int4": (4, "bfloat16", False), "int8-qhead": (8, "bfloat16", True), "int4-qhead": (4, "bfloat16", True)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--dir", default="/tmp/glm-random-6b", help="where the random checkpoint is (or is written)")
    p.add_argument("--modes", default="int4-qhead,int4,int8,bf16", help=f"comma-separated from {','.join(MODES)}")
    p.add_argument("--tensor-parallel", type=int, default=0, metavar="N", help="split the model over N ranks")
    args = p.parse_args(argv)
    folder = Path(args.dir)
    if not (folder / "config.json").is_file():
        t = time.perf_counter()
        write_checkpoint(folder, args.layers)
        print(f"wrote {folder} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    size = sum(f.stat().st_size for f in folder.glob("*.bin"))
    for mode in args.modes.split(","):
        quant, dtype, qhead = MODES[mode]
        row = {"mode": mode, "dtype": dtype, "checkpoint_gb": round(size / 1e9, 2),
               "tensor_parallel": args.tensor_parallel or None,
               **measure(folder, quant, dtype, qhead, args.tensor_parallel), "date": time.strftime("%Y-%m-%d")}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
