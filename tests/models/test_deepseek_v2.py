"""DeepSeek-V2 against transformers: prefill logits (fp32, <= 1e-4) and 32 greedy tokens on
tiny random checkpoints covering both q paths, both routers, both fused/unfused q-kv_a
loading paths and yarn with its mscale corrections."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig

from sparsa import LLM, SamplingParams
from sparsa.engine.scoring import prompt_logits
from sparsa.models.builtin_configs import builtin_config
from sparsa.models.deepseek_v2 import (
    DeepseekV2MoE,
    MLAttention,
    is_moe_layer,
    mla_softmax_scale,
)
from tests.tiny_models import build_tiny_checkpoint

ATOL = 1e-4

_BASE = dict(
    architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    # MLA: every head has its own K/V (transformers' repeat_kv needs kv heads == heads)
    num_key_value_heads=4, vocab_size=256, max_position_embeddings=512,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    rms_norm_eps=1e-6,
    # v_head_dim != qk_nope_head_dim so K and V cache head dims differ
    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
)

# A short original context makes yarn's frequency ramp and mscale matter at test lengths.
_YARN = {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32,
         "beta_fast": 32, "beta_slow": 1}

CONFIGS: dict[str, dict] = {
    # (a) full q_proj, dense first layer, one shared expert, greedy routing
    "q-proj-greedy": dict(
        _BASE, q_lora_rank=None, first_k_dense_replace=1, n_shared_experts=1,
        topk_method="greedy",
    ),
    # (b) low-rank q, group-limited routing, scaled weights, norm_topk_prob (which
    # transformers' V2 router ignores), attention biases on the fused q_a/kv_a projection
    "q-lora-grouped": dict(
        _BASE, num_hidden_layers=3, q_lora_rank=24, first_k_dense_replace=0,
        n_shared_experts=2, topk_method="group_limited_greedy", n_group=2, topk_group=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, attention_bias=True,
    ),
    # (c) DeepSeek-V2-Lite style yarn: mscale == mscale_all_dim (rope attention_factor 1,
    # softmax scale grows by mscale**2)
    "yarn-lite": dict(
        _BASE, q_lora_rank=None, first_k_dense_replace=1, n_shared_experts=2,
        topk_method="greedy", rope_scaling={**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
    # (d) yarn with mscale != mscale_all_dim (cos/sin scaled too), and q_proj +
    # attention_bias, which loads q_proj and kv_a_proj_with_mqa unfused
    "yarn-mscale-unfused": dict(
        _BASE, num_hidden_layers=3, q_lora_rank=None, first_k_dense_replace=0,
        n_shared_experts=1, topk_method="greedy", attention_bias=True,
        rope_scaling={**_YARN, "mscale": 1.0, "mscale_all_dim": 0.8},
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    name = request.param
    path = tmp_path_factory.mktemp(name)
    hf, path = build_tiny_checkpoint(name, path, config=CONFIGS[name])
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=16)
    return name, hf, llm, path


def test_prefill_logits_match_transformers(pair):
    name, hf, llm, _ = pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, hf.config.vocab_size, (40,), generator=g).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    ours = prompt_logits(llm.engine, ids)
    diff = (ours - ref).abs().max().item()
    assert diff <= ATOL, f"{name}: max abs diff {diff:.2e}"


def test_greedy_matches_transformers(pair):
    name, hf, llm, _ = pair
    prompts = [[1, 17, 33, 4, 90, 5], [1, 200, 3, 3, 45, 91, 12, 7, 77, 8, 100, 9]]
    refs = _hf_greedy(hf, prompts, 32)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for ref, out in zip(refs, outs):
        assert out.outputs[0].token_ids == ref, name


def _hf_greedy(hf, prompts: list[list[int]], n: int) -> list[list[int]]:
    # No EOS on either side: min_new_tokens would mask EOS in transformers, changing argmax.
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        return [
            hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False,
                        pad_token_id=0)[0, len(p):].tolist()
            for p in prompts
        ]


def test_chunked_prefill_matches_transformers(pair):
    """Prefill chunks that attend to K/V already in the paged cache, mixed with decodes in
    the same step."""
    _, hf, _, path = pair
    # 7-token chunks over 23- and 25-token prompts (crossing a 16-token block boundary)
    prompts = [list(range(3, 26)), list(range(30, 55))]
    refs = _hf_greedy(hf, prompts, 16)
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=16,
              max_num_batched_tokens=7)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == refs


def test_moe_layer_freq():
    c = SimpleNamespace(n_routed_experts=8, first_k_dense_replace=1, moe_layer_freq=2)
    assert [is_moe_layer(c, i) for i in range(5)] == [False, False, True, False, True]
    c = SimpleNamespace(n_routed_experts=None, first_k_dense_replace=0, moe_layer_freq=1)
    assert not is_moe_layer(c, 0)


def test_model_structure(pair):
    _, hf, llm, _ = pair
    model = llm.engine.runner.model
    c = hf.config
    attns = model.attention_layers()
    assert len(attns) == c.num_hidden_layers
    for a in attns:
        assert isinstance(a, MLAttention)
        assert a.kv_shape == (4, c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim)
        assert a.kv_cache is not None
        assert a.scale == pytest.approx(hf.model.layers[0].self_attn.scaling, rel=1e-12)
    hf_moe = [type(layer.mlp).__name__ == "DeepseekV2Moe" for layer in hf.model.layers]
    ours_moe = [isinstance(layer.mlp, DeepseekV2MoE) for layer in model.model.layers]
    assert ours_moe == hf_moe
    # one rope table shared by every layer
    assert len({id(a.rotary) for a in attns}) == 1


def test_lite_softmax_scale():
    """V2-Lite: factor 40, mscale_all_dim 0.707 -> scale = 192**-0.5 * (0.0707 ln 40 + 1)**2."""
    d = builtin_config("deepseek-v2-lite")
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    m = 0.1 * 0.707 * math.log(40.0) + 1.0
    assert mla_softmax_scale(config) == pytest.approx(192**-0.5 * m * m, rel=1e-9)


def test_unsupported_topk_method_rejected():
    d = dict(CONFIGS["q-proj-greedy"], topk_method="noaux_tc")
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    with pytest.raises(ValueError, match="topk_method"):
        DeepseekV2MoE(config)
