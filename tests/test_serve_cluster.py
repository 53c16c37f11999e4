"""glm-serve --replicas / --autoscale on Ray Serve: real glm-serve processes, each starting a Ray instance of its own
on 127.0.0.1, driven by the official `openai` client; replies checked against the engine alone in this process."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_serve import NAME, QUERIES, TURNS, Server, ask, solo

openai = pytest.importorskip("openai")
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray[serve] (glm[cluster])")

START = 300  # seconds a deployment may take to come up (a Ray instance, then the replicas: slow on a busy machine)
LONG = 1200  # tokens of a request that must still be running when a replica is killed or a burst measured


class Cluster(Server):
    """glm-serve with replicas; `stop` sends SIGTERM to glm-serve alone and checks that nothing of its Ray instance
    is left (every process Ray started stays in glm-serve's session)."""

    def state(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=30) as r:
            return json.load(r)

    def running(self) -> list[str]:
        return [r["id"] for r in self.state()["replicas"] if r["state"] == "RUNNING"]

    def until(self, what, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while not (got := what(self.state())):
            assert time.monotonic() < deadline, self.state()
            time.sleep(0.5)
        return got

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(120)
        deadline = time.monotonic() + 60
        while (left := session(self.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:  # a failed test must not leave them behind either
            os.kill(pid, signal.SIGKILL)
        assert left == [], f"processes of the Ray instance left running: {left}"


def session(sid: int) -> list[int]:
    """The processes of session `sid`."""
    out = []
    for d in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{d}/stat").read() if d.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat.rpartition(")")[2].split()[3]) == sid:
            out.append(int(d))
    return out


@pytest.mark.parametrize("argv, needle", [
    (["--threads", "2"], "--threads applies to --replicas or --autoscale only"),
    (["--ray-address", "auto"], "--ray-address applies to"),
    (["--autoscale-delay", "1:2"], "--autoscale-delay applies to"),
    (["--replicas", "2", "--autoscale", "1:2"], "not allowed with argument"),
    (["--autoscale", "2:1"], "expected MIN:MAX with 1 <= MIN <= MAX"),
    (["--autoscale", "0:1"], "expected MIN:MAX"),
    (["--autoscale", "1:2", "--autoscale-delay", "1"], "expected UP:DOWN"),
    (["--replicas", "0"], "expected an integer in [1, 1024]"),
    (["--replicas", "2", "--device", "cuda:1"], "each takes a GPU of its own"),
])
def test_cluster_options_are_checked(argv, needle, capsys):
    from glm.cluster import check_cluster_args
    from glm.serve import build_parser

    p = build_parser()
    with pytest.raises(SystemExit) as e:
        check_cluster_args(p, p.parse_args(argv))
    assert e.value.code == 2 and needle in capsys.readouterr().err


@needs_ray
def test_no_cluster_at_the_address_is_one_line(capsys):
    from glm.cluster import serve_replicas
    from glm.serve import build_parser

    args = build_parser().parse_args(["--replicas", "1", "--ray-address", "127.0.0.1:1"])
    assert serve_replicas(args, None) == 1  # before Ray is imported: it would retry for ever
    assert capsys.readouterr().err.splitlines() == [
        "glm-serve: error: no Ray cluster answers at 127.0.0.1:1 (Connection refused): start one with `ray start "
        "--head`"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    srv = Cluster("--replicas", "2", "--max-batch", "4", log=tmp_path_factory.mktemp("cluster") / "server.log")
    try:
        yield srv.wait(START)
    finally:
        srv.stop()


def raw(client, query: str, max_tokens: int, stream: bool, **kw):
    """(reply, finish reason, the replica that answered) through the official client."""
    r = client.chat.completions.with_raw_response.create(
        model=NAME, messages=[{"role": "user", "content": query}], max_tokens=max_tokens, temperature=0,
        stream=stream, **kw)
    out = r.parse()
    if not stream:
        return out.choices[0].message.content, out.choices[0].finish_reason, r.headers["x-glm-replica"]
    text, reason = "", None
    for chunk in out:
        for c in chunk.choices:
            text += c.delta.content or ""
            reason = c.finish_reason or reason
    return text, reason, r.headers["x-glm-replica"]


@needs_ray
def test_golden_turns_and_health(cluster):
    c = cluster.client()
    for t in TURNS[:4]:
        history = [tuple(h) for h in t["history"]]
        for stream in (False, True):
            assert ask(c, t["query"], t["max_length"] - len(t["prompt_ids"]), stream, history)[0] == t["response"]
    h = cluster.state()
    assert h["status"] == "ok" and h["max_batch"] == 4 and h["deployment"]["replicas"] == {"RUNNING": 2}
    assert [r["state"] for r in h["replicas"]] == ["RUNNING"] * 2 and len({r["pid"] for r in h["replicas"]}) == 2
    cluster.until(lambda h: sum(r["requests"] for r in h["replicas"]) == 8, 10)  # reported every second


@needs_ray
def test_sixteen_concurrent_requests_on_both_replicas(cluster, chatglm_tiny):
    jobs = [(QUERIES[i % len(QUERIES)], 20 + 7 * i, i % 2 == 1) for i in range(16)]
    expect = [solo(chatglm_tiny, q, n) for q, n, _ in jobs]
    c = cluster.client()
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda j: raw(c, *j), jobs))
    assert [g[:2] for g in got] == expect
    ids = set(cluster.running())
    assert {g[2] for g in got} == ids and len(ids) == 2  # both answered, and /health lists both
    # The metrics of the whole deployment: every replica's, labelled with its id.
    m = cluster.metrics()
    per = {i: m.get(f'glm_generated_tokens_total{{replica="{i}"}}', 0) for i in ids}
    assert all(v > 0 for v in per.values()), m


@needs_ray
def test_a_dropped_stream_is_cancelled(cluster):
    """Ray's proxy passes the client's disconnect on to the replica, which frees the row (counted as cancelled)."""
    req = urllib.request.Request(cluster.url + "/v1/chat/completions", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps(dict(model=NAME, messages=[{"role": "user", "content": "你好"}],
                                                      max_tokens=LONG, stream=True, ignore_eos=True)).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        r.readline()

    def cancelled(_):  # summed over the replicas' labels
        key = 'glm_requests_total{finish_reason="cancelled",replica='
        return sum(v for k, v in cluster.metrics().items() if k.startswith(key)) == 1

    cluster.until(cancelled, 60)


@needs_ray
def test_a_killed_replica(cluster, chatglm_tiny):
    """Streams on a replica whose process is killed end with an error event, requests not yet answered with a 503
    JSON error; none hangs; the others are answered as if nothing happened, and Ray Serve replaces the replica."""
    m, c = chatglm_tiny, cluster.client()
    want = solo(m, "你好", LONG, stop_at_eos=False)
    before = cluster.running()
    victim = {r["id"]: r["pid"] for r in cluster.state()["replicas"]}
    started, results = threading.Barrier(7), []

    def stream():
        r = c.chat.completions.with_raw_response.create(
            model=NAME, messages=[{"role": "user", "content": "你好"}], max_tokens=LONG, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
        text, it, rid = "", iter(r.parse()), r.headers["x-glm-replica"]
        try:
            for chunk in it:
                for ch in chunk.choices:
                    if ch.delta.content and not text:
                        started.wait(60)
                    text += ch.delta.content or ""
            results.append((rid, "ok", text))
        except openai.APIError as e:
            results.append((rid, "error", e.body))

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(stream) for _ in range(6)]
        started.wait(120)  # every stream has begun
        os.kill(victim[before[0]], signal.SIGKILL)
        for f in futures:
            f.result(timeout=180)  # none hangs
    on_victim = [r for r in results if r[0] == before[0]]
    on_other = [r for r in results if r[0] != before[0]]
    assert on_victim and on_other, results  # Ray Serve spread the six over both
    assert all(r[1] == "error" and r[2]["code"] == "replica_failed" for r in on_victim), on_victim
    assert all(r[1:] == ("ok", want[0]) for r in on_other), [r[:2] for r in on_other]
    assert ask(c, "你好", 30, False)[:2] == solo(m, "你好", 30)  # the next requests are answered
    # Ray Serve starts a replica in place of the killed one.
    now = cluster.until(lambda h: h["deployment"]["replicas"] == {"RUNNING": 2}
                        and [r["id"] for r in h["replicas"] if r["state"] == "RUNNING"], START)
    assert len(now) == 2 and before[0] not in now and before[1] in now
