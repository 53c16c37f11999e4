"""`glm-serve --tensor-parallel 2` as a real process (rank 0, which starts rank 1 itself), through the official `openai`
client: the chat goldens alone and 8 at once; a rank that dies fails the request in flight with a clear error, and
the server exits with status 1."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_serve import NAME, TURNS, Server, ask

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server("--max-batch", "8", "--tensor-parallel", "2", log=tmp_path_factory.mktemp("serve-tp") / "server.log")
    try:
        yield srv.wait(timeout=180)
    finally:
        srv.stop()


def test_chat_goldens_alone_and_eight_at_once(server):
    c = server.client()

    def turn(t, stream: bool) -> str:
        return ask(c, t["query"], t["max_length"] - len(t["prompt_ids"]), stream, [tuple(h) for h in t["history"]])[0]

    turns = TURNS[:4]
    for t in turns:
        assert turn(t, False) == t["response"]
    jobs = [(turns[i % len(turns)], i % 2 == 1) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda j: turn(*j), jobs)) == [t["response"] for t, _ in jobs]
    m = server.metrics()
    assert m["glm_decode_batch_size_sum"] > m["glm_decode_batch_size_count"]  # rows did decode together


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
        except (OSError, ValueError, IndexError):
            pass
    return kids


def test_a_dead_rank_fails_the_request_and_the_server_exits(server):
    (rank1,) = [p for p in _children(server.proc.pid) if b"glm.parallel.worker" in Path(f"/proc/{p}/cmdline")
                .read_bytes()]
    eos = str(130005)
    stream = server.client().chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "你好"}], max_tokens=1500, temperature=0, stream=True,
        logit_bias={eos: -100})  # <eop> banned: a long reply, cut in the middle
    chunks = iter(stream)
    next(chunks)
    os.kill(rank1, signal.SIGKILL)
    with pytest.raises(openai.APIError, match=r"tensor-parallel rank 1 died \(exit status -9\)"):
        for _ in chunks:
            pass
    assert server.proc.wait(timeout=60) == 1
    assert "glm: error: tensor-parallel rank 1 died" in server.log.read_text()
