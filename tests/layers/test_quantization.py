"""Weight-only quantization: schemes, modules (native and reference paths), whole model."""

from __future__ import annotations

import pytest
import torch

from sparsa import kernels
from sparsa.layers import quantization as qz
from sparsa.layers.linear import Linear
from sparsa.layers.moe import FusedExperts
from sparsa.layers.quantization import (
    Bf16Linear,
    Int4Linear,
    Int8Linear,
    QuantConfig,
    QuantizedExperts,
    dequantize_int4,
    dequantize_int8,
    module_bytes,
    quantize_int4,
    quantize_int8,
    quantize_model,
)
from sparsa.layers.quantization.matmul import cpu_has_bf16_dot

native = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable")


@pytest.fixture
def policy(monkeypatch):
    """Set the native-kernel row thresholds for one test (0: always the reference path);
    W8A8 only above `w8a8` rows (default: never)."""
    def set_rows(rows: int, w8a8: int = 1 << 30) -> None:
        monkeypatch.setattr(qz.matmul, "_policy",
                            {**dict.fromkeys(("int8", "int4", "bf16", "moe"), rows),
                             "w8a8": w8a8, "int4_bf16": 1 << 30})
    yield set_rows
    qz.matmul._policy = None


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_config_validation():
    assert QuantConfig("INT8").method == "int8"
    assert not QuantConfig(None).enabled
    with pytest.raises(ValueError, match="quantization method"):
        QuantConfig("int3")
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig("int4", group_size=48)
    with pytest.raises(ValueError, match="integer"):
        QuantConfig("int4", group_size=True)


def test_int8_error_bound():
    w = torch.randn(33, 70)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((dequantize_int8(q, s) - w).abs() <= s[:, None] / 2 + 1e-6).all()
    assert torch.equal(s, s.bfloat16().float())


@pytest.mark.parametrize("G", [32, 64, 128])
def test_int4_error_bound(G):
    w = torch.randn(17, 256)
    q, s, m = quantize_int4(w, G, clip_search=False)
    assert q.max() <= 15
    err = (dequantize_int4(q, s, m) - w).abs().reshape(17, -1, G)
    # half a step, plus the bf16 rounding of the group minimum
    assert (err <= (s * 0.5 + m.abs() * 2**-8 + 1e-6)[..., None]).all()
    q2, s2, m2 = quantize_int4(w, G, clip_search=True)
    assert (dequantize_int4(q2, s2, m2) - w).square().sum() <= \
        (dequantize_int4(q, s, m) - w).square().sum() + 1e-6


def _linear(k: int, n: int, bias: bool) -> Linear:
    lin = Linear(k, n, bias=bias)
    lin.weight.data.normal_()
    if bias:
        lin.bias.data.normal_()
    return lin


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("T", [1, 2, 3, 8, 33])
def test_linear_paths_agree(cls, T, policy):
    lin = _linear(200, 77, bias=True)
    m = cls.from_linear(lin)
    x = torch.randn(T, 200)
    ref = x @ m.dequantize().t() + m.bias
    policy(0)
    y_ref = m(x)
    assert _rel(y_ref, ref) < 1e-5
    if kernels.available():
        policy(64)
        y = m(x)
        assert y.shape == (T, 77)
        assert _rel(y, ref) < 2e-2  # int8 activation quantization inside the kernel
    # leading dims and a bf16 input on the reference path
    assert m(x.reshape(1, T, 200)).shape == (1, T, 77)


def test_linear_fallback_without_kernels(monkeypatch, policy):
    monkeypatch.setenv("SPARSA_KERNELS", "0")
    policy(64)
    for cls in (Int8Linear, Int4Linear):
        m = cls.from_linear(_linear(128, 40, bias=False))
        x = torch.randn(2, 128)
        ref = x @ m.dequantize().t()
        assert _rel(m(x), ref) < 1e-2  # int8 fallback: torch's bf16 kernel


