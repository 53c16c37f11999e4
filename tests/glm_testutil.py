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
