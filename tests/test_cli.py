"""The `sparsa` command line, run in-process through `main(argv)`."""

from __future__ import annotations

import json
import sys
import types

import pytest

from sparsa import cli
from sparsa.cli import main
from sparsa.tokenizer import shared_dir

STORIES = shared_dir() / "models" / "stories260K" / "stories260K.bin"
TINYMOE = shared_dir() / "models" / "tinymoe-stories"

needs_stories = pytest.mark.skipif(
    not STORIES.exists(), reason=f"{STORIES} not found (set SPARSA_SHARED to the shared/ dir)")
needs_tinymoe = pytest.mark.skipif(
    not (TINYMOE / "config.json").exists(),
    reason=f"{TINYMOE} not found (set SPARSA_SHARED to the shared/ dir)")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_usage_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err  # one line, no traceback
    assert "error" in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


# ---- generate --------------------------------------------------------------------------------


@needs_stories
def test_generate_greedy_story_from_bos(capsys):
    rc, out, err = run(capsys, "generate", str(STORIES), "--prompt-ids", "1",
                       "--temperature", "0", "--max-tokens", "24")
    assert rc == 0
    assert out.startswith("Once upon a time"), out
    assert "prompt tokens" in err and "generated tokens" in err and "tok/s" in err


@needs_stories
def test_generate_defaults_to_bos_and_echoes_text_prompts(capsys):
    rc, out, _ = run(capsys, "generate", str(STORIES), "--temperature", "0",
                     "--max-tokens", "6")
    assert rc == 0 and out.startswith("Once upon a time")
    rc, out, _ = run(capsys, "generate", str(STORIES), "--prompt", "Once upon a time",
                     "--temperature", "0", "--max-tokens", "4", "--echo")
    assert rc == 0 and out.startswith("Once upon a time, there")


