"""CALM-style early exit (lossy): off by default and without effect when it never fires;
when it always fires, each decoded token is the one the model truncated after the exit
layer gives, and the skipped layers' KV cache holds the projections of the exit state,
on the native decode plan and on the module path alike."""

from __future__ import annotations

import pytest
import torch

from sparsa import LLM, SamplingParams
from sparsa.config.early_exit import EarlyExitConfig
from sparsa.tokenizer import shared_dir
from tests.spec.test_speculative_engine import _prompts
from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint

TINYMOE = shared_dir() / "models" / "tinymoe-stories"
NEVER = {"exit_layers": [0, 1, 2], "threshold": 1.0, "confidence": "margin"}
ALWAYS = {"exit_layers": [1], "threshold": 1e-6, "confidence": "softmax"}  # p_max >= 1/V


def _greedy(llm, prompts, n=16):
    p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, p)]


@pytest.fixture(scope="module", params=["llama", "qwen3", "mixtral"])
def tiny4(request, tmp_path_factory):
    """A 4-layer random checkpoint (the HF model beside it is the reference)."""
    arch = request.param
    cfg = {**TINY_CONFIGS[arch], "num_hidden_layers": 4}
    return build_tiny_checkpoint(arch, tmp_path_factory.mktemp(arch), config=cfg)


def test_off_by_default_and_unchanged_when_it_never_fires(tiny4):
    _, path = tiny4
    plain = LLM(str(path), dtype="float32", num_kv_blocks=128)
    assert plain.engine.early_exit is None and plain.engine.model.model.early_exit is None
    assert "early_exit" not in plain.engine.stats()
    want = _greedy(plain, _prompts(4))
    # margin = p1 - p2 reaches 1.0 only with p2 exactly 0 (a logit gap over ~100): never here
    llm = LLM(str(path), dtype="float32", num_kv_blocks=128, early_exit_config=NEVER)
    assert _greedy(llm, _prompts(4)) == want
    st = llm.engine.stats()["early_exit"]
    assert st["steps"] > 0 and st["exited"] == 0 and st["mean_layers"] == 4.0
    # ... and the same check has teeth: exiting early does change these tokens
    always = LLM(str(path), dtype="float32", num_kv_blocks=128, early_exit_config=ALWAYS)
    assert _greedy(always, _prompts(4)) != want


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


