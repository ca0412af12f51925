"""`sparsa chat` driven in a pseudo-terminal (issue 19): a question gets a streamed answer
and a tok/s line, /reset clears the conversation, Ctrl-C stops an answer and not the
program, /exit leaves."""

from __future__ import annotations

import sys

import pytest

from tests.server.conftest import build_tiny_chat_model

pexpect = pytest.importorskip("pexpect")


def _chat(model, *args: str):
    """`sparsa chat MODEL` in a pseudo-terminal, greedy and in fp32."""
    return pexpect.spawn(sys.executable, ["-m", "sparsa", "chat", str(model), "--temperature",
                                          "0", "--dtype", "float32", *args],
                         encoding="utf-8", timeout=120)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_chat_model(tmp_path_factory.mktemp("chat"))


def test_a_chat_session_in_a_terminal(model):
    child = _chat(model, "--max-tokens", "12", "--kv-cache-memory", "8MiB",
                  "--system", "Be brief.")
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


@pytest.fixture(scope="module")
def endless_model(tmp_path_factory):
    """A chat model whose greedy answers never end on their own: its LM head is zero but
    for the rows of `a` and `b` (v and -v), so the argmax is `a` or `b` (or, on an exact
    tie, <unk>), never EOS, and an answer runs until max tokens (a few seconds here)."""
    from safetensors.torch import load_file, save_file

    from tests.server.conftest import CHARS, SPECIALS, build_char_tokenizer
    from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint

    out = tmp_path_factory.mktemp("endless")
    cfg = dict(TINY_CONFIGS["llama"], vocab_size=len(SPECIALS) + len(CHARS),
               max_position_embeddings=8192)
    build_tiny_checkpoint("llama", out, config=cfg, std=0.1)
    build_char_tokenizer(out)
    f = out / "model.safetensors"
    tensors = load_file(f)
    head = tensors["lm_head.weight"]
    a, b = (len(SPECIALS) + CHARS.index(c) for c in "ab")
    v = head[a].clone()
    head.zero_()
    head[a], head[b] = v, -v
    save_file(tensors, f, metadata={"format": "pt"})
    return out


def test_ctrl_c_stops_the_answer_and_not_the_program(endless_model):
    """Ctrl-C while an answer streams: the answer stops (marked), the prompt comes back and
    the next question is answered in full."""
    child = _chat(endless_model, "--max-tokens", "4000", "--max-model-len", "8192",
                  "--kv-cache-memory", "64MiB")
    try:
        child.expect_exact(">>> ")
        child.sendline("Tell me a long story")
        child.expect("[ab]{20}")  # the answer is streaming
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect(r"\((\d+) tokens, [0-9.]+ tok/s\)")
        assert 20 <= int(child.match.group(1)) < 4000
        child.expect_exact(">>> ")
        assert child.isalive()
        child.sendline("And another")
        child.expect(r"\((\d+) tokens, [0-9.]+ tok/s\)")
        assert int(child.match.group(1)) == 4000, "the second answer was cut short"
        assert "[stopped]" not in child.before
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
