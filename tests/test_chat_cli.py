"""`sparsa chat` driven in a pseudo-terminal (issue 19): a question gets a streamed answer
and a tok/s line, /reset clears the conversation, Ctrl-C stops an answer and not the
program, /exit leaves."""

from __future__ import annotations

import sys

import pytest

from tests.server.conftest import build_tiny_chat_model

pexpect = pytest.importorskip("pexpect")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_chat_model(tmp_path_factory.mktemp("chat"))


def test_a_chat_session_in_a_terminal(model):
    child = pexpect.spawn(sys.executable, ["-m", "sparsa", "chat", str(model),
                                           "--max-tokens", "12", "--temperature", "0",
                                           "--dtype", "float32", "--kv-cache-memory", "8MiB",
                                           "--system", "Be brief."],
                          encoding="utf-8", timeout=120)
    try:
        child.expect_exact(">>> ")
        child.sendline("Hello there")
        child.expect(r"\((\d+) tokens, [0-9.]+ tok/s\)")
        assert int(child.match.group(1)) > 0
        child.expect_exact(">>> ")
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect_exact(">>> ")
        child.sendline("/nonsense")
        child.expect_exact("unknown command /nonsense")
        child.expect_exact(">>> ")
        child.sendintr()  # Ctrl-C at the prompt: a fresh prompt, still running
        child.expect_exact(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_stream_yields_growing_outputs_and_aborts_when_left(model):
    from sparsa import LLM, SamplingParams

    llm = LLM(str(model), dtype="float32", kv_cache_memory="8MiB")
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = list(llm.stream("Hi", params))
    assert outs[-1].finished and len(outs) == 10
    assert [len(o.outputs[0].token_ids) for o in outs] == list(range(1, 11))
    assert outs[-1].outputs[0].token_ids == llm.generate(["Hi"], params)[0].outputs[0].token_ids
    for _ in llm.stream("Hi", params):
        break  # leaving early aborts the request
    assert not llm.engine.has_unfinished_requests()


def test_generate_use_tqdm_shows_progress(model, capsys):
    from sparsa import LLM, SamplingParams

    llm = LLM(str(model), dtype="float32", kv_cache_memory="8MiB")
    llm.generate(["a", "b"], SamplingParams(max_tokens=2), use_tqdm=True)
    assert "Processed prompts" in capsys.readouterr().err


def test_generate_streams_the_same_text_it_prints_at_the_end(model, capsys):
    from sparsa.cli import main

    argv = ["generate", str(model), "--prompt", "Hi", "--temperature", "0", "--max-tokens",
            "8", "--dtype", "float32", "--kv-cache-memory", "8MiB"]
    assert main(argv) == 0
    streamed = capsys.readouterr().out
    assert main([*argv, "--no-stream"]) == 0
    assert capsys.readouterr().out == streamed and streamed.strip()
