"""The streamed quantized load (checkpoint tensors quantized into place one by one, no
full-precision model) gives bit-for-bit the model that building in full precision and then
quantizing gives: every parameter and buffer, on several architectures, fp32 and bf16
checkpoints, and dummy weights."""

from __future__ import annotations

import pytest
import torch

from sparsa.config import ModelConfig
from sparsa.layers.quantization import rows as streaming  # where row blocks are written
from sparsa.loader.model_loader import load_model
from sparsa.loader.safetensors_reader import CheckpointError
from tests.offload.helpers import DEEPSEEK_V2
from tests.tiny_models import build_tiny_checkpoint

CPU = torch.device("cpu")
ARCHS = {
    "mixtral": None,
    "llama": None,
    "llama-tied-rope-llama3": None,  # the tied LM head is quantized from the embedding
    "qwen2_moe": None,  # shared expert, its sigmoid gate stays full precision
    "deepseek_v2": DEEPSEEK_V2,
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, cfg in ARCHS.items():
        arch = "deepseek_v2" if name == "deepseek_v2" else name
        model, out[name] = build_tiny_checkpoint(arch, root / name, config=cfg)
        if name == "mixtral":  # the same weights saved in bf16, as hub checkpoints are
            model.to(torch.bfloat16).save_pretrained(root / "mixtral-bf16")
            out["mixtral-bf16"] = root / "mixtral-bf16"
    return out


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if v is not None}


def _assert_same(mc: ModelConfig) -> None:
    ref, _, _ = load_model(mc, CPU, streamed=False)
    got, _, _ = load_model(mc, CPU, streamed=True)
    assert got.quant_stats == ref.quant_stats
    assert [(n, type(m)) for n, m in got.named_modules()] == \
        [(n, type(m)) for n, m in ref.named_modules()]
    a, b = _state(ref), _state(got)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k
    for n, m in got.named_modules():
        assert not hasattr(m, "_stream"), n  # the loading state is gone
        for attr in ("w8a8", "bf16_gemm", "group_size", "output_sizes"):
            if hasattr(ref.get_submodule(n), attr):
                assert getattr(m, attr) == getattr(ref.get_submodule(n), attr), (n, attr)


@pytest.mark.parametrize("method", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("name", [*ARCHS, "mixtral-bf16"])
def test_streamed_equals_build_then_quantize(checkpoints, name, method, monkeypatch):
    # blocks of a few rows, so a weight is quantized in several pieces as large ones are
    monkeypatch.setattr(streaming, "_ROW_BLOCK_ELEMS", 1000)
    _assert_same(ModelConfig(str(checkpoints[name]), quantization=method,
                             quantization_group_size=32))


def test_automatic_bf16_form_of_a_bf16_checkpoint(checkpoints):
    from sparsa import kernels

    if not kernels.available():
        pytest.skip("the automatic bf16 weight form needs the native kernels")
    mc = ModelConfig(str(checkpoints["mixtral-bf16"]))
    assert mc.quant_config(torch.bfloat16, CPU).method == "bf16"
    _assert_same(mc)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("name", ["mixtral", "llama-tied-rope-llama3", "deepseek_v2"])
def test_streamed_dummy_weights_equal(checkpoints, name, method):
    _assert_same(ModelConfig(str(checkpoints[name]), quantization=method,
                             load_format="dummy", seed=3))


def test_streamed_load_checks_the_checkpoint(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    src = checkpoints["mixtral"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    name = next(n for n in tensors if "experts.1.w2" in n)
    del tensors[name]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors: .*experts\.down\.1"):
        load_model(ModelConfig(str(bad), quantization="int8"), CPU)
    q = next(n for n in tensors if n.endswith("q_proj.weight"))
    tensors[q] = tensors[q][:, :-1].contiguous()
    tensors[name] = torch.zeros(64, 96)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_model(ModelConfig(str(bad), quantization="int4"), CPU)


def test_a_quantized_module_not_built_for_streaming_refuses_tensors():
    from sparsa.layers.linear import Linear
    from sparsa.layers.quantization import Int8Linear

    lin = Linear(64, 32)
    lin.weight.data.normal_()
    m = Int8Linear.from_linear(lin)
    with pytest.raises(ValueError, match="not allocated for streamed loading"):
        m.load_shard("weight", torch.zeros(32, 64), None)

