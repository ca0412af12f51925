"""Synthetic routing traces with some structure (token affinity, layer-to-layer carry), the
information-rule scramble, and the tiny MoE checkpoints the offload engine tests share."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sparsa.offload.lab.trace import Trace, make_trace
from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint

DEEPSEEK_V2 = dict(
    architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", hidden_size=64,
    intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    vocab_size=256, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    pad_token_id=0, tie_word_embeddings=False, rms_norm_eps=1e-6, kv_lora_rank=32,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
    num_experts_per_tok=2, moe_intermediate_size=32, q_lora_rank=None,
    first_k_dense_replace=1, n_shared_experts=1, topk_method="greedy",
)


def moe_checkpoint(name: str, root: Path) -> Path:
    """A tiny saved checkpoint of `name` (mixtral, qwen2_moe, deepseek_v2) with at least two
    MoE layers, so gate lookahead has a next layer to predict."""
    cfg = {"deepseek_v2": DEEPSEEK_V2, "mixtral": None,
           "qwen2_moe": dict(TINY_CONFIGS["qwen2_moe"], mlp_only_layers=[],
                             num_hidden_layers=3)}[name]
    return build_tiny_checkpoint(name, root, config=cfg)[1]


def assert_rebuilt_after(damages, logger: str, load, run, ref, caplog):
    """Each of `damages` to an expert store, then `load()` (an LLM): a warning from `logger`,
    a rebuilt store, outputs run(llm) == ref, no temporaries left. Returns the last LLM."""
    for damage in damages:
        damage()
        with caplog.at_level(logging.WARNING, logger=logger):
            caplog.clear()
            again = load()
        assert "rebuilding" in caplog.text
        store = again.engine.model.offload.store
        assert store.built
        assert run(again) == ref
    assert not list(store.path.glob(".*.tmp"))
    return again


def assert_ignores_unknowns(pred, test: Trace, lookahead: int, t: int = 17,
                            tol: float = 0.0) -> None:
    """The information rule: `pred`'s scores for tokens up to t do not change when token t's
    current and later layers and every later token are scrambled (`tol`: float noise)."""
    from sparsa.offload.lab.predictors import History

    for layer in range(test.num_layers):
        base = pred.scores(History(test, layer, lookahead))
        after = pred.scores(History(scrambled(test, t, layer, lookahead), layer, lookahead))
        np.testing.assert_allclose(after[: t + 1], base[: t + 1], rtol=tol, atol=tol)


def scrambled(test: Trace, t: int, layer: int, lookahead: int) -> Trace:
    """`test` with what a prediction for (token t, layer) must not see changed: token t from
    layer - lookahead + 1 on, and every later token."""
    ex = test.experts.copy()
    first = max(0, layer - lookahead + 1)
    ex[t, first:] = (ex[t, first:] + 3) % test.num_experts
    ex[t + 1:] = (ex[t + 1:] + 5) % test.num_experts
    changed = make_trace(ex, test.prompts, test.tokens, num_experts=test.num_experts)
    changed.token_ids = test.token_ids
    return changed


def synthetic(n_prompts: int = 6, length: int = 12, layers: int = 4, experts: int = 8,
              k: int = 2, seed: int = 0, vocab: int = 10) -> Trace:
    # the structure (each token's favourite expert per layer) is the same for every seed, so
    # a trace drawn with one seed trains predictors for another
    favourite = np.random.default_rng(12345).integers(0, experts, size=(vocab, layers))
    rng = np.random.default_rng(seed)
    rows, prompts, tokens = [], [], []
    for p in range(n_prompts):
        for _ in range(length):
            tok = int(rng.integers(vocab))
            ex = np.empty((layers, k), dtype=np.int64)
            for j in range(layers):
                first = favourite[tok, j] if rng.random() < 0.7 else rng.integers(experts)
                rest = rng.choice([e for e in range(experts) if e != first], k - 1,
                                  replace=False)
                ex[j] = [first, *rest]
            rows.append(ex)
            prompts.append(100 + p)
            tokens.append(f"t{tok}")
    tr = make_trace(np.stack(rows), prompts, tokens, num_experts=experts)
    tr.token_ids = np.asarray([int(t[1:]) for t in tokens])  # one vocabulary for all seeds
    tr.vocab = {f"t{i}": i for i in range(vocab)}
    return tr


def bf16_copy(src: Path, dst: Path) -> Path:
    """The checkpoint at `src` with every floating tensor rounded to bf16."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v
                       for k, v in load_file(f).items()}, dst / f.name, metadata={"format": "pt"})
        elif f.name == "config.json":
            cfg = json.loads(f.read_text())
            cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
            (dst / f.name).write_text(json.dumps(cfg))
        elif f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst
