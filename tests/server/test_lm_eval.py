"""lm-evaluation-harness scores a small multiple-choice task through `local-completions`
against the live server, and every log-likelihood it gets matches transformers' on the
same weights within 1e-4. The task is written at run time from ../shared/corpora
(tinystories: a sentence's start, its true ending and three endings of other sentences),
or from a few built-in sentences where ../shared is absent."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from sparsa.tokenizer import shared_dir
from tests.server.conftest import API_KEY, MODEL

lm_eval = pytest.importorskip("lm_eval", reason="pip install lm-eval (the [test] extra)")

BUILT_IN = ["The little dog ran to the park and played with a red ball.",
            "Tom wanted to eat a big cake, but his mother said no.",
            "The sun was warm and the birds sang in the tall green trees.",
            "Lily found a shiny stone near the river and took it home.",
            "The old man sat on the bench and fed the hungry ducks.",
            "Mia painted a bright yellow sun on the wall of her room."]


def _sentences(n: int) -> list[str]:
    path = shared_dir() / "corpora" / "tinystories_val.txt"
    if not path.exists():
        return BUILT_IN[:n]
    text = path.read_text(encoding="utf-8", errors="ignore")[:200_000]
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    ok = [s for s in found if 40 <= len(s) <= 90 and s.isascii() and " " in s[10:]]
    return random.Random(0).sample(ok, n)


def _write_task(folder) -> None:
    sents = _sentences(6)
    rng = random.Random(1)
    docs = []
    for i, s in enumerate(sents):
        cut = s.index(" ", len(s) // 2)
        ending = lambda t: t[t.index(" ", len(t) // 2):]  # noqa: E731
        others = [ending(t) for j, t in enumerate(sents) if j != i]
        choices = [s[cut:], *rng.sample(others, 3)]
        docs.append({"context": s[:cut], "choices": choices, "gold": 0})
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "sparsa_endings.yaml").write_text(
        "task: sparsa_endings\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\n"
        "metric_list:\n  - metric: acc\n")


def test_lm_eval_loglikelihoods_match_transformers(server, model_dir, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _write_task(tmp_path)
    args = dict(model=MODEL, base_url=server.url + "/v1/completions",
                tokenizer=str(model_dir), tokenizer_backend="huggingface",
                tokenized_requests=True, add_bos_token=True, num_concurrent=1,
                max_retries=1, batch_size=4)
    results = simple_evaluate(model="local-completions", model_args=args,
                              tasks=["sparsa_endings"], log_samples=True,
                              task_manager=TaskManager(include_path=str(tmp_path)))
    samples = results["samples"]["sparsa_endings"]
    assert len(samples) == 6 and "acc,none" in results["results"]["sparsa_endings"]

    lm = get_model("local-completions")(**args)  # lm-eval's own tokenization of each pair
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    compared = 0
    for s in samples:
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            got, _greedy = resp[0]
            ctx, cont = lm._encode_pair(context, continuation)
            ids = ctx + cont
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
            want = sum(logp[len(ctx) + i - 1, t].item() for i, t in enumerate(cont))
            assert float(got) == pytest.approx(want, abs=1e-4), (context, continuation)
            compared += 1
    assert compared == 24
