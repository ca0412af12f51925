"""Every architecture against transformers: prefill logits (fp32, <= 1e-4) and 32 greedy
tokens, on tiny random checkpoints the test builds and saves itself."""

from __future__ import annotations

import pytest
import torch

from sparsa import LLM, SamplingParams
from sparsa.engine.scoring import prompt_logits
from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint

ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf, path = build_tiny_checkpoint(request.param, path)
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=16)
    return request.param, hf, llm


def test_prefill_logits_match_transformers(pair):
    name, hf, llm = pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, hf.config.vocab_size, (40,), generator=g).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    ours = prompt_logits(llm.engine, ids)
    diff = (ours - ref).abs().max().item()
    assert diff <= ATOL, f"{name}: max abs diff {diff:.2e}"


def test_greedy_matches_transformers(pair):
    name, hf, llm = pair
    prompts = [[1, 17, 33, 4, 90, 5], [1, 200, 3, 3, 45, 91, 12, 7, 77, 8, 100, 9]]
    # No EOS on either side: min_new_tokens would mask EOS in transformers, changing argmax.
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        refs = [
            hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False,
                        pad_token_id=0)[0, len(p):].tolist()
            for p in prompts
        ]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for ref, out in zip(refs, outs):
        assert out.outputs[0].token_ids == ref, name
