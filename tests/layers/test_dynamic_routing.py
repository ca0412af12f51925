"""Dynamic routing: the policy's arithmetic, the engine against transformers run with
fewer experts per token, the unchanged case, statistics and bad settings."""

from __future__ import annotations

import pytest
import torch

from sparsa import LLM, SamplingParams
from sparsa.config.routing import RoutingConfig
from sparsa.engine.scoring import prompt_logits
from sparsa.layers.dynamic_routing import DynamicRouting
from tests.tiny_models import build_tiny_checkpoint


def _policy(renormalizes=True, top_k=2, **cfg):
    return DynamicRouting(RoutingConfig(**cfg), top_k, renormalizes, num_experts=8,
                          expert_bytes=100)


PROBS = torch.tensor([[0.50, 0.30, 0.10], [0.90, 0.05, 0.03], [0.40, 0.35, 0.20]])
IDS = torch.tensor([[3, 1, 7], [0, 5, 2], [6, 4, 1]])


def test_top_p_keeps_the_fewest_reaching_p_and_pads_with_weight_zero():
    pol = _policy(top_p=0.78, max_k=3, renormalize=False, renormalizes=False)
    w, ids = pol.apply(PROBS, IDS)
    # row 0: 0.5 + 0.3 reaches 0.78 (2 kept); row 1: 0.9 alone; row 2: all 3
    assert ids.tolist() == [[3, 1, 3], [0, 0, 0], [6, 4, 1]]
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.3, 0.0], [0.9, 0.0, 0.0],
                                                [0.4, 0.35, 0.2]]))
    # 6 kept slots, 5 distinct experts read (expert 1 serves rows 0 and 2)
    assert pol.kept == 6 and pol.tokens == 3 and pol.loaded == 5


def test_skip_threshold_and_renormalization():
    # Mixtral-like (renormalizes its top-2): the second expert of row 1 has a share of
    # 0.05 / 0.95 < 0.2 and is dropped, its weight going to the first
    pol = _policy(skip_threshold=0.2)
    w, ids = pol.apply(PROBS, IDS)
    torch.testing.assert_close(w, torch.tensor([[0.625, 0.375], [1.0, 0.0], [0.4 / 0.75,
                                                                           0.35 / 0.75]]))
    assert ids[1].tolist() == [0, 0]
    # a model that does not renormalize keeps its top-k's mass (renormalize) or loses the
    # dropped weight (renormalize=False)
    w, _ = _policy(renormalizes=False, skip_threshold=0.2).apply(PROBS, IDS)
    torch.testing.assert_close(w[1], torch.tensor([0.95, 0.0]))
    w, _ = _policy(renormalizes=False, skip_threshold=0.2, renormalize=False).apply(PROBS, IDS)
    torch.testing.assert_close(w[1], torch.tensor([0.9, 0.0]))
    # min_k keeps the first experts whatever their share
    w, ids = _policy(skip_threshold=0.9, min_k=2).apply(PROBS, IDS)
    assert ids.shape == (3, 2) and (w > 0).all()


def test_per_layer_values():
    cfg = RoutingConfig(top_p=[0.5, 1.0])
    a = DynamicRouting(cfg, 2, True, 8, 1, layer=0, layers=2)
    b = DynamicRouting(cfg, 2, True, 8, 1, layer=1, layers=2)
    assert a.top_p == 0.5 and b.top_p == 1.0
    with pytest.raises(ValueError, match='"top_p" has 2 entries; the model has 3'):
        DynamicRouting(cfg, 2, True, 8, 1, layer=0, layers=3)


@pytest.mark.parametrize("bad,match", [
    (dict(top_p=0), '"top_p" must be a number in'), (dict(top_p=1.5), "top_p"),
    (dict(skip_threshold=-0.1), "skip_threshold"), (dict(min_k=0, top_p=0.5), "min_k"),
    (dict(max_k=1, min_k=2), "below min_k"), (dict(), "sets nothing"),
    (dict(layer_top_k=[]), "layer_top_k"), (dict(layer_top_k=[1, 0]), "layer_top_k"),
    (dict(top_p=[]), "non-empty"), (dict(renormalize="yes", top_p=0.5), "renormalize"),
])
def test_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        RoutingConfig(**bad)


