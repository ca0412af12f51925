"""Dummy checkpoints written tensor by tensor load like real ones (with and without
expert offloading) and carry the hub's tensor names."""

from __future__ import annotations

import json

import pytest

from sparsa import LLM, SamplingParams
from sparsa.cli import main
from sparsa.loader.dummy_writer import write_dummy_checkpoint
from tests.offload.helpers import DEEPSEEK_V2
from tests.tiny_models import TINY_CONFIGS


@pytest.mark.parametrize("cfg", [
    dict(DEEPSEEK_V2, num_hidden_layers=4),
    dict(TINY_CONFIGS["mixtral"], num_hidden_layers=3),
], ids=["deepseek_v2", "mixtral"])
def test_written_checkpoint_loads_and_offloads(tmp_path, cfg):
    path = write_dummy_checkpoint(cfg, tmp_path / "m", dtype="bfloat16", shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((path / f).exists() for f in files)
    assert any(".layers.3." in n or ".layers.2." in n for n in index["weight_map"])
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = LLM(str(path)).generate([[1, 2, 3]], sp)[0].outputs[0].token_ids
    off = LLM(str(path), expert_memory="30%").generate([[1, 2, 3]], sp)[0].outputs[0].token_ids
    assert full == off


def test_cli_write_dummy(tmp_path, capsys):
    rc = main(["write-dummy", "no-such-model", str(tmp_path / "x")])
    assert rc == 2
    assert "error" in capsys.readouterr().err


def test_dummy_checkpoint_gets_the_shared_tokenizer_when_its_vocab_fits(tmp_path,
                                                                       monkeypatch):
    """llama.cpp's GGUF converter needs a tokenizer: a dummy whose vocabulary holds the
    shared one gets it (the converter pads the rest), a smaller vocabulary does not."""
    import json as _json

    from sparsa.loader.dummy_writer import add_tokenizer

    shared = tmp_path / "shared" / "tokenizers" / "bpe32k"
    shared.mkdir(parents=True)
    tok = {"model": {"vocab": {"a": 3, "b": 4}}, "added_tokens": [{"id": 0}, {"id": 9}]}
    (shared / "tokenizer.json").write_text(_json.dumps(tok))
    (shared / "tokenizer_config.json").write_text("{}")
    monkeypatch.setenv("SPARSA_SHARED", str(tmp_path / "shared"))
    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir()
    big.mkdir()
    assert not add_tokenizer(small, 9)  # id 9 does not fit a vocabulary of 9
    assert not (small / "tokenizer.json").exists()
    assert add_tokenizer(big, 10)
    assert (big / "tokenizer.json").read_text() == (shared / "tokenizer.json").read_text()
    assert (big / "tokenizer_config.json").exists()
    path = write_dummy_checkpoint(dict(TINY_CONFIGS["mixtral"], num_hidden_layers=2,
                                       vocab_size=64), tmp_path / "m", dtype="bfloat16")
    assert (path / "tokenizer.json").exists()
    monkeypatch.setenv("SPARSA_SHARED", str(tmp_path / "none"))
    assert add_tokenizer(path, 64)  # already there


def test_offloaded_bf16_checkpoint_keeps_resident_weights_bf16(tmp_path):
    """With offloading, the automatic bf16 weight form still applies to the resident
    (non-expert) weights of a bf16 checkpoint, as it does all-resident: half the memory,
    and the same greedy tokens."""
    from sparsa import kernels

    if not kernels.available():
        pytest.skip("the bf16 weight form needs the native kernels")
    path = write_dummy_checkpoint(dict(DEEPSEEK_V2, num_hidden_layers=3), tmp_path / "m",
                                  dtype="bfloat16")
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    full = LLM(str(path))
    off = LLM(str(path), expert_memory="30%")
    assert off.engine.model.quant_stats["method"] == "bf16"
    assert off.engine.model.quant_stats["num_linear"] == \
        full.engine.model.quant_stats["num_linear"]
    assert off.engine.model.quant_stats["num_experts"] == 0  # the experts stay offloaded
    cache = off.engine.model.offload.cache  # read buffers mapped at load, after the above
    assert cache.reader.pool.allocated == cache.capacity + off.engine.model.offload.io_threads
    assert full.generate([[1, 2, 3]], sp)[0].outputs[0].token_ids == \
        off.generate([[1, 2, 3]], sp)[0].outputs[0].token_ids
