"""The web playground in a real headless Chromium (Debian's `chromium`, driven by playwright): the page lists the
models, sends a message and shows the streamed answer, which equals `LLM.chat` for the same settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_serve import live_server
from tiny import make_hf_model

import tinkerlm

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_playground_chat_streams(tmp_path):
    from playwright.sync_api import sync_playwright

    make_hf_model("llama", tmp_path / "llama")
    llm = tinkerlm.load(str(tmp_path / "llama"))
    with live_server({"tiny-llama": llm}, max_batch=2) as (base, _), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page()
            page.goto(base + "/")
            page.wait_for_function("document.querySelector('#model').options.length > 0")
            assert page.input_value("#model") == "tiny-llama"
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "40")
            # The page must ask for a stream and get server-sent events (how fast the browser repaints the pieces
            # of a tiny model's answer depends on timing, so that is not what is checked).
            sent = []
            page.on(
                "response",
                lambda r: (
                    sent.append((r.request.post_data or "", r.headers.get("content-type", "")))
                    if r.url.endswith("/v1/chat/completions")
                    else None
                ),
            )
            page.fill("#input", "Hello from the browser")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant[data-done='1']", timeout=30000)
            answer = page.text_content(".msg.assistant")
            assert page.text_content(".msg.user") == "Hello from the browser"
            assert answer == llm.chat("Hello from the browser", max_tokens=40, temperature=0)
            assert len(sent) == 1 and '"stream":true' in sent[0][0].replace(" ", "")
            assert sent[0][1].startswith("text/event-stream")
            assert "tokens/s" in page.text_content("#stats")
            assert page.query_selector(".msg.error") is None
        finally:
            browser.close()