def _experts(E=4, H=64, inter=72) -> FusedExperts:
    ex = FusedExperts(E, H, inter)
    ex.w13.data.normal_(std=0.1)
    ex.w2.data.normal_(std=0.1)
    return ex


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("T", [1, 3, 33])
def test_quantized_experts_match_dequantized(method, T, policy):
    ex = _experts()
    qe = QuantizedExperts(ex, QuantConfig(method, group_size=32))
    deq = _experts()
    for e in range(ex.num_experts):
        deq.w13.data[e] = qe.dequantize("w13", e)
        deq.w2.data[e] = qe.dequantize("w2", e)
    x = torch.randn(T, 64)
    w, ids = torch.rand(T, 2).softmax(-1), torch.stack([torch.randperm(4)[:2] for _ in range(T)])
    ref = deq(x, w, ids)
    policy(0)
    assert _rel(qe(x, w, ids), ref) < 1e-5
    if kernels.available():
        policy(64)
        assert _rel(qe(x, w, ids), ref) < 3e-2
        # grouped path with native per-expert GEMMs
        assert _rel(super(QuantizedExperts, qe).forward(x, w, ids), ref) < 3e-2


def test_quantize_model_stats_and_bytes():
    model = torch.nn.Module()
    model.proj = _linear(128, 64, bias=False)
    model.lm_head = _linear(128, 256, bias=False)
    stats = quantize_model(model, QuantConfig("int8", skip_lm_head=True))
    assert isinstance(model.proj, Int8Linear) and isinstance(model.lm_head, Linear)
    assert stats["num_linear"] == 1 and stats["skipped"] == ["lm_head"]
    assert stats["bytes_after"] < stats["bytes_before"] / 3
    assert stats["model_bytes_after"] == module_bytes(model)
    with pytest.raises(TypeError):
        quantize_model(model, "int8")


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_tiny_moe_model_logits_close(method, tmp_path):
    from sparsa import LLM
    from sparsa.engine.scoring import prompt_logits
    from tests.tiny_models import build_tiny_checkpoint

    _, path = build_tiny_checkpoint("mixtral", tmp_path / "m")
    ids = list(range(3, 40))
    ref = prompt_logits(LLM(str(path), dtype="float32").engine, ids)
    llm = LLM(str(path), dtype="float32", quantization=method, quantization_group_size=32)
    ours = prompt_logits(llm.engine, ids)
    diff = (ours - ref).abs().max().item()
    print(f"{method}: max |logit diff| = {diff:.4f} (logit range {ref.abs().max():.2f})")
    assert diff < (0.05 if method == "int8" else 0.5) * ref.abs().max().item()