@pytest.mark.parametrize("native", [True, False])
def test_always_exiting_is_the_truncated_model_with_kv_from_the_exit_state(tiny4, native):
    hf, path = tiny4
    exit_after, bs = 1, 64
    llm = LLM(str(path), dtype="float32", block_size=bs, num_kv_blocks=16,
              native_decode=native, early_exit_config=ALWAYS)
    engine = llm.engine
    prompt, n = [1, 17, 99, 4, 250, 33, 8, 61, 5], 12  # prompt + output within one block
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                       "r")
    table, outs = [], []
    while engine.has_unfinished_requests():
        outs = engine.step() or outs
        for seq in engine.scheduler.running:
            table = list(seq.block_table) or table
    gen = outs[-1].outputs[0].token_ids
    assert len(gen) == n
    assert engine.stats()["early_exit"] == {"steps": n - 1, "exited": n - 1,
                                            "mean_layers": exit_after + 1.0}
    ids = torch.tensor([prompt + gen[:-1]])
    P = len(prompt)
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True, use_cache=False)
        h_exit = out.hidden_states[exit_after + 1][0]  # after layer 1, before the final norm
        trunc = hf.lm_head(hf.model.norm(h_exit))
    # the first token comes from the prompt's (full) pass, every later one from layer 1's
    assert gen[0] == int(out.logits[0, P - 1].argmax())
    assert gen[1:] == trunc[P:].argmax(-1).tolist()
    if native:
        assert engine.model.model._plan, "the native decode plan should cover this model"
    # the decoded tokens' K/V in the skipped layers: the exit state's projections
    dec = torch.arange(P, P + n - 1)  # positions of the tokens fed back (decode rows)
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in dec.tolist()])
    cos, sin = hf.model.rotary_emb(h_exit[None], dec[None])
    cos, sin = cos[0][:, None], sin[0][:, None]
    for j in range(exit_after + 1, 4):
        layer, attn = hf.model.layers[j], engine.model.model.layers[j].self_attn
        heads, d = attn.num_kv_heads, attn.head_dim
        with torch.no_grad():
            x = layer.input_layernorm(h_exit[dec])
            k = layer.self_attn.k_proj(x).view(-1, heads, d)
            v = layer.self_attn.v_proj(x).view(-1, heads, d)
            if hasattr(layer.self_attn, "k_norm"):
                k = layer.self_attn.k_norm(k)
            k = k * cos + _rotate_half(k) * sin
        got_k = attn.kv_cache.k.view(-1, heads, d)[slots]
        got_v = attn.kv_cache.v.view(-1, heads, d)[slots]
        torch.testing.assert_close(got_k, k, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_v, v, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kv", ["auto", "int8"])
@pytest.mark.parametrize("cfg", [ALWAYS, {"exit_layers": "every 1", "threshold": 0.05,
                                          "confidence": "margin"}])
def test_native_and_module_paths_agree(tiny4, cfg, kv):
    """Also with an int8 KV cache, whose skipped layers get the exit state's K/V quantized
    as the attention writes them."""
    _, path = tiny4
    got = {}
    for native in (True, False):
        llm = LLM(str(path), dtype="float32", num_kv_blocks=128, native_decode=native,
                  early_exit_config=cfg, kv_cache_dtype=kv)
        got[native] = (_greedy(llm, _prompts(4)), llm.engine.stats()["early_exit"])
    assert got[True] == got[False]


@pytest.mark.parametrize("bad, match", [
    ({"threshold": 0}, "threshold must be a number in"),
    ({"threshold": 1.5}, "threshold must be a number in"),
    ({"threshold": True}, "threshold must be a number in"),
    ({"confidence": "entropy"}, "confidence must be one of softmax, margin"),
    ({"exit_layers": []}, "non-empty list"),
    ({"exit_layers": [-1]}, "non-empty list"),
    ({"exit_layers": "every 0"}, "every N"),
    ({"exit_layers": "some"}, "every N"),
    ({"layers": [1]}, "unknown key"),
])
def test_bad_configs_are_refused_by_name(bad, match):
    with pytest.raises(ValueError, match=match):
        EarlyExitConfig.from_dict(bad)
    from sparsa.config import engine_config

    with pytest.raises(ValueError, match=match):
        engine_config("m", early_exit_config=bad)


def test_layers_are_checked_against_the_model(tmp_path):
    cfg = EarlyExitConfig(exit_layers="every 2")
    assert cfg.layers_for(7) == [1, 3, 5]
    assert EarlyExitConfig(exit_layers=[3, 1, 1]).exit_layers == [1, 3]
    _, path = build_tiny_checkpoint("llama", tmp_path / "llama")  # 2 layers
    with pytest.raises(ValueError, match=r"exit_layers \[1\] out of range.*2 layers"):
        LLM(str(path), early_exit_config={"exit_layers": [0, 1]})
    with pytest.raises(ValueError, match="leaves no layer"):
        LLM(str(path), early_exit_config={"exit_layers": "every 2"})


def test_deepseek_mla_and_speculation_are_refused(tmp_path):
    _, path = build_tiny_checkpoint("deepseek_v2", tmp_path / "ds")
    with pytest.raises(ValueError, match=r"MLAttention.*DeepSeek-V2's multi-head latent"):
        LLM(str(path), early_exit_config={"exit_layers": [0]})
    with pytest.raises(ValueError, match="cannot be combined with speculative_config"):
        LLM("m", early_exit_config={"exit_layers": [0]},
            speculative_config={"method": "ngram"})


def test_command_line_flag():
    from sparsa.cli import build_parser, engine_kwargs
    from sparsa.config import engine_config

    args = build_parser().parse_args(
        ["generate", "m", "--early-exit-config", '{"exit_layers": [1], "threshold": 0.8}'])
    ee = engine_config("m", **engine_kwargs(args)).early_exit
    assert (ee.exit_layers, ee.threshold, ee.confidence) == ([1], 0.8, "softmax")


def test_tinymoe_mid_threshold_runs_and_reports():
    if not TINYMOE.exists():
        pytest.skip(f"{TINYMOE} not found (set SPARSA_SHARED)")
    llm = LLM(str(TINYMOE), early_exit_config={"exit_layers": "every 1", "threshold": 0.6})
    out = llm.generate(["Once upon a time", "The little dog"],
                       SamplingParams(temperature=0, max_tokens=48))
    assert all(o.outputs[0].token_ids for o in out)
    st = llm.engine.stats()["early_exit"]
    assert st["steps"] > 0 and 0 < st["exited"] <= st["steps"]
    assert 1.0 <= st["mean_layers"] < 4.0