@needs_stories
def test_generate_json_with_logprobs(capsys):
    rc, out, err = run(capsys, "generate", str(STORIES), "--prompt-ids", "1",
                       "--prompt", "The cat", "--temperature", "0", "--max-tokens", "5",
                       "--ignore-eos", "--logprobs", "3", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert [r["prompt_token_ids"][0] for r in doc["results"]] == [1, 1]
    assert doc["results"][1]["prompt"] == "The cat"
    first = doc["results"][0]["outputs"][0]
    assert first["text"].startswith("Once upon a time")
    assert len(first["token_ids"]) == 5 and first["finish_reason"] == "length"
    assert len(first["logprobs"]) == 5
    for tid, lp in zip(first["token_ids"], first["logprobs"]):
        assert lp["token_id"] == tid and lp["logprob"] <= 0
        assert len(lp["top_logprobs"]) == 3
        # greedy: the chosen token is the most likely one
        assert lp["top_logprobs"][0]["token_id"] == tid
    assert doc["usage"]["generated_tokens"] == 10


@needs_stories
def test_generate_sampling_is_seeded(capsys):
    args = ["generate", str(STORIES), "--prompt-ids", "1", "--temperature", "0.9",
            "--seed", "7", "--n", "2", "--max-tokens", "12", "--json"]
    rc1, out1, _ = run(capsys, *args)
    rc2, out2, _ = run(capsys, *args)
    assert rc1 == rc2 == 0
    texts = [[c["text"] for c in r["outputs"]] for r in json.loads(out1)["results"]]
    assert texts == [[c["text"] for c in r["outputs"]] for r in json.loads(out2)["results"]]
    assert len(texts[0]) == 2


@needs_stories
def test_chat_needs_a_template(capsys):
    rc, _, err = run(capsys, "generate", str(STORIES), "--chat", "--prompt", "hi")
    assert_usage_error(rc, err, "--chat-template")
    rc, out, err = run(capsys, "generate", str(STORIES), "--chat", "--prompt", "Once upon",
                       "--chat-template", "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                       "--temperature", "0", "--max-tokens", "3")
    assert rc == 0, err
    assert out.strip()


# ---- errors ------------------------------------------------------------------------------------


def test_missing_model_exits_2(capsys, tmp_path):
    rc, out, err = run(capsys, "generate", str(tmp_path / "nope"), "--prompt-ids", "1")
    assert_usage_error(rc, err, "not found", "nope")
    assert out == ""


def test_malformed_config_exits_2(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    rc, _, err = run(capsys, "info", str(tmp_path))
    assert_usage_error(rc, err, "not valid JSON")


def test_bad_sampling_values_exit_2_before_loading(capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded for invalid sampling values")

    monkeypatch.setattr(cli, "_make_llm", no_load)
    rc, _, err = run(capsys, "generate", "mixtral-mini", "--temperature", "-1")
    assert_usage_error(rc, err, "--temperature")
    rc, _, err = run(capsys, "generate", "mixtral-mini", "--top-p", "1.5")
    assert_usage_error(rc, err, "--top-p")
    rc, _, err = run(capsys, "generate", "mixtral-mini", "--prompt-ids", "1,x")
    assert_usage_error(rc, err, "--prompt-ids")
    rc, _, err = run(capsys, "generate", "mixtral-mini", "--chat", "--prompt-ids", "1")
    assert_usage_error(rc, err, "--chat")


@needs_stories
def test_too_long_prompt_exits_2(capsys):
    ids = ",".join(["5"] * 600)  # stories260K's context is 512
    rc, _, err = run(capsys, "generate", str(STORIES), "--prompt-ids", ids)
    assert_usage_error(rc, err, "600 tokens", "512")


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["generate", str(tmp_path / "nope"), "--debug"])
    with pytest.raises(FileNotFoundError):
        main(["--debug", "info", str(tmp_path / "nope")])


def test_usage_errors_and_help(capsys):
    rc, _, err = run(capsys, "frobnicate")
    assert_usage_error(rc, err, "frobnicate")
    rc, _, err = run(capsys)
    assert rc == 2 and "generate" in err
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "generate" in out and "info" in out and "bench" in out


# ---- info --------------------------------------------------------------------------------------


def test_info_json(capsys):
    rc, out, err = run(capsys, "info", "mixtral-mini", "--json", "--max-model-len", "2048",
                       "--kv-cache-memory", "256MiB")
    assert rc == 0, err
    d = json.loads(out)
    assert d["total_params"] == pytest.approx(640e6, rel=0.02)
    assert d["active_params"] == pytest.approx(192e6, rel=0.02)
    assert d["memory_plan"]["max_model_len"] == 2048
    assert d["memory_plan"]["kv_budget_bytes"] == 256 << 20


def test_info_text(capsys):
    rc, out, _ = run(capsys, "info", "mixtral-8x7b")
    assert rc == 0
    assert "46.70B total" in out and "top-2" in out and "memory plan" in out


def test_info_unbuildable_model_still_prints_config(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64,
         "n_layer": 2, "n_head": 2, "vocab_size": 100}))
    rc, out, err = run(capsys, "info", str(tmp_path))
    assert rc == 0
    assert "GPT2LMHeadModel" in out and "could not build" in out
    assert "unsupported architecture" in err


# ---- bench -------------------------------------------------------------------------------------


def test_bench_forwards_argv(capsys, monkeypatch):
    seen = {}
    fake = types.ModuleType("sparsa.bench")

    def fake_main(argv):
        seen["argv"] = argv
        return 0

    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sparsa.bench", fake)
    assert main(["bench", "--model", "mixtral-mini", "--json", "x.json"]) == 0
    assert seen["argv"] == ["--model", "mixtral-mini", "--json", "x.json"]


def test_bench_missing_module_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sparsa.bench", None)  # import now fails
    rc, _, err = run(capsys, "bench", "--model", "mixtral-mini")
    assert_usage_error(rc, err, "bench", "not available")


# ---- demo --------------------------------------------------------------------------------------


@needs_stories
@needs_tinymoe
def test_demo_runs_the_shared_models(capsys):
    rc, out, err = run(capsys, "demo", "--max-tokens", "6")
    assert rc == 0, err
    assert "stories260K" in out and "tinymoe-stories" in out
    assert out.count("Once upon a time") == 2  # greedy from BOS, both models
    assert "tok/s" in err


def test_demo_falls_back_without_shared(capsys, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setenv("SPARSA_SHARED", str(tmp_path / "absent"))
    monkeypatch.setattr(cli, "_demo_one", lambda title, model, args, max_tokens, **kw:
                        calls.append((model, kw)))
    rc, _, err = run(capsys, "demo")
    assert rc == 0
    assert [m for m, _ in calls] == ["mixtral-mini"]
    assert calls[0][1]["load_format"] == "dummy"
    assert "SPARSA_SHARED" in err and "random" in err.lower()


# ---- eval-ppl and quantization ---------------------------------------------------------------


@needs_stories
def test_eval_ppl_table_and_json(capsys, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Once upon a time there was a cat.\n\nThe dog ran to the park.\n")
    out_json = tmp_path / "r.json"
    rc, out, err = run(capsys, "eval-ppl", str(STORIES), "--text", str(corpus),
                       "--methods", "none,int8", "--json", str(out_json))
    assert rc == 0, err
    assert "| none |" in out and "| int8 |" in out
    assert out_json.exists()
    rc, _, err = run(capsys, "eval-ppl", str(STORIES), "--text", str(corpus), "--methods", "fp8")
    assert_usage_error(rc, err, "--methods")
    rc, _, err = run(capsys, "eval-ppl", str(STORIES), "--text", str(tmp_path / "none.txt"))
    assert_usage_error(rc, err, "not found")


@needs_stories
def test_generate_with_int8_weights(capsys):
    rc, out, err = run(capsys, "generate", str(STORIES), "--prompt-ids", "1", "-q", "int8",
                       "--temperature", "0", "--max-tokens", "12")
    assert rc == 0, err
    assert out.startswith("Once upon a time"), out


@pytest.mark.parametrize("argv,said", [
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--max-model-len", "512", "--kv-cache-memory", "64KiB"],
     "but --max-model-len is 512: one sequence needs --kv-cache-memory >="),
    (["--kv-cache-memory", "2"], "'2' needs a unit"),
])
def test_errors_name_the_flags_the_user_typed(capsys, argv, said):
    """Issue 19: a bad value is reported under its flag, not its Python name."""
    rc, _, err = run(capsys, "generate", "mixtral-mini", "--load-format", "dummy",
                     "--hf-overrides", '{"num_hidden_layers": 1}', "--prompt-ids", "1",
                     *argv)
    assert rc == 2 and said in err, err
