"""Expert pruning: the pruned checkpoint is a plain HF checkpoint (transformers and Sparsa
load it and agree), the least-used experts are the ones removed, and removing experts no
token uses changes nothing."""

from __future__ import annotations

import json

import pytest
import torch

from sparsa import LLM, SamplingParams
from sparsa.compress import compress_checkpoint
from sparsa.compress.calibrate import LayerStats
from sparsa.compress.prune import least_used
from sparsa.config import ModelConfig
from sparsa.config.compress import CompressConfig
from sparsa.engine.llm_engine import LLMEngine
from sparsa.engine.scoring import prompt_logits
from tests.compress.tiny import (
    calibration_text,
    hf_greedy,
    hf_logits,
    make_dead_experts,
    shard,
    tiny_moe,
)

PROMPT = [1, 50, 72, 69, 3, 40, 81, 85, 79, 70, 3, 12, 77, 33, 60, 61]
ARCHS = {"mixtral": {}, "qwen2_moe": {}, "qwen3_moe": {}, "olmoe": {},
         # group-limited routing cannot lose experts; plain greedy top-k can
         "deepseek_v2": {"topk_method": "greedy", "n_group": 1, "topk_group": 1}}


def prune_cfg(calib, **kw) -> CompressConfig:
    return CompressConfig.from_dict({"calibration": str(calib), "calibration_tokens": 256,
                                     **kw}, kw.pop("method", "prune"))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_pruned_checkpoint_matches_transformers(arch, tmp_path):
    src = tiny_moe(tmp_path / "src", arch, **ARCHS[arch])
    out = compress_checkpoint(ModelConfig(str(src)), prune_cfg(
        calibration_text(tmp_path / "calib.txt"), fraction=0.5), tmp_path / "pruned", LLMEngine)
    config = json.loads((out / "config.json").read_text())
    key = next(k for k in ("num_local_experts", "num_experts", "n_routed_experts")
               if config.get(k))
    before = json.loads((src / "config.json").read_text())[key]
    assert config[key] == before // 2
    llm = LLM(str(out), num_kv_blocks=16)
    diff = (prompt_logits(llm.engine, PROMPT) - hf_logits(out, PROMPT)).abs().max().item()
    assert diff <= 1e-4, f"{arch}: max abs diff {diff:.2e}"
    ours = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16,
                                                 ignore_eos=True))[0].outputs[0].token_ids
    assert ours == hf_greedy(out, PROMPT, 16)


def test_pruning_unused_experts_is_lossless(tmp_path):
    src = tiny_moe(tmp_path / "src")  # 4 experts, top-2, renormalized
    make_dead_experts(src, dead=[1, 3])
    calib = calibration_text(tmp_path / "calib.txt")
    base = LLM(str(src), num_kv_blocks=16)
    ref = prompt_logits(base.engine, PROMPT)
    ref_tokens = base.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16,
                                                        ignore_eos=True))[0].outputs[0]
    # through the engine's setting: the compressed copy is made, cached and loaded
    llm = LLM(str(src), expert_pruning={"count": 2, "calibration": str(calib),
                                        "calibration_tokens": 256}, num_kv_blocks=16)
    folder = llm.engine.resolved.model_dir
    recipe = json.loads((folder / "compression.json").read_text())
    assert recipe["experts"] == {"before": 4, "after": 2}
    for layer in recipe["layers"].values():
        assert layer["removed"] == [1, 3]
        assert layer["usage"][1] == layer["usage"][3] == 0.0
    assert (prompt_logits(llm.engine, PROMPT) - ref).abs().max().item() <= 1e-5
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16,
                                                ignore_eos=True))[0].outputs[0]
    assert out.token_ids == ref_tokens.token_ids
    # and transformers agrees on the pruned folder
    assert (hf_logits(folder, PROMPT) - ref).abs().max().item() <= 1e-4
    # the same settings again: the cached copy is reused, not rebuilt
    again = LLM(str(src), expert_pruning={"count": 2, "calibration": str(calib),
                                          "calibration_tokens": 256}, num_kv_blocks=16)
    assert again.engine.resolved.model_dir == folder
    assert len(list(folder.parent.iterdir())) == 1


def test_sharded_checkpoint_keeps_its_shards(tmp_path):
    src = tiny_moe(tmp_path / "src")
    shard(src)
    out = compress_checkpoint(ModelConfig(str(src)), prune_cfg(
        calibration_text(tmp_path / "calib.txt"), count=1), tmp_path / "pruned", LLMEngine)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors",
                                                 "model-00002-of-00002.safetensors"}
    assert not any(".experts.3." in n for n in index["weight_map"])
    assert sum(f.stat().st_size for f in out.glob("*.safetensors")) > \
        index["metadata"]["total_size"]  # the data plus each file's header
    llm = LLM(str(out), num_kv_blocks=16)
    diff = (prompt_logits(llm.engine, PROMPT) - hf_logits(out, PROMPT)).abs().max().item()
    assert diff <= 1e-4


def test_least_used_by_frequency_or_weight():
    stats = LayerStats(counts=torch.tensor([5.0, 1.0, 9.0, 1.0, 3.0], dtype=torch.float64),
                       weights=torch.tensor([2.0, 0.9, 0.1, 0.2, 3.0], dtype=torch.float64))
    assert least_used(stats, 2, "frequency") == [1, 3]  # a tie of counts goes by weight
    assert least_used(stats, 2, "weight") == [2, 3]


def test_pruning_composes_with_int8_and_offloading(tmp_path):
    src = tiny_moe(tmp_path / "src")
    prune = {"fraction": 0.25, "calibration": str(calibration_text(tmp_path / "c.txt")),
             "calibration_tokens": 256}
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    q = LLM(str(src), expert_pruning=prune, quantization="int8", num_kv_blocks=16)
    assert q.engine.model.quant_stats  # the pruned copy, loaded in int8
    assert len(q.generate([PROMPT], params)[0].outputs[0].token_ids) == 8
    plain = LLM(str(src), expert_pruning=prune, num_kv_blocks=16)
    off = LLM(str(src), expert_pruning=prune, expert_memory="50%", num_kv_blocks=16)
    assert off.engine.model.offload is not None
    assert off.generate([PROMPT], params)[0].outputs[0].token_ids == \
        plain.generate([PROMPT], params)[0].outputs[0].token_ids
