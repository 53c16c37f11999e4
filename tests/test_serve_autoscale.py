"""glm-serve --autoscale, joining a Ray cluster started apart with `ray start --head` on 127.0.0.1 (--ray-address):
Ray Serve adds a replica under a bounded burst and removes it afterwards; glm-serve's SIGTERM stops the deployment
and leaves the cluster running. (A module of its own: two Ray instances at once would share Ray's fixed ports.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_serve import solo
from test_serve_cluster import START, Cluster, raw, session

pytest.importorskip("ray.serve")
pytest.importorskip("openai")

# Ray's switch for single-node use: the node's address is 127.0.0.1, so the cluster listens on the loopback only.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Ray uses its token (~/.ray/auth_token) with an explicit address only when told to.
TOKEN = {"RAY_AUTH_MODE": "token"}


def cmdlines(sid: int) -> list[str]:
    out = []
    for pid in session(sid):
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    return out


@pytest.fixture
def ray_cluster(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = Path(sys.executable).with_name("ray")
    with open(tmp_path / "ray.log", "wb") as log:
        head = subprocess.Popen([str(ray), "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
                                 "--include-dashboard=false", "--disable-usage-stats"],
                                env={**os.environ, **LOOPBACK}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + START
        while b"Ray runtime started" not in (tmp_path / "ray.log").read_bytes():
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "ray.log").read_text()
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", head.pid
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` then stops the processes it started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            pass
        for pid in session(head.pid):  # the processes of the cluster, which this fixture started
            os.kill(pid, signal.SIGKILL)


def test_autoscale_up_under_a_burst_and_back_down(ray_cluster, tmp_path, chatglm_tiny, monkeypatch):
    address, head = ray_cluster
    for k, v in {**LOOPBACK, **TOKEN}.items():
        monkeypatch.setenv(k, v)  # for glm-serve's driver, on a node of the cluster
    srv = Cluster("--ray-address", address, "--autoscale", "1:2", "--autoscale-delay", "0.5:2", "--max-batch", "1",
                  "--threads", "2", log=tmp_path / "server.log")
    try:
        srv.wait(START)
        h = srv.state()
        assert h["deployment"]["replicas"] == {"RUNNING": 1} and h["replicas"][0]["threads"] == 2
        c, stop, seen = srv.client(), threading.Event(), []
        want = solo(chatglm_tiny, "你好", 200, stop_at_eos=False)

        def client():  # a bounded burst: until the second replica runs (or the wait below gives up)
            while not stop.is_set():
                seen.append(raw(c, "你好", 200, True, extra_body={"ignore_eos": True}))

        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(client)
            try:
                srv.until(lambda h: h["deployment"]["replicas"] == {"RUNNING": 2}, START)
            finally:
                stop.set()
        assert seen and all(s[:2] == want for s in seen)
        srv.until(lambda h: h["deployment"]["replicas"] == {"RUNNING": 1} and len(h["replicas"]) == 1, 120)
    finally:
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(120)
    # glm-serve stopped Ray Serve, which it had started; the cluster it joined keeps running.
    deadline = time.monotonic() + 60
    while any("ray::Serve" in c or "ray::ProxyActor" in c for c in cmdlines(head)):
        assert time.monotonic() < deadline, cmdlines(head)
        time.sleep(0.5)
    assert any("raylet" in c for c in cmdlines(head)) and session(srv.proc.pid) == []
