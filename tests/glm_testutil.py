"""Paths and golden data of the reference fixtures, shared by the tests (imported by name, unlike conftest)."""

import json
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
SLOW_LAUNCH = Path(__file__).parent / "slow_launch.py"


def entry_point(module: str, delay_ms: float = 0) -> list[str]:
    """The command line of `python -m module`; with `delay_ms`, through tests/slow_launch.py, which makes every
    decode step of the scheduler sleep that long (so that a test can stop a reply of the fast tiny model midway)."""
    import sys

    if delay_ms:
        return [sys.executable, str(SLOW_LAUNCH), str(delay_ms), module]
    return [sys.executable, "-m", module]


def golden(name: str):
    """(golden.json as dict, golden.safetensors tensors) of a fixture folder."""
    from safetensors.torch import load_file

    folder = FIXTURES / name
    return json.loads((folder / "golden.json").read_text()), load_file(str(folder / "golden.safetensors"))


TOL = 1e-4  # float32 parity with the reference, as the fixtures' README states


def glm_tiny_cases():
    """glm-tiny's goldens: (golden.json, tensors, the prompt cases, the greedy cases apart from the batch)."""
    g, gt = golden("glm-tiny")
    prompts = [c for c in g["cases"] if c["kind"] == "prompt"]
    greedy = [c for c in g["cases"] if "greedy_ids" in c and c["kind"] != "batch"]
    return g, gt, prompts, greedy


class ServerProcess:
    """`python -m <module> --model <tiny> --port <free>` in its own process group on 127.0.0.1, its output in `log`;
    `wait` polls `health` until it answers 200, `stop` always kills the whole group. `delay_ms`: every decode step
    sleeps that long (see `entry_point`)."""

    def __init__(self, module: str, *args: str, log: Path, health: str = "", url_suffix: str = "",
                 delay_ms: float = 0):
        import os
        import socket
        import subprocess

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}{url_suffix}"
        self.name, self.health, self.log = module.rpartition(".")[2], health, log
        root = FIXTURES.parent.parent
        env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                [*entry_point(module, delay_ms), "--model", str(FIXTURES / "chatglm-tiny"), "--port",
                 str(self.port), *args], cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)

    def wait(self, timeout: float = 90):
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"glm-{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url + self.health, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"glm-{self.name} did not answer on {self.url} in {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        import os
        import signal
        import subprocess

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def make_lora(folder: Path, seed: int, r: int = 4, alpha: float = 8, targets=("query_key_value",),
              base: str = "chatglm-tiny") -> Path:
    """A LoRA adapter of random factors for the tiny model `base`, as PEFT saves it (its config and key names)."""
    import torch
    from safetensors.torch import save_file

    from glm.config import GLMConfig
    from glm.lora import PEFT_PREFIX

    cfg = GLMConfig.from_json(FIXTURES / base / "config.json")
    h, f = cfg.hidden_size, cfg.inner_hidden_size
    shapes = {"query_key_value": ("attention", h, 3 * h), "dense": ("attention", h, h),
              "dense_h_to_4h": ("mlp", h, f), "dense_4h_to_h": ("mlp", f, h)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(cfg.num_layers):
        for t in targets:
            block, n_in, n_out = shapes[t]
            key = f"{PEFT_PREFIX}layers.{i}.{block}.{t}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, n_in, generator=g) / n_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * 0.5
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = json.loads((FIXTURES / "chatglm-tiny-lora" / "adapter" / "adapter_config.json").read_text())
    config.update(r=r, lora_alpha=alpha, target_modules=list(targets), base_model_name_or_path=base)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def make_prefix(folder: Path, pre_seq_len: int, seed: int) -> Path:
    """A P-Tuning v2 prefix of random values for chatglm-tiny, as the official ptuning scripts save it."""
    import torch

    src = FIXTURES / "chatglm-tiny-ptuning-train" / "prefix"
    config = json.loads((src / "config.json").read_text())
    config["pre_seq_len"] = pre_seq_len
    width = config["num_layers"] * 2 * config["hidden_size"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(seed)
    torch.save({"transformer.prefix_encoder.embedding.weight": torch.randn(pre_seq_len, width, generator=g)},
               folder / "pytorch_model.bin")
    return folder
