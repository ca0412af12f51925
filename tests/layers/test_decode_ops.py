"""RMSNorm and rotary embedding: the native single-call paths equal the torch ones."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from sparsa import kernels
from sparsa.layers.norm import RMSNorm
from sparsa.layers.rotary import RotaryEmbedding

native = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable")


@native
@pytest.mark.parametrize("T,H", [(1, 1024), (3, 100), (700, 64)])
def test_rms_norm_native_matches_torch(T, H, monkeypatch):
    norm = RMSNorm(H, eps=1e-5)
    norm.weight.data.normal_()
    x = torch.randn(T, H + 5)[:, :H] * 3  # strided rows, as a split's view would be
    with torch.inference_mode():
        ours = norm(x)
        ref = torch.nn.functional.rms_norm(x, (H,), norm.weight, 1e-5)
    assert ours.shape == (T, H)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("SPARSA_KERNELS", "0")
    with torch.inference_mode():
        torch.testing.assert_close(norm(x), ref, rtol=1e-5, atol=1e-5)


def _rope(rotary_dim: int = 64) -> RotaryEmbedding:
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64,
                      max_position_embeddings=512, rope_theta=10000.0)
    return RotaryEmbedding(cfg, rotary_dim, 512)


@native
@pytest.mark.parametrize("rotary_dim", [64, 32])
@pytest.mark.parametrize("T", [1, 5, 600])
def test_rope_native_matches_torch_and_works_on_views(rotary_dim, T, monkeypatch):
    rope = _rope(rotary_dim)
    positions = torch.randint(0, 512, (T,))
    qkv = torch.randn(T, 4 * 64 + 2 * 2 * 64)
    q0 = qkv[:, :256].reshape(T, 4, 64).clone()
    k0 = qkv[:, 256:384].reshape(T, 2, 64).clone()
    monkeypatch.setenv("SPARSA_KERNELS", "0")
    with torch.inference_mode():
        rq, rk = rope(positions, q0.clone(), k0.clone())
    monkeypatch.delenv("SPARSA_KERNELS")
    rope._last = None
    with torch.inference_mode():
        q = qkv[:, :256].reshape(T, 4, 64)  # non-contiguous views into the fused projection
        k = qkv[:, 256:384].reshape(T, 2, 64)
        nq, nk = rope(positions, q, k)
    torch.testing.assert_close(nq, rq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nk, rk, rtol=1e-5, atol=1e-5)
    if rotary_dim < 64:  # the dims past rotary_dim are untouched
        assert torch.equal(nq[..., rotary_dim:], q0[..., rotary_dim:])
