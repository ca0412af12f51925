"""Headless Chromium loads the chat page at /, sends a message (as a streamed request) and
sees the answer arrive. Needs Debian's chromium (`apt-get install -y chromium`) and
the `playwright` package; skipped with the reason when either is missing."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.server.conftest import API_KEY, make_server, smollm2_gguf

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


@pytest.fixture(scope="module")
def smol_server():
    path = smollm2_gguf("set SPARSA_SHARED to the shared folder")
    # weights decoded to fp32 (quantization "none"): transformers' arithmetic, whose greedy
    # answer to the first question is known ("The capital of France is Paris.")
    with make_server(path, model={"quantization": "none", "max_model_len": 1024},
                     cache={"num_blocks": 128}) as s:
        yield s


def _ask(page, text: str, turn: int) -> str:
    page.fill("#input", text)
    page.click("#send")
    page.wait_for_function(f"document.querySelectorAll('.msg[data-state=done]').length == "
                           f"{turn}", timeout=120_000)
    return page.locator(".msg.assistant").nth(turn - 1).text_content()


def test_chat_page_holds_a_two_turn_conversation_with_smollm2(smol_server, browser):
    """Issue 19: the page keeps the conversation: the second request carries the first
    question and its answer, and the real chat model answers it in context."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data))
            if r.method == "POST" and r.url.endswith("/v1/chat/completions") else None)
    page.goto(smol_server.url + "/")
    page.click("summary")
    page.fill("#api-key", API_KEY)
    page.fill("#max-tokens", "24")
    page.fill("#temperature", "0")
    first = _ask(page, "What is the capital of France?", 1)
    assert "Paris" in first, first
    second = _ask(page, "And of Germany?", 2)
    # "And of Germany?" means the capital only in the context of the first turn
    assert "Berlin" in second and not errors, (second, errors)
    assert len(bodies) == 2, bodies
    assert [m["role"] for m in bodies[0]["messages"]] == ["user"]
    assert bodies[1]["messages"] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And of Germany?"}]
    assert [page.locator(".msg.user").nth(i).text_content() for i in (0, 1)] == [
        "You: What is the capital of France?", "You: And of Germany?"]
    page.close()
