"""Hub ids ("org/name") load from huggingface_hub's cache ($HF_HOME), offline, at a
revision; a missing one says how to get it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sparsa import LLM, SamplingParams
from sparsa.loader.hub import looks_like_hub_id
from tests.tiny_models import build_tiny_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _cache_snapshot(home: Path, repo_id: str, src: Path, commit: str, refs: list[str]) -> Path:
    """A snapshot laid out as huggingface_hub's cache keeps it."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    _, a = build_tiny_checkpoint("llama", tmp_path / "a", seed=0)
    _, b = build_tiny_checkpoint("llama", tmp_path / "b", seed=1)
    home = tmp_path / "hf"
    _cache_snapshot(home, "tiny-org/tiny-llama", a, "a" * 40, ["main"])
    _cache_snapshot(home, "tiny-org/tiny-llama", b, "b" * 40, ["v2"])
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return a, b


def _tokens(llm: LLM) -> list[int]:
    return llm.generate([[1, 5, 9, 3]], GREEDY)[0].outputs[0].token_ids


def test_a_cached_hub_id_loads_like_its_folder(hub):
    a, b = hub
    by_id = _tokens(LLM("tiny-org/tiny-llama", dtype="float32"))
    assert by_id == _tokens(LLM(str(a), dtype="float32"))
    at_v2 = _tokens(LLM("tiny-org/tiny-llama", revision="v2", dtype="float32"))
    assert at_v2 == _tokens(LLM(str(b), dtype="float32"))


def test_a_missing_hub_id_says_how_to_get_it(hub):
    with pytest.raises(FileNotFoundError, match=r"not in the Hugging Face cache.*"
                                                r"huggingface-cli download nobody/missing"):
        LLM("nobody/missing")
    with pytest.raises(FileNotFoundError, match="revision 'v9'"):
        LLM("tiny-org/tiny-llama", revision="v9")


def test_what_counts_as_a_hub_id():
    assert looks_like_hub_id("Qwen/Qwen3-0.6B") and looks_like_hub_id("gpt2")
    for not_id in ("./m", "/abs/m", "~/m", "a/b/c", "m.gguf", "m.bin", ""):
        assert not looks_like_hub_id(not_id), not_id