@pytest.mark.parametrize("T", [1, 3, 33])
def test_bf16_linear_and_experts_are_fp32_math_of_bf16_weights(T, policy):
    lin = _linear(100, 77, bias=True)
    m = Bf16Linear.from_linear(lin)
    assert m.weight_bf16.dtype == torch.bfloat16 and m.weight_bf16.shape == (77, 104)
    w = (lin.weight.data.t() if lin.transposed else lin.weight.data).to(torch.bfloat16).float()
    assert torch.equal(m.dequantize(), w)
    x = torch.randn(T, 100)
    ref = x @ w.t() + lin.bias.data
    for rows in (0, 64):  # widened tiles + fp32 GEMM, then the native kernel
        policy(rows)
        assert _rel(m(x), ref) < 1e-6
    ex = _experts(H=64, inter=36)
    qe = QuantizedExperts(ex, QuantConfig("bf16"))
    deq = _experts(H=64, inter=36)
    deq.w13.data.copy_(ex.w13.data.to(torch.bfloat16).float())
    deq.w2.data.copy_(ex.w2.data.to(torch.bfloat16).float())
    wts, ids = torch.rand(T, 2).softmax(-1), torch.stack([torch.randperm(4)[:2] for _ in range(T)])
    xe = torch.randn(T, 64)
    ref = deq(xe, wts, ids)
    for rows in (0, 64):
        policy(rows)
        assert _rel(qe(xe, wts, ids), ref) < 1e-6
    assert module_bytes(qe) == 2 * (4 * 72 * 64 + 4 * 64 * 40)  # bf16, inter padded to 40


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_bf16_checkpoint_keeps_bf16_weights_and_matches_transformers(arch, tmp_path):
    """A bf16 checkpoint on CPU is held in bf16 by default (half the bytes per token) and its
    logits still match transformers computing in fp32 on the same (upcast) weights."""
    from transformers import AutoModelForCausalLM

    from sparsa import LLM, SamplingParams
    from sparsa.engine.scoring import prompt_logits
    from tests.tiny_models import build_tiny_checkpoint

    hf, _ = build_tiny_checkpoint(arch, tmp_path / "fp32")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    # the reference: the bf16 checkpoint upcast at load (fresh fp32 rotary tables)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    ids = list(range(3, 40))
    # fp32 math on the bf16 weights: lossless (bf16_prefill=None would round prefill
    # activations to bf16 on CPUs with bf16 dot products; see the next test)
    llm = LLM(str(tmp_path / "bf16"), bf16_prefill=False)
    model = llm.engine.model
    assert any(isinstance(m, Bf16Linear) for m in model.modules())
    assert any(isinstance(m, QuantizedExperts) and m.method == "bf16" for m in model.modules())
    ours = prompt_logits(llm.engine, ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() < 1e-4
    up = LLM(str(tmp_path / "bf16"), quantization="none")  # the old form: upcast to fp32
    assert not any(isinstance(m, Bf16Linear) for m in up.engine.model.modules())
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    assert llm.generate([ids], sp)[0].outputs[0].token_ids == \
        up.generate([ids], sp)[0].outputs[0].token_ids
    # the default: bf16 prefill GEMMs where the CPU has them, close to the fp32 reference
    auto = LLM(str(tmp_path / "bf16"))
    flags = {m.bf16_gemm for m in auto.engine.model.modules() if hasattr(m, "bf16_gemm")}
    assert flags == {cpu_has_bf16_dot()}
    diff = (prompt_logits(auto.engine, ids) - ref).abs().max().item()
    assert diff < (5e-2 if cpu_has_bf16_dot() else 1e-4)


# ---- W8A8: int8 activations x int8 weights through torch._int_mm ----------------------------

@pytest.mark.parametrize("T,K,kp", [(1, 128, 128), (5, 200, 256), (40, 1000, 1024)])
def test_row_quantizer_native_equals_reference(T, K, kp):
    from sparsa.layers.quantization.matmul import quantize_rows_int8_reference

    x = torch.randn(T, K) * torch.logspace(-3, 2, T)[:, None]
    x[0] = 0.0  # an all-zero row gets scale 0 and zeros, not NaN
    q_ref, s_ref = quantize_rows_int8_reference(x, kp)
    assert q_ref.shape == (T, kp) and (q_ref[:, K:] == 0).all() and s_ref[0] == 0
    assert ((q_ref[:, :K].float() * s_ref[:, None] - x).abs() <= s_ref[:, None] / 2 + 1e-6).all()
    if kernels.available():
        from sparsa.kernels import ops

        q, s = ops.quantize_rows_int8(x, kp)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
        acc = torch.randint(-10**6, 10**6, (T, 48), dtype=torch.int32)
        cs = torch.rand(48)
        torch.testing.assert_close(ops.scale_int32_rows(acc, s, cs),
                                   acc.float() * s[:, None] * cs[None, :], rtol=1e-6, atol=0)
        with pytest.raises(ValueError, match="features"):
            ops.quantize_rows_int8(x, K - 1)


@pytest.mark.parametrize("T", [9, 33, 130])
def test_int8_linear_w8a8_path(T, policy):
    lin = _linear(300, 70, bias=True)
    x = torch.randn(T, 300)
    exact = Int8Linear.from_linear(lin, w8a8=False)
    ref = x @ exact.dequantize().t() + exact.bias
    policy(0, w8a8=8)
    assert _rel(exact(x), ref) < 1e-5  # switch off: exact activations
    m = Int8Linear.from_linear(lin)  # w8a8 on by default
    y = m(x)
    assert y.shape == (T, 70)
    assert 0 < _rel(y, ref) < 2e-2  # per-row activation rounding, nothing else


def test_w8a8_without_native_kernels_matches_native(monkeypatch, policy):
    """The pure-PyTorch quantizer and scaling give the same numbers as the native ones."""
    if not kernels.available():
        pytest.skip("native kernels unavailable")
    m = Int8Linear.from_linear(_linear(256, 64, bias=False))
    x = torch.randn(20, 256)
    policy(0, w8a8=8)
    native_y = m(x)
    monkeypatch.setenv("SPARSA_KERNELS", "0")
    torch.testing.assert_close(m(x), native_y, rtol=1e-6, atol=1e-6)


def test_quantized_experts_w8a8(policy):
    ex = _experts(E=4, H=128, inter=96)
    x = torch.randn(64, 128)
    w = torch.rand(64, 2).softmax(-1)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(64)])
    policy(0, w8a8=8)
    exact = QuantizedExperts(ex, QuantConfig("int8", int8_activations="none"))(x, w, ids)
    fast = QuantizedExperts(ex, QuantConfig("int8"))(x, w, ids)
    assert 0 < _rel(fast, exact) < 3e-2


