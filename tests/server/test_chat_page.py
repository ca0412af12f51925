"""Headless Chromium loads the chat page at /, sends a message (as a streamed request) and
sees the answer arrive. Needs Debian's chromium (`apt-get install -y chromium`) and
the `playwright` package; skipped with the reason when either is missing."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.server.conftest import API_KEY

CHROMIUM = os.environ.get("SPARSA_CHROMIUM") or shutil.which("chromium") or \
    shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium: install Debian's package with `apt-get install -y chromium`"
                    " (or set SPARSA_CHROMIUM) to run the chat page test")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="pip install playwright to run the chat page test")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def test_chat_page_streams_an_answer(server, browser):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    assert page.title() == "Sparsa chat"
    page.click("summary")  # open the settings
    page.fill("#api-key", API_KEY)
    page.fill("#max-tokens", "40")
    page.fill("#temperature", "0")
    # count DOM updates of the answer: streamed text arrives as many small updates
    page.evaluate("""() => {
        window.__updates = 0;
        new MutationObserver(() => window.__updates++).observe(
            document.getElementById('log'),
            {subtree: true, childList: true, characterData: true});
    }""")
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data))
            if r.method == "POST" and r.url.endswith("/v1/chat/completions") else None)
    page.fill("#input", "Hello there")
    page.click("#send")
    page.wait_for_selector(".msg[data-state=done]", timeout=60_000)
    user = page.text_content(".msg.user")
    answer = page.text_content(".msg.assistant")
    assert user == "You: Hello there"
    assert answer, "no answer text"
    # the page asks for a stream and renders what arrives; how many DOM updates that makes
    # depends on how fast tokens come (a fast engine can deliver 40 in one network read)
    assert bodies and bodies[0]["stream"] is True, bodies
    assert page.evaluate("window.__updates") >= 1, "the answer was never rendered"
    assert not errors, errors
    # a second turn sends the history along and also completes
    page.fill("#input", "And again")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg[data-state=done]').length == 2",
                           timeout=60_000)
    page.close()