def test_unknown_key_and_non_moe_model(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        RoutingConfig.from_dict({"top_q": 0.5})
    _, path = build_tiny_checkpoint("llama", tmp_path / "dense")
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        LLM(str(path), dynamic_routing={"top_p": 0.5})


# (architecture, dynamic routing, the experts per token transformers then runs) for models
# that renormalize their top-k (Mixtral, Qwen3-MoE) and one that does not (OLMoE)
FEWER = [("mixtral", {"max_k": 1}, 1), ("qwen3_moe", {"max_k": 2}, 2),
         ("olmoe", {"max_k": 1, "renormalize": False}, 1)]


@pytest.mark.parametrize("arch,routing,k", FEWER)
def test_fewer_experts_match_transformers_with_that_k(arch, routing, k, tmp_path):
    from transformers import AutoModelForCausalLM

    _, path = build_tiny_checkpoint(arch, tmp_path / arch)
    hf = AutoModelForCausalLM.from_pretrained(path, num_experts_per_tok=k,
                                              dtype=torch.float32).eval()
    ids = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, dynamic_routing=routing)
    assert (prompt_logits(llm.engine, ids) - ref).abs().max().item() <= 1e-4
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids[:6]]), max_new_tokens=24, do_sample=False,
                           pad_token_id=0)[0, 6:].tolist()
    for native in (True, False):  # the native decode plan and the module path
        llm = LLM(str(path), dtype="float32", num_kv_blocks=64, dynamic_routing=routing,
                  native_decode=native)
        out = llm.generate([ids[:6]], SamplingParams(temperature=0, max_tokens=24,
                                                     ignore_eos=True))[0].outputs[0]
        assert out.token_ids == want
        st = llm.engine.stats()["dynamic_routing"]
        assert st["experts_per_token"] == k


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v2"])
def test_unchanged_routing_is_exact_and_a_threshold_cuts_experts(arch, tmp_path):
    _, path = build_tiny_checkpoint(arch, tmp_path / arch)
    prompts = [[1, 17, 33, 4, 90, 5], [1, 200, 3, 3, 45, 91, 12, 7, 77, 8, 100, 9]]
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    plain = LLM(str(path), dtype="float32", num_kv_blocks=64).generate(prompts, p)
    same = LLM(str(path), dtype="float32", num_kv_blocks=64, dynamic_routing={"max_k": 2})
    got = same.generate(prompts, p)
    for a, b in zip(got, plain):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob,
                                                                abs=1e-5)
    cut = LLM(str(path), dtype="float32", num_kv_blocks=64,
              dynamic_routing={"skip_threshold": 0.45})
    cut.generate(prompts, p)
    st = cut.engine.stats()["dynamic_routing"]
    full = same.engine.stats()["dynamic_routing"]
    assert full["experts_per_token"] == 2
    assert 1 <= st["experts_per_token"] < 2
    assert st["expert_bytes_per_token"] < full["expert_bytes_per_token"]


@pytest.mark.parametrize("cfg", [dict(top_p=0.6, max_k=4), dict(skip_threshold=0.3),
                                 dict(top_p=0.5, skip_threshold=0.2, max_k=3, min_k=2),
                                 dict(max_k=1, renormalize=False)])
@pytest.mark.parametrize("renormalizes", [True, False])
def test_one_token_path_equals_the_batched_one(cfg, renormalizes):
    """Batch-1 decode takes a plain-Python path: it keeps what the tensor path keeps."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, 8, generator=g) * 2, -1).sort(-1, descending=True)
    batched = _policy(renormalizes, top_k=2, **cfg)
    w, ids = batched.apply(probs.values[:, :batched.route_k], probs.indices[:, :batched.route_k])
    one = _policy(renormalizes, top_k=2, **cfg)
    for i in range(64):
        wi, ii = one.apply(probs.values[i:i + 1, :one.route_k],
                           probs.indices[i:i + 1, :one.route_k])
        n = wi.shape[1]
        assert (w[i, n:] == 0).all() and ids[i, :n].tolist() == ii[0].tolist()
        torch.testing.assert_close(wi[0], w[i, :n])
    assert one.kept == batched.kept


def test_offloaded_experts_route_and_count_as_resident_ones(tmp_path):
    """With experts offloaded, the narrower routing reads fewer experts, tokens equal the
    resident model's, and the lookahead's guesses at the next layer are not counted."""
    _, path = build_tiny_checkpoint("mixtral", tmp_path / "m")
    prompts = [[1, 17, 33, 4, 90, 5], [1, 200, 3, 3, 45, 91, 12, 7, 77, 8, 100, 9]]
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    routing = {"skip_threshold": 0.45}
    got = {}
    for memory in (None, "50%"):
        llm = LLM(str(path), dtype="float32", num_kv_blocks=64, dynamic_routing=routing,
                  expert_memory=memory)
        toks = [o.outputs[0].token_ids for o in llm.generate(prompts, p)]
        got[memory] = (toks, llm.engine.stats()["dynamic_routing"]["experts_per_token"])
    assert got[None] == got["50%"] and got[None][1] < 2
