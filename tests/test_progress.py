"""Progress bars on the long phases (issue 19): each shows on a terminal and counts to its
end. Bars are `disable=None` (hidden when stderr is not a TTY, as in these tests), so the
`bars` fixture forces them on, as a terminal would, to see what they count."""

from __future__ import annotations

import re

import pytest

from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint


def _show_bars(monkeypatch) -> None:
    """tqdm shown whatever stderr is (the modules import it where they use it), and left
    on screen when done, so its final count is drawn."""
    import tqdm

    real = tqdm.tqdm
    monkeypatch.setattr(tqdm, "tqdm", lambda *a, **k: real(*a, **{**k, "disable": False,
                                                                  "leave": True}))


@pytest.fixture
def bars(monkeypatch):
    _show_bars(monkeypatch)


def _finished(err: str, desc: str) -> str:
    """The last state of the bar `desc` drew: it must have reached its total."""
    states = re.findall(re.escape(desc) + r":\s+\d+%\|[^|]*\|\s*([^\r\n]*)", err)
    assert states, f"no {desc!r} bar in {err!r}"
    done = re.match(r"([\d.]+\w*)/([\d.]+\w*)", states[-1].strip())
    assert done and done.group(1) == done.group(2), states[-1]
    return states[-1]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return build_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("moe") / "m")[1]


def test_write_dummy_counts_its_bytes(tmp_path, capsys, monkeypatch):
    from sparsa.loader.dummy_writer import write_dummy_checkpoint

    cfg = dict(TINY_CONFIGS["mixtral"])
    write_dummy_checkpoint(cfg, tmp_path / "quiet", dtype="float32")
    assert "Writing dummy weights" not in capsys.readouterr().err  # not a terminal: no bar
    _show_bars(monkeypatch)
    write_dummy_checkpoint(cfg, tmp_path / "m", dtype="float32", shard_size="100KB")
    _finished(capsys.readouterr().err, "Writing dummy weights")


@pytest.mark.parametrize("settings,desc", [
    ({"quantization": "int8"}, "Quantizing experts to int8"),
    ({"offload_compression": "zstd"}, "Compressing experts"),
    ({"offload_on_miss": "low_precision"}, "Low-precision (int4) expert copies"),
])
def test_expert_stores_show_their_build(moe, tmp_path, capsys, bars, settings, desc):
    from sparsa import LLM

    LLM(str(moe), expert_memory="50%", offload_store_dir=str(tmp_path),
        kv_cache_memory="8MiB", **settings)
    assert _finished(capsys.readouterr().err, desc).startswith("8/8")


def test_trace_counts_its_prompts(moe, tmp_path, capsys, bars):
    from sparsa.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("1,5,9\n1,7\n1,3,4,5\n")
    assert main(["trace", str(moe), "--prompts", str(prompts), "--out",
                 str(tmp_path / "t.csv"), "--max-tokens", "3"]) == 0
    assert _finished(capsys.readouterr().err, "Tracing prompts").startswith("3/3")


def test_perplexity_counts_its_windows(tmp_path, capsys, bars):
    from sparsa import LLM
    from sparsa.bench.ppl import evaluate_perplexity
    from tests.server.conftest import build_tiny_chat_model

    llm = LLM(str(build_tiny_chat_model(tmp_path / "m")), kv_cache_memory="8MiB")
    r = evaluate_perplexity(llm, ["a" * 50, "b" * 20], context_len=16, label="none")
    # 51 tokens in windows of 16 overlapping by one: 4; 21 tokens: 2
    assert r.windows == 6
    assert _finished(capsys.readouterr().err, "Perplexity none").startswith("6/6")


def test_bench_suite_counts_its_runs(tmp_path, capsys, bars):
    from sparsa import LLM
    from sparsa.bench.suite import Workload, run_sparsa

    _, path = build_tiny_checkpoint("llama", tmp_path / "m")
    llm = LLM(str(path), kv_cache_memory="8MiB")
    w = Workload(pp=8, tg=4, batches=(1, 2), batched_prompt=4, batched_gen=3,
                 offline_requests=2, offline_prompt=(4, 6), offline_output=(2, 3))
    run_sparsa(llm, w, {"pp", "tg", "batched", "offline"})
    assert _finished(capsys.readouterr().err, "Sparsa workloads").startswith("9/9")
