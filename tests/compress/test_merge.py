"""Expert merging: aligning neurons recovers a shuffled copy, merging copies of an expert
changes nothing, and the merged checkpoint loads in transformers and Sparsa alike."""

from __future__ import annotations

import json

import pytest
import torch

from sparsa import LLM, SamplingParams
from sparsa.compress import compress_checkpoint
from sparsa.compress.checkpoint import _merged
from sparsa.compress.merge import align_neurons, group_experts, neuron_features
from sparsa.config import ModelConfig
from sparsa.config.compress import CompressConfig
from sparsa.engine.llm_engine import LLMEngine
from sparsa.engine.scoring import prompt_logits
from tests.compress.test_prune import ARCHS, PROMPT
from tests.compress.tiny import (
    calibration_text,
    hf_greedy,
    hf_logits,
    make_copied_experts,
    tiny_moe,
)


def test_aligning_recovers_a_shuffled_expert():
    g = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g), \
        torch.randn(8, 12, generator=g)
    p = torch.randperm(12, generator=g)
    perm = align_neurons(neuron_features(gate, up, down),
                         neuron_features(gate[p], up[p], down[:, p]))
    assert torch.equal(p[perm], torch.arange(12))
    # a half-and-half average of the expert and its aligned shuffled copy is the expert
    for t, shuffled, name in ((gate, gate[p], "w1.weight"), (down, down[:, p], "w2.weight")):
        merged = _merged([t, shuffled], [0.5, 0.5], [None, perm], name)
        assert torch.allclose(merged, t, atol=1e-7)
        unaligned = _merged([t, shuffled], [0.5, 0.5], [None, None], name)
        assert not torch.allclose(unaligned, t, atol=1e-2)


def test_grouping_exact_count():
    d = torch.tensor([[0, 1, 5, 5], [1, 0, 5, 5], [5, 5, 0, 2], [5, 5, 2, 0]],
                     dtype=torch.float64).numpy() / 10
    usage = torch.tensor([1.0, 4.0, 3.0, 2.0])
    assert group_experts(d, usage, 2, "hierarchical") == [[0, 1], [2, 3]]
    assert group_experts(d, usage, 3, "hierarchical") == [[0, 1], [2], [3]]
    assert group_experts(d, usage, 2, "dominant") == [[0, 1], [2, 3]]


@pytest.mark.parametrize("variant", [
    {}, {"similarity": "router"}, {"similarity": "output_mean", "grouping": "dominant"},
    {"grouping": "dominant", "criterion": "weight"}])
def test_merging_copies_of_experts_is_lossless(variant, tmp_path):
    # top-1 with renormalized weights: a token's output is its chosen expert's, whichever
    # of two copies (nearly the same router row) it picks
    src = tiny_moe(tmp_path / "src", num_experts_per_tok=1)
    # "dominant" keeps the most-used experts as centres: two copies sharing the tokens could
    # both be (M-SMoE's choice), so there the first copy takes them all
    split = variant.get("grouping") != "dominant"
    make_copied_experts(src, {1: 0, 3: 2}, jitter=1e-4 if split else 0.0)
    base = LLM(str(src), num_kv_blocks=16)
    ref = prompt_logits(base.engine, PROMPT)
    calib = calibration_text(tmp_path / "calib.txt")
    llm = LLM(str(src), expert_merging={"count": 2, "calibration": str(calib),
                                        "calibration_tokens": 256, **variant},
              num_kv_blocks=16)
    recipe = json.loads((llm.engine.resolved.model_dir / "compression.json").read_text())
    for layer in recipe["layers"].values():
        assert sorted(sorted(g) for g in layer["groups"]) == [[0, 1], [2, 3]]
        # both copies of a pair carry tokens: the average really mixes an expert and a
        # shuffled copy of it
        assert not split or any(min(ws) > 0.1 for ws in layer["weights"]), layer
    assert (prompt_logits(llm.engine, PROMPT) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_merged_checkpoint_matches_transformers(arch, tmp_path):
    src = tiny_moe(tmp_path / "src", arch, **ARCHS[arch])
    cfg = CompressConfig.from_dict({"calibration": str(calibration_text(tmp_path / "c.txt")),
                                    "calibration_tokens": 256, "fraction": 0.5}, "merge")
    out = compress_checkpoint(ModelConfig(str(src)), cfg, tmp_path / "merged", LLMEngine)
    recipe = json.loads((out / "compression.json").read_text())
    assert all(sum(len(g) for g in layer["groups"]) == recipe["experts"]["before"]
               for layer in recipe["layers"].values())
    llm = LLM(str(out), num_kv_blocks=16)
    diff = (prompt_logits(llm.engine, PROMPT) - hf_logits(out, PROMPT)).abs().max().item()
    assert diff <= 1e-4, f"{arch}: max abs diff {diff:.2e}"
    ours = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16,
                                                 ignore_eos=True))[0].outputs[0].token_ids
    assert ours == hf_greedy(out, PROMPT, 16)


def test_merging_composes_with_int4(tmp_path):
    src = tiny_moe(tmp_path / "src")
    merge = {"fraction": 0.25, "calibration": str(calibration_text(tmp_path / "c.txt")),
             "calibration_tokens": 256, "router": "anchor"}
    llm = LLM(str(src), expert_merging=merge, quantization="int4", quantization_group_size=32,
              num_kv_blocks=16)
    assert llm.engine.hf_config.num_local_experts == 3
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8
