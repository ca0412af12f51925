"""A model whose weights would not fit the device's available memory: an MoE checkpoint
keeps its experts on disk (expert_memory="auto"); anything else gets a clear error before
any weight is allocated; `when_too_large` chooses."""

from __future__ import annotations

import logging

import pytest

from sparsa import LLM, SamplingParams
from sparsa.config import ModelConfig
from sparsa.loader import model_loader
from tests.tiny_models import build_tiny_checkpoint

PROMPTS = [[1, 5, 9, 33, 7], list(range(1, 30))]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return build_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("moe"))[1]


@pytest.fixture
def tight(monkeypatch):
    """The device has 64 KiB available (the tiny models need megabytes)."""
    monkeypatch.setattr(model_loader, "_available_bytes", lambda device: 64 << 10)


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_moe_that_does_not_fit_offloads_its_experts(moe, tight, caplog):
    with caplog.at_level(logging.WARNING, logger="sparsa.loader.model_loader"):
        llm = LLM(str(moe))
    assert "keeping the routed experts on disk" in caplog.text
    assert "GiB available" in caplog.text
    state = llm.engine.model.offload  # offloaded, budgeted by what is really free
    assert 0 < state.budget_bytes <= state.total_expert_bytes
    # a host tier (host_memory='auto') only when the device is a GPU
    assert (state.host is None) == (llm.engine.device.type == "cpu")
    ref = LLM(str(moe), when_too_large="ignore")
    assert not hasattr(ref.engine.model, "offload")
    assert _tokens(llm) == _tokens(ref)


def test_errors_when_offloading_cannot_help_or_is_refused(moe, tmp_path, tight):
    with pytest.raises(MemoryError, match="pass expert_memory"):
        LLM(str(moe), when_too_large="error")
    dense = build_tiny_checkpoint("llama", tmp_path / "dense")[1]
    with pytest.raises(MemoryError, match=r"weights take .* GiB in torch.float32"):
        LLM(str(dense))
    with pytest.raises(MemoryError, match="smaller model"):  # dummy weights: no disk copy
        LLM("mixtral-mini", load_format="dummy")
    # an explicit budget is the user's choice: no check
    assert LLM(str(moe), expert_memory="50%").engine.model.offload.budget_bytes > 0


def test_fitting_models_are_untouched(moe):
    assert not hasattr(LLM(str(moe)).engine.model, "offload")


def test_bad_value():
    with pytest.raises(ValueError, match="when_too_large must be one of"):
        ModelConfig("m", when_too_large="swap")


def test_quantized_model_is_sized_in_its_quantized_form(moe, monkeypatch, capsys):
    """The check counts the bytes the model runs in: with -q int8 the tiny MoE fits a
    device that its fp32 weights do not (the load streams into int8, never holding the
    fp32 model); when offloading is chosen, stdout says so, not only the log."""
    import torch

    from sparsa.loader.quantized_load import final_form_bytes

    hf = model_loader.resolve_model(ModelConfig(str(moe))).hf_config
    int8 = ModelConfig(str(moe), quantization="int8").quant_config()
    fp32_bytes, routed = final_form_bytes(hf, torch.float32, ModelConfig(str(moe)).quant_config())
    int8_bytes, _ = final_form_bytes(hf, torch.float32, int8)
    assert routed and int8_bytes < 0.6 * fp32_bytes  # embedding and RoPE tables stay fp32
    avail = (int8_bytes + fp32_bytes) // 2
    monkeypatch.setattr(model_loader, "_available_bytes", lambda device: avail)
    llm = LLM(str(moe), quantization="int8")
    assert not hasattr(llm.engine.model, "offload")
    from sparsa.layers.quantization import module_bytes

    assert module_bytes(llm.engine.model) == int8_bytes  # the estimate is exact
    assert "OFFLOADING" not in capsys.readouterr().out
    off = LLM(str(moe), quantization="none")
    assert hasattr(off.engine.model, "offload")
    out = capsys.readouterr().out
    assert "OFFLOADING" in out and "keeping the routed experts on disk" in out
