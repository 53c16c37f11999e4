"""glm-web end to end in headless Chromium (Debian's), through Playwright's Python API (no browser download).

A person's session: type a message, watch the reply stream in, send markdown with a code block, press Stop
in the middle of the next reply. The screenshot is saved under the test's tmp folder; with
GLM_UPDATE_SCREENSHOT=1 it also replaces docs/screenshot-web.png (the README's), which a test run otherwise
leaves alone.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "chatglm-tiny"
FIRST = json.loads((TINY / "golden.json").read_text())["chat"][0]  # its reply at max_length 2048 is the same
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
MARKDOWN = "Render this as markdown: **bold**, `inline code` and a block:\n```python\nprint(\"你好\")\n```"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
pytest.importorskip("gradio")

def test_chat_in_headless_chromium(server, chatglm_tiny, tmp_path):
    # What the second reply would be in full, had it not been stopped (the engine, in this process).
    full = chatglm_tiny.chat(MARKDOWN, [(FIRST["query"], FIRST["response"])], max_length=2048, do_sample=False)[0]
    outside: list[str] = []
    with sync_api.sync_playwright() as p:
        # A persistent context is how Playwright takes a fresh --user-data-dir of our own.
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1100, "height": 900})
        try:
            page = browser.new_page()
            page.set_default_timeout(90_000)  # a busy 2-core machine can be slow; a hang still fails

            # Nothing may leave the machine: every request elsewhere than the server is recorded (and cannot
            # resolve, by --host-resolver-rules). Not page.route: intercepting requests stalls Gradio's stream.
            page.on("request", lambda r: None if r.url.startswith((server.url, "data:", "blob:"))
                    else outside.append(r.url))
            page.goto(server.url)
            box = page.locator("#msg textarea")
            box.click()
            page.keyboard.type(FIRST["query"])
            page.keyboard.press("Enter")

            bot = page.locator('#chatbot [data-testid="bot"]')
            bot.first.wait_for()
            partial = bot.first.inner_text()
            # While the reply streams, the next message can be typed (Shift+Enter makes its new lines): the box
            # was emptied when the first was sent, and the streaming reply does not touch it.
            box.click()
            for i, line in enumerate(MARKDOWN.split("\n")):
                if i:
                    page.keyboard.press("Shift+Enter")
                page.keyboard.type(line)
            page.wait_for_function(
                "want => { const b = document.querySelectorAll('#chatbot [data-testid=\"bot\"]');"
                " return b.length === 1 && b[0].innerText.trim() === want; }", arg=FIRST["response"])
            # Streamed: the reply was on the page before it was complete.
            assert FIRST["response"].startswith(partial.strip()) and len(partial) < len(FIRST["response"])
            page.wait_for_timeout(300)
            assert box.input_value() == MARKDOWN

            # Markdown and code blocks are rendered; then Stop in the middle of the reply.
            page.keyboard.press("Enter")
            user = page.locator('#chatbot [data-testid="user"]').nth(1)
            user.locator("strong").wait_for()
            assert user.inner_text().startswith("Render this as markdown: bold, inline code and a block:")
            assert user.locator("strong").inner_text() == "bold"
            assert "print" in user.locator("pre code").inner_text()
            page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length === 2"
                                   " && document.querySelectorAll('#chatbot [data-testid=\"bot\"]')[1].innerText"
                                   ".trim().length > 0")
            page.locator("#stop").click()
            page.wait_for_timeout(500)  # (time.sleep would also pause Playwright's event handling)
            stopped = bot.nth(1).inner_text()
            page.wait_for_timeout(1000)
            assert bot.nth(1).inner_text() == stopped  # it no longer grows
            assert 0 < len(stopped.strip()) < len(full) / 2  # and was cut early (the whole reply is ~4 s long)

            shot = tmp_path / "screenshot-web.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert outside == []
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000
    if os.environ.get("GLM_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "screenshot-web.png")


MID_REPLY = ["晚上睡不着应该怎么办", "你好", "再见"]  # the first reply is 141 tokens: 3.5 s at 25 ms a token
AFTER = "谢谢"


def test_messages_sent_while_a_reply_streams_are_answered_once_each_in_order(server, chatglm_tiny, tmp_path):
    history = []
    for q in MID_REPLY + [AFTER]:  # the replies the page must show: each with the history of the ones before
        _, history = chatglm_tiny.chat(q, history, max_length=2048, do_sample=False)
    # The last message, sent once all is quiet, is answered with the whole conversation: it was not lost.
    assert history[-1][1] != chatglm_tiny.chat(AFTER, [], max_length=2048, do_sample=False)[0]
    want = [x for q, r in history for x in (q, r)]

    def wait_for_bot(i: int, text: str) -> None:
        page.wait_for_function(
            "([i, want]) => { const b = document.querySelectorAll('#chatbot [data-testid=\"bot\"]');"
            " return b.length === i + 1 && b[i].innerText.trim() === want; }", arg=[i, text])

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(90_000)
            page.goto(server.url)
            box = page.locator("#msg textarea")
            bot = page.locator('#chatbot [data-testid="bot"]')
            box.click()
            page.keyboard.type(MID_REPLY[0])
            page.keyboard.press("Enter")
            bot.first.wait_for()
            page.wait_for_function("() => document.querySelector('#chatbot [data-testid=\"bot\"]')"
                                   ".innerText.trim().length > 0")
            for q in MID_REPLY[1:]:  # typed and sent while the first reply streams
                box.click()
                page.keyboard.type(q)
                page.keyboard.press("Enter")
                page.wait_for_function("want => document.querySelector('#msg textarea').value === ''")
            # They show with the reply's next token, waiting under it (the box clears first, outside the queue).
            page.wait_for_function(
                "want => Array.from(document.querySelectorAll('#chatbot [data-testid=\"user\"]'),"
                " e => e.innerText.trim()).join('\\n') === want", arg="\n".join(MID_REPLY), timeout=3_000)
            # Both went while the first reply was still streaming: one bot message, not yet complete.
            assert bot.count() == 1
            assert len(bot.first.inner_text().strip()) < len(history[0][1])

            wait_for_bot(2, history[2][1])
            page.wait_for_timeout(500)  # nothing more comes, and nothing goes: each message was answered once

            # A message too long for the context is refused with a warning; the conversation stays.
            box.fill("很长的问题" * 1000)
            box.press("Enter")
            page.get_by_text("too long for max_length=2048").first.wait_for()
            page.wait_for_timeout(500)
            assert bot.count() == 3 and page.locator('#chatbot [data-testid="user"]').count() == 3
            box.click()
            page.keyboard.type(AFTER)
            page.keyboard.press("Enter")
            wait_for_bot(3, history[3][1])
            page.wait_for_timeout(300)
            shown = page.evaluate("() => Array.from(document.querySelectorAll('#chatbot [data-testid=\"user\"],"
                                  " #chatbot [data-testid=\"bot\"]'), e => e.innerText)")  # in page order
        finally:
            browser.close()
    assert [s.strip() for s in shown] == want