def test_int8_activations_switch_validated():
    with pytest.raises(ValueError, match="int8_activations"):
        QuantConfig("int8", int8_activations="static")


@pytest.mark.parametrize("E,k,T", [(4, 2, 40), (16, 4, 33)])
def test_native_moe_w8a8_matches_grouped_w8a8(E, k, T, policy):
    """The one-call W8A8 MoE (batches past the fused decode kernel) computes what the
    per-expert Python path computes with the same int8 GEMMs."""
    if not kernels.available():
        pytest.skip("native kernels unavailable")
    ex = _experts(E=E, H=128, inter=96)
    qe = QuantizedExperts(ex, QuantConfig("int8"))
    x = torch.randn(T, 128)
    w = torch.rand(T, k).softmax(-1)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    policy(0, w8a8=0)  # every batch: the native W8A8 call; every expert GEMM: W8A8
    qz.matmul._policy["moe_fused_rows"] = 0
    native = qe(x, w, ids)
    grouped = super(QuantizedExperts, qe).forward(x, w, ids)  # per-expert int8_matmul (W8A8)
    assert _rel(native, grouped) < 1e-3
    exact = QuantizedExperts(ex, QuantConfig("int8", int8_activations="none"))
    assert _rel(native, exact(x, w, ids)) < 3e-2
    with pytest.raises(ValueError, match="topk_ids"):
        qe(x, w, ids + E)


def test_int4_bf16_gemm_path(monkeypatch, policy):
    """On CPUs with bf16 dot products, int4 rows past the threshold run a bf16 GEMM: close to
    the fp32 result (bf16 rounding of activations and outputs), switchable by env."""
    m = Int4Linear.from_linear(_linear(256, 96, bias=True))
    x = torch.randn(80, 256)
    ref = x @ m.dequantize().t() + m.bias
    policy(0)
    qz.matmul._policy["int4_bf16"] = 64
    monkeypatch.setenv("SPARSA_BF16_GEMM", "1")
    y = m(x)
    assert y.dtype == torch.float32 and 0 < _rel(y, ref) < 1e-2
    assert _rel(m(x[:64]), ref[:64]) < 1e-5  # at or below the threshold: fp32 GEMM
    monkeypatch.setenv("SPARSA_BF16_GEMM", "0")
    assert _rel(m(x), ref) < 1e-5


