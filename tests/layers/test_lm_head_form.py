"""The LM head's own weight form (`quantization_lm_head`): an int4 body with an int8 head,
or a full-precision head; the streamed load and build-then-quantize agree."""

from __future__ import annotations

import pytest
import torch

from sparsa import LLM
from sparsa.config import ModelConfig
from sparsa.engine.scoring import prompt_logits
from sparsa.layers.quantization.modules import Int4Linear, Int8Linear
from sparsa.loader.model_loader import load_model
from tests.tiny_models import build_tiny_checkpoint

PROMPT = [1, 7, 42, 99, 3]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("head"))[1]


@pytest.mark.parametrize("head,cls", [("int8", Int8Linear), ("none", torch.nn.Module),
                                      ("same", Int4Linear)])
def test_head_form(ckpt, head, cls):
    mc = ModelConfig(str(ckpt), dtype="float32", quantization="int4",
                     quantization_group_size=32, quantization_lm_head=head)
    streamed, _, _ = load_model(mc, torch.device("cpu"), streamed=True)
    after, _, _ = load_model(mc, torch.device("cpu"), streamed=False)
    for model in (streamed, after):
        assert isinstance(model.lm_head, cls)
        if head == "none":
            assert not isinstance(model.lm_head, (Int4Linear, Int8Linear))
        layer = model.model.layers[0]
        assert isinstance(layer.self_attn.qkv_proj, Int4Linear)
    ids = torch.tensor(PROMPT)
    with torch.inference_mode():
        a = streamed.compute_logits(streamed.model.embed_tokens(ids))
        b = after.compute_logits(after.model.embed_tokens(ids))
    torch.testing.assert_close(a, b)


def test_an_int8_head_is_closer_to_full_precision(ckpt):
    ref = prompt_logits(LLM(str(ckpt), dtype="float32").engine, PROMPT)

    def err(head: str) -> float:
        llm = LLM(str(ckpt), dtype="float32", quantization="int4",
                  quantization_group_size=32, quantization_lm_head=head)
        return float((prompt_logits(llm.engine, PROMPT) - ref).abs().mean())

    assert err("int8") < err("same")
