"""Dummy checkpoints written tensor by tensor load like real ones (with and without
expert offloading) and carry the hub's tensor names."""

from __future__ import annotations

import json

import pytest
import torch

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


@pytest.mark.parametrize("name,dtype", [("mixtral", "bfloat16"), ("llama", "float32"),
                                        ("deepseek_v2", "bfloat16")])
def test_streamed_dummy_matches_transformers(tmp_path, name, dtype):
    """transformers loads a written dummy as its own checkpoint (every tensor, the right
    shapes) and Sparsa's fp32 logits on it match transformers' within 1e-4."""
    from transformers import AutoModelForCausalLM

    from sparsa.engine.scoring import prompt_logits

    cfg = DEEPSEEK_V2 if name == "deepseek_v2" else dict(TINY_CONFIGS[name],
                                                        num_hidden_layers=3)
    # std 0.3: peaked logits, so the comparison is not of near-uniform noise
    path = write_dummy_checkpoint(cfg, tmp_path / "m", dtype=dtype, shard_size="40KB",
                                  std=0.3)
    hf, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                    output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    llm = LLM(str(path), dtype="float32", quantization="none")
    ids = torch.randint(3, cfg["vocab_size"], (24,),
                        generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert ref.std() > 0.1
    assert (prompt_logits(llm.engine, ids) - ref).abs().max().item() <= 1e-4


def test_values_depend_on_seed_and_name_only(tmp_path):
    from safetensors import safe_open

    cfg = dict(TINY_CONFIGS["mixtral"], num_hidden_layers=2)

    def tensors(path):
        out = {}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                out.update({n: sf.get_tensor(n) for n in sf.keys()})  # noqa: SIM118
        return out

    a = tensors(write_dummy_checkpoint(cfg, tmp_path / "a", shard_size="30KB"))
    b = tensors(write_dummy_checkpoint(cfg, tmp_path / "b", shard_size="1GB"))
    c = tensors(write_dummy_checkpoint(cfg, tmp_path / "c", shard_size="1GB", seed=1))
    assert a.keys() == b.keys() == c.keys()
    assert all(a[n].dtype == torch.bfloat16 and a[n].equal(b[n]) for n in a)
    experts = [n for n in a if ".experts.3." in n]
    assert experts and not any(a[n].equal(c[n]) for n in experts)
    norms = [n for n in a if n.endswith("norm.weight")]
    assert norms and all((a[n] == 1).all() for n in norms)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        write_dummy_checkpoint("mixtral-mini", tmp_path / "x", dtype="auto")
    with pytest.raises(ValueError, match="dtype must be one of"):
        write_dummy_checkpoint("mixtral-mini", tmp_path / "x", dtype="int8")
    with pytest.raises(ValueError, match="shard_size must be positive"):
        write_dummy_checkpoint("mixtral-mini", tmp_path / "x", shard_size=0)
    assert not (tmp_path / "x").exists()


def test_a_failed_write_leaves_no_partial_folder(tmp_path, monkeypatch):
    """Issue 19: a write that fails midway removes its DIR.partial."""
    from sparsa.loader import dummy_writer

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(dummy_writer, "_write_shard", boom)
    with pytest.raises(OSError, match="disk full"):
        dummy_writer.write_dummy_checkpoint("mixtral-mini", tmp_path / "m")
    assert not (tmp_path / "m.partial").exists() and not (tmp_path / "m").exists()
