"""Native int8/int4 kernels against plain-PyTorch references of the same arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from sparsa import kernels
from sparsa.kernels import layout, ops
from sparsa.layers.quantization import quantize_int4_packed, quantize_int8_padded

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason=f"native kernels unavailable: {kernels.unavailable_reason()}")

ROWS = (1, 2, 3, 8, 33)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("T", ROWS)
@pytest.mark.parametrize("N,K", [(37, 100), (64, 256), (5, 515)])
def test_int8_gemm_matches_reference(T, N, K):
    g = torch.Generator().manual_seed(N * K + T)
    q, s = quantize_int8_padded(torch.randn(N, K, generator=g))
    x = torch.randn(T, K, generator=g)
    y = ops.int8_gemm(x, q, s)
    assert y.shape == (T, N) and y.dtype == torch.float32
    assert _rel(y, layout.int8_gemm_reference(x, q, s)) < 2e-6
    # against the fp32 weights: only the activation quantization error remains
    w = q[:, :K].float() * s[:, None]
    assert _rel(y, x @ w.t()) < 2e-2
    exact = ops.int8_gemm(x, q, s, exact=True)
    assert _rel(exact, (x.double() @ w.double().t()).float()) < 1e-5


@pytest.mark.parametrize("T", ROWS)
@pytest.mark.parametrize("G", [32, 64, 128, 256])
@pytest.mark.parametrize("N,K", [(37, 100), (3, 512)])
def test_int4_gemm_matches_reference(T, G, N, K):
    g = torch.Generator().manual_seed(N * K + T + G)
    q, sm = quantize_int4_packed(torch.randn(N, K, generator=g), G)
    x = torch.randn(T, K, generator=g)
    y = ops.int4_gemm(x, q, sm, G)
    assert y.shape == (T, N)
    assert _rel(y, layout.int4_gemm_reference(x, q, sm, G)) < 1e-5  # fp32 accumulation


def test_int4_pack_round_trip():
    q = torch.randint(0, 16, (7, 192), dtype=torch.uint8)
    packed = layout.pack_int4(q)
    assert packed.shape == (7, 96)
    assert torch.equal(layout.unpack_int4(packed), q)
    # byte i of chunk c: low nibble = weight 64c + i, high nibble = weight 64c + 32 + i
    assert packed[0, 0].item() == q[0, 0].item() | (q[0, 32].item() << 4)
    with pytest.raises(ValueError):
        layout.pack_int4(q[:, :100])


def test_dequant_ops_match_torch():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(19, 200, generator=g)
    q, s = quantize_int8_padded(w)
    assert torch.equal(ops.int8_dequant(q, s), q.float() * s[:, None])
    q4, sm = quantize_int4_packed(w, 64)
    ref = layout.unpack_int4(q4).float().reshape(19, -1, 64) * sm[:, 0].float()[..., None] \
        + sm[:, 1].float()[..., None]
    assert torch.equal(ops.int4_dequant(q4, sm, 64), ref.reshape(19, -1))


def _moe_reference(x, ids, tw, mm13, mm2, inter):
    out = torch.zeros_like(x, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = mm13(e, x[t : t + 1])[:, : 2 * inter]
            a = F.silu(h[:, :inter]) * h[:, inter:]
            out[t] += float(tw[t, j]) * mm2(e, a.float())[0].double()
    return out.float()


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_fused_moe_matches_reference(method, T):
    E, H, inter, k = 5, 96, 80, 2
    g = torch.Generator().manual_seed(T)
    w13 = torch.randn(E, 2 * inter, H, generator=g) * 0.1
    w2 = torch.randn(E, H, inter, generator=g) * 0.1
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    tw = torch.rand(T, k, generator=g)
    if method == "int8":
        a = [quantize_int8_padded(w13[e]) for e in range(E)]
        b = [quantize_int8_padded(w2[e]) for e in range(E)]
        q13, s13 = torch.stack([p[0] for p in a]), torch.stack([p[1] for p in a])
        q2, s2 = torch.stack([p[0] for p in b]), torch.stack([p[1] for p in b])
        y = ops.moe_int8(x, q13, s13, q2, s2, ids, tw)
        ref = _moe_reference(x, ids, tw,
                             lambda e, v: layout.int8_gemm_reference(v, q13[e], s13[e]),
                             lambda e, v: layout.int8_gemm_reference(v, q2[e], s2[e]), inter)
    else:
        G = 32
        a = [quantize_int4_packed(w13[e], G) for e in range(E)]
        b = [quantize_int4_packed(w2[e], G) for e in range(E)]
        q13, sm13 = torch.stack([p[0] for p in a]), torch.stack([p[1] for p in a])
        q2, sm2 = torch.stack([p[0] for p in b]), torch.stack([p[1] for p in b])
        y = ops.moe_int4(x, q13, sm13, q2, sm2, G, ids, tw)
        ref = _moe_reference(x, ids, tw,
                             lambda e, v: layout.int4_gemm_reference(v, q13[e], sm13[e], G),
                             lambda e, v: layout.int4_gemm_reference(v, q2[e], sm2[e], G), inter)
    assert y.shape == (T, H)
    # the SwiGLU output is re-quantized: tiny fp differences may flip one rounding
    assert _rel(y, ref) < 1e-4


def test_bad_arguments_raise_value_error():
    q, s = quantize_int8_padded(torch.randn(8, 128))
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match=r"x must be torch\.float32"):
        ops.int8_gemm(x.double(), q, s)
    with pytest.raises(ValueError, match=r"q must be torch\.int8"):
        ops.int8_gemm(x, q.to(torch.int16), s)
    with pytest.raises(ValueError, match="features"):
        ops.int8_gemm(torch.randn(2, 200), q, s)
    with pytest.raises(ValueError, match="contiguous"):
        ops.int8_gemm(x, torch.zeros(128, 8, dtype=torch.int8).t(), s)
    with pytest.raises(ValueError, match="multiple of 128"):
        ops.int8_gemm(torch.randn(2, 64), q[:, :64].contiguous(), s)
    with pytest.raises(ValueError, match="rows"):
        ops.int8_gemm(x, q, s[:4].contiguous())
    q4, sm = quantize_int4_packed(torch.randn(8, 128), 64)
    with pytest.raises(ValueError, match="group_size"):
        ops.int4_gemm(x, q4, sm, 48)
    with pytest.raises(ValueError, match="scale/min table"):
        ops.int4_gemm(x, q4, sm, 32)
    with pytest.raises(ValueError, match="bfloat16"):
        ops.int4_gemm(x, q4, sm.float(), 64)
    q13 = torch.zeros(2, 8, 128, dtype=torch.int8)
    s13 = torch.ones(2, 8)
    q2 = torch.zeros(2, 128, 128, dtype=torch.int8)
    s2 = torch.ones(2, 128)
    x = torch.randn(1, 128)
    with pytest.raises(ValueError, match="topk_ids must be in"):
        ops.moe_int8(x, q13, s13, q2, s2, torch.tensor([[0, 2]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="shape of topk_ids"):
        ops.moe_int8(x, q13, s13, q2, s2, torch.tensor([[0, 1]]), torch.ones(1, 3))
    assert ops.moe_int8(x, q13, s13, q2, s2, torch.tensor([[0, 1]]),
                        torch.ones(1, 2)).shape == (1, 128)


def test_disabled_by_env(monkeypatch):
    monkeypatch.setenv("SPARSA_KERNELS", "0")
    assert not kernels.available()
    assert "SPARSA_KERNELS" in kernels.unavailable_reason()
    with pytest.raises(RuntimeError):
        ops.int8_gemm(torch.randn(1, 128), *quantize_int8_padded(torch.randn(4, 128)))
    monkeypatch.delenv("SPARSA_KERNELS")
    assert kernels.available()


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_change_results(threads):
    q, s = quantize_int8_padded(torch.randn(300, 256))
    x = torch.randn(3, 256)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = ops.int8_gemm(x, q, s)
        torch.set_num_threads(threads)
        assert torch.equal(ops.int8_gemm(x, q, s), ref)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("T", ROWS)
@pytest.mark.parametrize("N,K", [(37, 96), (64, 256), (5, 515)])
def test_bf16_gemm_is_fp32_math_of_the_widened_weight(T, N, K):
    g = torch.Generator().manual_seed(N * K + T)
    kp = layout.pad_to(K, layout.BF16_K_ALIGN)
    w = F.pad(torch.randn(N, K, generator=g), (0, kp - K)).to(torch.bfloat16)
    x = torch.randn(T, K, generator=g)
    y = ops.bf16_gemm(x, w)
    assert y.shape == (T, N) and y.dtype == torch.float32
    ref = (x.double() @ w[:, :K].double().t()).float()
    assert _rel(y, ref) < 1e-6  # exact widening: only fp32 summation order differs
    with pytest.raises(ValueError, match="multiple of 8"):
        ops.bf16_gemm(torch.randn(1, 4), torch.zeros(3, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"w must be torch\.bfloat16"):
        ops.bf16_gemm(x, w.float())


@pytest.mark.parametrize("T", [1, 3, 5])
def test_vnni_tiles_match_avx2_tiles(T):
    """Where the CPU has VNNI the int8 tiles use it; both give the same integer sums, so
    results agree to fp32 rounding (and every row's result is independent of T)."""
    mod = kernels.load()
    if mod.vnni() == 0:
        pytest.skip("this CPU has no VNNI: only the AVX2 tiles run")
    q, s = quantize_int8_padded(torch.randn(70, 300))
    x = torch.randn(T, 300) * 3
    E, H, inter = 4, 256, 128
    w13q, w13s = quantize_int8_padded(torch.randn(E * 2 * inter, H))
    w2q, w2s = quantize_int8_padded(torch.randn(E * H, inter))
    w13q, w13s = w13q.view(E, 2 * inter, -1), w13s.view(E, -1)
    w2q, w2s = w2q.view(E, H, -1), w2s.view(E, -1)
    ids = torch.randint(0, E, (T, 2))
    tw = torch.rand(T, 2)
    xm = torch.randn(T, H)
    vnni = (ops.int8_gemm(x, q, s), ops.moe_int8(xm, w13q, w13s, w2q, w2s, ids, tw))
    try:
        mod.set_vnni(False)
        avx2 = (ops.int8_gemm(x, q, s), ops.moe_int8(xm, w13q, w13s, w2q, w2s, ids, tw))
    finally:
        mod.set_vnni(True)
    assert _rel(vnni[0], avx2[0]) < 1e-6  # same integer sums, fp32 lane order differs
    # the MoE re-quantizes its intermediate: a rounding flip there moves an output by ~1e-5
    assert _rel(vnni[1], avx2[1]) < 1e-4
    torch.testing.assert_close(ops.int8_gemm(x[:1], q, s), vnni[0][:1], rtol=0, atol=0)
    assert kernels.int8_dot_isa() in ("AVX-512 VNNI", "AVX-VNNI")


@pytest.mark.parametrize("G", [32, 64, 128])
def test_int4_vnni_is_bitwise_avx2(G):
    """The 256-bit int4 VNNI bodies form the same int32 lanes as maddubs + madd: identical
    results. The AVX-512 group-32 body sums its float lanes in another order: equal to
    rounding."""
    mod = kernels.load()
    modes = _vnni_modes()
    if modes == [0]:
        pytest.skip("this CPU has no VNNI: only the AVX2 tiles run")
    q, sm = quantize_int4_packed(torch.randn(40, 512), G)
    x = torch.randn(5, 512)
    try:
        mod.set_vnni(False)
        avx2 = ops.int4_gemm(x, q, sm, G)
        for mode in modes[1:]:
            mod.set_vnni_mode(mode)
            got = ops.int4_gemm(x, q, sm, G)
            if mode == 1 and G == 32:
                assert _rel(got, avx2) < 1e-6
            else:
                assert torch.equal(got, avx2), mode
    finally:
        mod.set_vnni(True)


def _vnni_modes() -> list[int]:
    ext = kernels.load()
    modes = [0]
    for mode in (1, 2):
        try:
            ext.set_vnni_mode(mode)
            modes.append(mode)
        except RuntimeError:
            pass
    ext.set_vnni(True)
    return modes


@pytest.mark.parametrize("T", ROWS)
@pytest.mark.parametrize("N,K", [(37, 100), (8, 576), (3, 1536)])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_u8g_gemm_matches_reference_on_every_tile(T, N, K, scale_dtype):
    """8-bit groups (GGUF Q8_0): codes over the whole 0..255 range (-128 included, where
    the AVX2 sign trick and maddubs' int16 pair sums are at their limits), every tile."""
    from sparsa.layers.quantization.schemes import quantize_u8g_padded

    g = torch.Generator().manual_seed(N * K + T)
    q, sm = quantize_u8g_padded(torch.randn(N, K, generator=g), scale_dtype)
    q[:, :K:7] = 0  # w = -128 d
    q[:, 1:K:5] = 255
    x = torch.randn(T, K, generator=g)
    x[:, ::3] *= 40  # activation outliers: quantized codes at +-127
    want = layout.u8g_gemm_reference(x, q, sm)
    ext = kernels.load()
    try:
        for mode in _vnni_modes():
            ext.set_vnni_mode(mode)
            assert _rel(ops.u8g_gemm(x, q, sm), want) < 1e-5, mode
    finally:
        ext.set_vnni(True)


@pytest.mark.parametrize("G", [32, 128])
def test_int4_fp16_scales_read_as_fp16(G):
    """int4 with an fp16 scale/min table (GGUF Q4_0 / Q4_1 kept exact) against the same
    reference as bf16 tables, and the dequantization op."""
    g = torch.Generator().manual_seed(G)
    q, sm = quantize_int4_packed(torch.randn(9, 256, generator=g), G, scale_dtype=torch.float16)
    assert sm.dtype == torch.float16
    x = torch.randn(3, 256, generator=g)
    assert _rel(ops.int4_gemm(x, q, sm, G), layout.int4_gemm_reference(x, q, sm.float(), G)) \
        < 1e-5
    from sparsa.layers.quantization.schemes import dequantize_int4_packed

    assert torch.equal(ops.int4_dequant(q, sm, G), dequantize_int4_packed(q, sm))
