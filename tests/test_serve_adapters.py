"""glm-serve with `--adapter NAME=DIR`: a request's `model` picks its adapter, requests for different adapters share
the decode batch, and each reply equals the engine's with only that adapter loaded. Through the official `openai`
client against a real server process on 127.0.0.1."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from glm_testutil import FIXTURES
from test_serve import NAME, QUERIES, Server

openai = pytest.importorskip("openai")

LORA = FIXTURES / "chatglm-tiny-lora" / "adapter"
PREFIX = FIXTURES / "chatglm-tiny-ptuning-train" / "prefix"


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_folders):
    args = [a for n, d in adapter_folders.items() for a in ("--adapter", f"{n}={d}")]
    srv = Server("--max-batch", "4", *args, log=tmp_path_factory.mktemp("serve") / "server.log", delay_ms=5)
    try:
        yield srv.wait()
    finally:
        srv.stop()


def engine_reply(m, query: str, n: int, adapter: str | None, **kw) -> str:
    from glm.chat import build_prompt, process_response

    return process_response(m.tokenizer.decode(m.generate(m.tokenizer.encode(build_prompt(query, [])), n,
                                                          adapter=adapter, **kw)))


def test_models_lists_the_base_and_every_adapter(server, adapter_folders):
    c = server.client()
    assert [x.id for x in c.models.list().data] == [NAME, *adapter_folders]
    assert c.models.retrieve("q").id == "q"


def test_each_request_equals_its_adapter_alone_in_one_batch(server, adapter_folders, adapter_alone):
    # 3 LoRA adapters, 2 prefixes of different lengths and the base, greedy and seeded, arriving together (4 rows:
    # the others wait and join the running batch).
    jobs = [(model, QUERIES[k % 4], 24 + 2 * k, k % 2) for k, model in enumerate([NAME, *adapter_folders, "b", "p"])]
    want = {}
    for model, query, n, seeded in jobs:
        adapter = None if model == NAME else model
        kw = dict(do_sample=True, temperature=0.9, top_p=0.9, seed=7) if seeded else dict(do_sample=False)
        want[model, query, n] = engine_reply(adapter_alone[adapter], query, n, adapter, **kw)
        if adapter is not None and not seeded:  # the adapter matters: a server ignoring it would fail
            assert want[model, query, n] != engine_reply(adapter_alone[None], query, n, None, **kw)
    c = server.client()

    def ask(job):
        model, query, n, seeded = job
        kw = dict(temperature=0.9, top_p=0.9, seed=7) if seeded else dict(temperature=0)
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": query}], max_tokens=n, **kw)
        assert r.model == model
        return r.choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    assert got == [want[model, q, n] for model, q, n, _ in jobs]
    assert server.metrics()["glm_decode_batch_size_sum"] > server.metrics()["glm_decode_batch_size_count"]


def test_an_unknown_model_is_404_listing_the_names_and_the_server_goes_on(server, adapter_alone):
    c = server.client()
    with pytest.raises(openai.NotFoundError, match=r"'chatglm-tiny', 'a', 'b', 'c', 'p', 'q'"):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "你好"}], max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.models.retrieve("nope")
    # The echoed prompt's logprobs are the adapter's too (here a prefix's).
    r = c.completions.create(model="q", prompt="你好", max_tokens=3, temperature=0, logprobs=1, echo=True)
    assert r.model == "q" and r.choices[0].finish_reason in ("stop", "length")
    m = adapter_alone["q"]
    ids = m.tokenizer.encode("你好")
    for adapter, match in (("q", True), (None, False)):
        want = m.logits(ids, adapter=adapter).log_softmax(-1)[0, ids[1]].item()
        assert (abs(r.choices[0].logprobs.token_logprobs[1] - want) < 1e-4) == match


@pytest.mark.parametrize("args, needle", [
    (["--adapter", f"a={LORA}", "--adapter", f"a={PREFIX}"], "'a' is given twice"),
    (["--adapter", f"{NAME}={LORA}"], "the base model's name"),
    (["--adapter", "just-a-name"], "expected NAME=DIR"),
], ids=["duplicate", "base-name", "no-dir"])
def test_bad_adapter_options_are_one_line_before_loading(capsys, args, needle):
    from glm import serve

    with pytest.raises(SystemExit) as e:
        serve.main(["--model", str(FIXTURES / "chatglm-tiny"), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and err.count("\n") == 1, err