def test_batched_int8_moe_with_few_rows_per_expert_uses_the_fused_kernel():
    """Past the decode threshold but with few rows per expert, the fused kernel runs (it
    reads each weight once for all rows); many rows per expert switch to W8A8 GEMMs."""
    if not kernels.available():
        pytest.skip("native kernels unavailable")
    from sparsa.kernels import ops

    qe = QuantizedExperts(_experts(E=8, H=128, inter=96), QuantConfig("int8"))
    x = torch.randn(24, 128)
    w = torch.rand(24, 2).softmax(-1)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(24)])
    fused = ops.moe_int8(x, qe.w13_q, qe.w13_s, qe.w2_q, qe.w2_s, ids, w)
    assert torch.equal(qe(x, w, ids), fused)  # 48 rows over 8 experts: 6 per expert
    xl = torch.randn(160, 128)
    wl = torch.rand(160, 2).softmax(-1)
    idl = torch.stack([torch.randperm(8)[:2] for _ in range(160)])
    w8a8 = ops.moe_w8a8(xl, qe.w13_q, qe.w13_s, qe.w2_q, qe.w2_s, idl, wl)
    assert torch.equal(qe(xl, wl, idl), w8a8)  # 40 rows per expert


def test_batched_int4_moe_with_few_rows_per_expert_uses_the_fused_kernel():
    """int4 past the decode threshold: few rows per expert run the fused kernel (batched
    decode, batch invariant with batch 1); many rows per expert the grouped matmuls."""
    if not kernels.available():
        pytest.skip("native kernels unavailable")
    from sparsa.kernels import ops

    qe = QuantizedExperts(_experts(E=8, H=128, inter=96), QuantConfig("int4", group_size=32))
    x = torch.randn(24, 128)
    w = torch.rand(24, 2).softmax(-1)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(24)])
    assert qe.moe_path(x, ids) == "fused"  # 48 rows over 8 experts: 6 per expert
    fused = ops.moe_int4(x, qe.w13_q, qe.w13_sm, qe.w2_q, qe.w2_sm, 32, ids, w)
    out = qe(x, w, ids)
    assert torch.equal(out, fused)
    assert torch.equal(out[3:4], qe(x[3:4], w[3:4], ids[3:4]))  # as at batch 1
    idl = torch.stack([torch.randperm(8)[:2] for _ in range(160)])
    assert qe.moe_path(torch.randn(160, 128), idl) == "grouped"  # 40 rows per expert


def test_bf16_prefill_is_an_opt_in_bf16_gemm(monkeypatch):
    """bf16 weights keep fp32 math unless bf16_prefill asks for bf16 GEMMs on prefill-sized
    batches; decode-sized ones never change."""
    from sparsa.layers.quantization.modules import Bf16Linear

    monkeypatch.setenv("SPARSA_BF16_GEMM", "1")  # as on a CPU with bf16 dot products
    torch.manual_seed(0)
    w = torch.randn(96, 200)
    exact, fast = Bf16Linear(w), Bf16Linear(w, bf16_gemm=True)
    for rows in (1, 16):
        x = torch.randn(rows, 200)
        assert torch.equal(fast(x), exact(x))
    x = torch.randn(64, 200)
    ref = x @ w.bfloat16().float().t()
    torch.testing.assert_close(exact(x), ref, atol=1e-4, rtol=1e-4)
    y = fast(x)
    assert y.dtype == torch.float32 and not torch.equal(y, exact(x))
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 2e-2  # bf16 rounding only
    monkeypatch.setenv("SPARSA_BF16_GEMM", "0")  # a CPU without them: fp32 math again
    assert torch.equal(fast(x), exact(x))


def test_bf16_prefill_reaches_the_layers(tmp_path):
    from sparsa import LLM
    from sparsa.layers.quantization import QuantConfig
    from tests.tiny_models import build_tiny_checkpoint

    with pytest.raises(ValueError, match="bf16_prefill"):
        QuantConfig(method="bf16", bf16_prefill="yes")
    _, path = build_tiny_checkpoint("mixtral", tmp_path / "m")
    for on in (False, True, None):
        llm = LLM(str(path), quantization="bf16", bf16_prefill=on, kv_cache_memory="8MiB")
        on = cpu_has_bf16_dot() if on is None else on
        flags = {type(m).__name__: m.bf16_gemm for m in llm.engine.model.modules()
                 if hasattr(m, "bf16_gemm")}
        assert flags == {"Bf16Linear": on, "QuantizedExperts": on}
