"""Medusa heads: `sparsa train-draft` trains them on a model's own answers and writes them
where `speculative_config={"method": "medusa", "model": DIR}` reads them; proposals from
them are verified like any other (lossless); bad head files fail at construction."""

from __future__ import annotations

import json

import pytest
import torch

from sparsa import LLM, SamplingParams
from sparsa.cli import main
from sparsa.spec.medusa import MedusaHeads
from sparsa.spec.train_draft import train
from tests.server.conftest import build_tiny_chat_model


def test_heads_learn_a_pattern_through_a_frozen_head():
    """Labels from a teacher of the same shape (random heads through the frozen LM head):
    trained heads recover most of them, untrained ones do not."""
    g = torch.Generator().manual_seed(0)
    H, V, N = 16, 12, 2000
    head_w = torch.randn(V, H, generator=g)
    hidden = torch.randn(N, H, generator=g)
    teacher = MedusaHeads(H, 2)
    with torch.no_grad():
        for layer in teacher.layers:
            layer.weight.copy_(torch.randn(H, H, generator=g))
        labels = (teacher(hidden) @ head_w.t()).argmax(-1).t()  # [N, 2]
    _, acc = train(hidden, labels, head_w, heads=2, epochs=40, lr=1e-2)
    assert min(acc) > 0.7, acc
    with torch.no_grad():
        pred = (MedusaHeads(H, 2)(hidden) @ head_w.t()).argmax(-1)
    assert (pred[0] == labels[:, 0]).float().mean() < 0.5


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return build_tiny_chat_model(tmp_path_factory.mktemp("chat"))


def test_train_draft_then_speculate_losslessly(chat_model, tmp_path, capsys):
    corpus = tmp_path / "text.txt"
    corpus.write_text(" ".join(f"Sentence number {i} tells of a cat and a dog at play."
                               for i in range(40)))
    out = tmp_path / "heads"
    rc = main(["train-draft", str(chat_model), "--out", str(out), "--corpus", str(corpus),
               "--prompts", "8", "--answer-tokens", "24", "--epochs", "2", "--heads", "2",
               "--dtype", "float32"])
    assert rc == 0 and "held-out top-1 accuracy per head" in capsys.readouterr().out
    cfg = json.loads((out / "medusa_config.json").read_text())
    assert cfg["num_heads"] == 2 and cfg["hidden_size"] == 64
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = ["abcabcabc", "hello there", "the cat"]
    want = [o.outputs[0].token_ids for o in LLM(str(chat_model), dtype="float32")
            .generate(prompts, p)]
    llm = LLM(str(chat_model), dtype="float32", speculative_config={
        "method": "medusa", "model": str(out), "num_speculative_tokens": 2,
        "adaptive": False})
    got = [llm.generate([q], p)[0].outputs[0].token_ids for q in prompts]
    assert got == want
    assert llm.engine.stats()["speculative"]["proposed"] > 0
    # a Medusa tree (the top-3 first guesses, the top-2 second ones after the best),
    # batched: still plain greedy decoding's tokens
    tree = LLM(str(chat_model), dtype="float32", speculative_config={
        "method": "medusa", "model": str(out), "adaptive": False,
        "token_tree": [[0], [1], [2], [0, 0], [0, 1], [1, 0]]})
    assert [o.outputs[0].token_ids for o in tree.generate(prompts, p)] == want
    assert tree.engine.stats()["speculative"]["proposed"] > 0
    with pytest.raises(ValueError, match="token_tree is 3 deep"):
        LLM(str(chat_model), speculative_config={"method": "medusa", "model": str(out),
                                                 "token_tree": [[0], [0, 0], [0, 0, 0]]})


def test_bad_heads_fail_at_construction(chat_model, tmp_path):
    with pytest.raises(ValueError, match="holds no Medusa heads"):
        LLM(str(chat_model), speculative_config={"method": "medusa", "model": str(tmp_path)})
    MedusaHeads(32, 2).save(tmp_path / "wrong", "x", 99)
    with pytest.raises(ValueError, match="trained for hidden size 32"):
        LLM(str(chat_model), speculative_config={"method": "medusa",
                                                 "model": str(tmp_path / "wrong")})
