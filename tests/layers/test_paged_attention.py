"""Decode attention over paged KV: the native kernel and the gather+SDPA path against a
dense reference, and the kernel's guards."""

from __future__ import annotations

import pytest
import torch

from sparsa import kernels
from sparsa.kernels import ops
from sparsa.layers import attention
from sparsa.layers.attention import AttentionMetadata, KVCache, paged_attention

needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason=f"native kernels: {kernels.unavailable_reason()}")


def _pools(num_blocks, bs, hkv, dk, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks, bs, hkv, dk, generator=g)
    v = torch.randn(num_blocks, bs, hkv, dv, generator=g)
    return k, v


def _tables(lens, bs, num_blocks, seed=0):
    """Each sequence gets distinct, shuffled blocks (as the BlockManager hands them out)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-n // bs) for n in lens)
    rows, at = [], 0
    for n in lens:
        nb = -(-n // bs)
        rows.append(perm[at:at + nb] + [0] * (width - nb))
        at += nb
    return torch.tensor(rows, dtype=torch.long)


def _reference(q, kc, vc, tables, lens, scale, window):
    """Dense attention per sequence and head, in float64."""
    S, hq, _ = q.shape
    bs, hkv = kc.shape[1], kc.shape[2]
    out = torch.empty(S, hq, vc.shape[-1], dtype=torch.float64)
    for s, n in enumerate(lens):
        pos = torch.arange(n)
        slots = tables[s][pos // bs] * bs + pos % bs
        k = kc.reshape(-1, hkv, kc.shape[-1])[slots].double()
        v = vc.reshape(-1, hkv, vc.shape[-1])[slots].double()
        first = max(0, n - window) if window else 0
        for h in range(hq):
            kh = h // (hq // hkv)
            sc = (k[first:, kh] @ q[s, h].double()) * scale
            out[s, h] = torch.softmax(sc, 0) @ v[first:, kh]
    return out


CASES = [
    # (lens, bs, hq, hkv, dk, dv, window)
    ([1], 16, 4, 4, 64, 64, None),
    ([37], 16, 16, 4, 64, 64, None),
    ([5, 130, 64, 17], 16, 8, 2, 128, 128, None),
    ([300, 9], 16, 8, 1, 64, 64, 32),  # MQA with a sliding window
    ([40, 41], 8, 4, 4, 24, 16, None),  # Dk != Dv (MLA-style), dims not a multiple of 8
    ([2000, 900, 1500], 16, 16, 4, 64, 64, None),  # large enough to run threaded
]


@needs_kernels
@pytest.mark.parametrize("lens,bs,hq,hkv,dk,dv,window", CASES)
def test_native_matches_reference(lens, bs, hq, hkv, dk, dv, window):
    nblocks = sum(-(-n // bs) for n in lens) + 3
    kc, vc = _pools(nblocks, bs, hkv, dk, dv)
    tables = _tables(lens, bs, nblocks)
    q = torch.randn(len(lens), hq, dk, generator=torch.Generator().manual_seed(1))
    scale = dk ** -0.5
    got = ops.paged_decode_attention(q, kc, vc, tables, torch.tensor(lens), scale, window)
    want = _reference(q, kc, vc, tables, lens, scale, window)
    assert got.shape == (len(lens), hq, dv)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("native", [True, False])
def test_paged_attention_decode_paths_agree(native, monkeypatch):
    """paged_attention (writes this step's K/V, then attends) equals the reference on both
    the native path and the gather+SDPA fallback."""
    if native and not kernels.available():
        pytest.skip(f"native kernels: {kernels.unavailable_reason()}")
    if not native:
        monkeypatch.setattr(attention, "native_decode", lambda *a: False)
    lens, bs, hq, hkv, d = [3, 20, 33], 16, 8, 2, 32
    nblocks = 12
    kc, vc = _pools(nblocks, bs, hkv, d, d)
    tables = _tables(lens, bs, nblocks)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, hq, d, generator=g)
    k_new = torch.randn(3, hkv, d, generator=g)
    v_new = torch.randn(3, hkv, d, generator=g)
    slots = torch.tensor([int(tables[s][(n - 1) // bs]) * bs + (n - 1) % bs
                          for s, n in enumerate(lens)])
    meta = AttentionMetadata(slot_mapping=slots, num_decodes=3, decode_block_tables=tables,
                             decode_context_lens=torch.tensor(lens), decode_max_len=max(lens))
    cache = KVCache(kc.clone(), vc.clone())
    got = paged_attention(q, k_new, v_new, cache, meta, d ** -0.5)
    kc.view(-1, hkv, d)[slots] = k_new
    vc.view(-1, hkv, d)[slots] = v_new
    want = _reference(q, kc, vc, tables, lens, d ** -0.5, None)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


@needs_kernels
def test_native_rejects_bad_tables():
    kc, vc = _pools(4, 16, 2, 32, 32)
    q = torch.randn(1, 4, 32)
    good = torch.tensor([[0, 1]])
    with pytest.raises(RuntimeError, match="block id"):
        ops.paged_decode_attention(q, kc, vc, torch.tensor([[0, 9]]), torch.tensor([20]),
                                   0.1, None)
    with pytest.raises(RuntimeError, match="context length"):
        ops.paged_decode_attention(q, kc, vc, good, torch.tensor([33]), 0.1, None)
    with pytest.raises(ValueError, match="float32"):
        ops.paged_decode_attention(q.double(), kc, vc, good, torch.tensor([20]), 0.1, None)
    with pytest.raises(ValueError, match="one row per query"):
        ops.paged_decode_attention(q, kc, vc, good, torch.tensor([20, 3]), 0.1, None)


def _rope_ref(x, cos, sin, rd):
    """NeoX rotary on the first rd dims of x [S, H, D] with cos/sin [S, rd]."""
    half = rd // 2
    c, s = cos[:, None, :half], sin[:, None, :half]
    x1, x2 = x[..., :half], x[..., half:rd]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, x[..., rd:]), dim=-1)


@needs_kernels
@pytest.mark.parametrize("lens,hq,hkv,d,rd,window", [
    ([1], 4, 4, 32, 32, None),
    ([7, 40, 19], 8, 2, 64, 64, None),
    ([50, 3], 4, 1, 32, 16, 20),  # partial rotary, MQA, sliding window
    ([1500, 700, 900], 16, 4, 64, 64, None),  # large enough for the threaded per-head path
])
def test_fused_decode_step_matches_rope_write_attend(lens, hq, hkv, d, rd, window):
    bs = 16
    nblocks = sum(-(-n // bs) for n in lens) + 2
    kc, vc = _pools(nblocks, bs, hkv, d, d)
    tables = _tables(lens, bs, nblocks)
    S = len(lens)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(S, (hq + 2 * hkv) * d, generator=g)
    ang = torch.rand(S, rd // 2, generator=g) * 6
    cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)
    slots = torch.tensor([int(tables[s][(n - 1) // bs]) * bs + (n - 1) % bs
                          for s, n in enumerate(lens)])
    kc2, vc2 = kc.clone(), vc.clone()
    out = ops.decode_attention_step(qkv, cos, sin, rd, kc2, vc2, slots, tables,
                                    torch.tensor(lens), d ** -0.5, window, hq)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], -1)
    q = _rope_ref(q.reshape(S, hq, d), cos, sin, rd)
    k = _rope_ref(k.reshape(S, hkv, d), cos, sin, rd)
    kc.view(-1, hkv, d)[slots] = k
    vc.view(-1, hkv, d)[slots] = v.reshape(S, hkv, d)
    torch.testing.assert_close(kc2, kc, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(vc2, vc)
    want = _reference(q, kc, vc, tables, lens, d ** -0.5, window).reshape(S, hq * d)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="slot"):
        ops.decode_attention_step(qkv, cos, sin, rd, kc2, vc2, slots + 10**6, tables,
                                  torch.tensor(lens), 0.1, None, hq)


@needs_kernels
def test_fused_decode_step_with_per_head_qk_norm():
    """Qwen3's per-head RMSNorm of q and k runs inside the fused step, before the rotation."""
    lens, hq, hkv, d, bs = [9, 30], 8, 2, 32, 16
    kc, vc = _pools(6, bs, hkv, d, d)
    tables = _tables(lens, bs, 6)
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, (hq + 2 * hkv) * d, generator=g) * 3
    ang = torch.rand(2, d // 2, generator=g) * 6
    cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)
    qw, kw = torch.rand(d, generator=g) + 0.5, torch.rand(d, generator=g) + 0.5
    slots = torch.tensor([int(tables[s][(n - 1) // bs]) * bs + (n - 1) % bs
                          for s, n in enumerate(lens)])
    kc2, vc2 = kc.clone(), vc.clone()
    out = ops.decode_attention_step(qkv, cos, sin, d, kc2, vc2, slots, tables,
                                    torch.tensor(lens), d ** -0.5, None, hq, qw, kw, 1e-6)

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], -1)
    q = _rope_ref(norm(q.reshape(2, hq, d), qw), cos, sin, d)
    k = _rope_ref(norm(k.reshape(2, hkv, d), kw), cos, sin, d)
    kc.view(-1, hkv, d)[slots] = k
    vc.view(-1, hkv, d)[slots] = v.reshape(2, hkv, d)
    torch.testing.assert_close(kc2, kc, atol=1e-5, rtol=1e-5)
    want = _reference(q, kc, vc, tables, lens, d ** -0.5, None).reshape(2, hq * d)
    torch.testing.assert_close(out.double(), want, atol=5e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("ctx", [30, 1600])  # one thread, and the threaded per-head path
def test_fused_decode_step_rows_of_one_sequence(ctx):
    """A token and the proposals it verifies are decode rows of one sequence, each
    attending to the rows before it: every row's K/V must be written before any row
    attends (the threaded path once let a later row read a slot not yet written)."""
    hq, hkv, d, bs, rows = 16, 4, 64, 16, 5
    lens = [ctx + j for j in range(1, rows + 1)]
    nblocks = -(-lens[-1] // bs) + 2
    kc, vc = _pools(nblocks, bs, hkv, d, d)
    table = _tables([lens[-1]], bs, nblocks)[0]
    tables = table.expand(rows, -1).contiguous()
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(rows, (hq + 2 * hkv) * d, generator=g)
    ang = torch.rand(rows, d // 2, generator=g) * 6
    cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)
    slots = torch.tensor([int(table[(n - 1) // bs]) * bs + (n - 1) % bs for n in lens])
    kc2, vc2 = kc.clone(), vc.clone()
    out = ops.decode_attention_step(qkv, cos, sin, d, kc2, vc2, slots, tables,
                                    torch.tensor(lens), d ** -0.5, None, hq)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], -1)
    q = _rope_ref(q.reshape(rows, hq, d), cos, sin, d)
    kc.view(-1, hkv, d)[slots] = _rope_ref(k.reshape(rows, hkv, d), cos, sin, d)
    vc.view(-1, hkv, d)[slots] = v.reshape(rows, hkv, d)
    want = _reference(q, kc, vc, tables, lens, d ** -0.5, None).reshape(rows, hq * d)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-5)
