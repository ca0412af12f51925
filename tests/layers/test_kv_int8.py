"""int8 KV cache: per token and head quantization, the native kernels reading int8 pools
in place against a dequantized reference, and the engine (native and module paths agree,
chunked prefill, speculation, the pool's size, bad settings)."""

from __future__ import annotations

import pytest
import torch

from sparsa import LLM, SamplingParams, kernels
from sparsa.kernels import ops
from sparsa.layers import attention
from sparsa.layers.attention import AttentionMetadata, KVCache, paged_attention, quantize_kv
from tests.layers.test_paged_attention import _pools, _reference, _tables
from tests.tiny_models import build_tiny_checkpoint

needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason=f"native kernels: {kernels.unavailable_reason()}")


def _int8_pools(kc, vc):
    (k, ks), (v, vs) = quantize_kv(kc.flatten(0, 1)), quantize_kv(vc.flatten(0, 1))
    shape = kc.shape[:3]
    return (k.view(kc.shape), ks.view(shape).contiguous(), v.view(vc.shape),
            vs.view(shape).contiguous())


def test_quantize_kv_error_is_within_half_a_step():
    x = torch.randn(50, 4, 64) * torch.rand(50, 4, 1) * 10
    q, s = quantize_kv(x)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * s[..., None] - x).abs()
    assert (err <= s[..., None] / 2 + 1e-6).all()
    q0, s0 = quantize_kv(torch.zeros(2, 1, 8))
    assert (q0 == 0).all() and (s0 == 0).all()


@needs_kernels
@pytest.mark.parametrize("lens,hq,hkv,d,window", [([37], 16, 4, 64, None),
                                                   ([5, 130, 17], 8, 2, 24, None),
                                                   ([300, 9], 8, 1, 64, 32),
                                                   ([2000, 1500], 16, 4, 64, None)])
def test_native_int8_attention_matches_dequantized_reference(lens, hq, hkv, d, window):
    bs = 16
    nblocks = sum(-(-n // bs) for n in lens) + 3
    k, ks, v, vs = _int8_pools(*_pools(nblocks, bs, hkv, d, d))
    tables = _tables(lens, bs, nblocks)
    q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(1))
    got = ops.paged_decode_attention(q, k, v, tables, torch.tensor(lens), d ** -0.5, window,
                                     None, ks, vs)
    want = _reference(q, k.float() * ks[..., None], v.float() * vs[..., None], tables, lens,
                      d ** -0.5, window)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    with pytest.raises((RuntimeError, ValueError)):
        ops.paged_decode_attention(q, k, v, tables, torch.tensor(lens), 0.1, None)


@pytest.mark.parametrize("native", [True, False])
def test_paged_attention_writes_int8_and_reads_it_back(native, monkeypatch):
    if native and not kernels.available():
        pytest.skip(f"native kernels: {kernels.unavailable_reason()}")
    if not native:
        monkeypatch.setattr(attention, "native_decode", lambda *a: False)
    lens, bs, hq, hkv, d = [3, 20, 33], 16, 8, 2, 32
    k, ks, v, vs = _int8_pools(*_pools(12, bs, hkv, d, d))
    tables = _tables(lens, bs, 12)
    g = torch.Generator().manual_seed(2)
    q, k_new, v_new = (torch.randn(3, h, d, generator=g) for h in (hq, hkv, hkv))
    slots = torch.tensor([int(tables[s][(n - 1) // bs]) * bs + (n - 1) % bs
                          for s, n in enumerate(lens)])
    meta = AttentionMetadata(slot_mapping=slots, num_decodes=3, decode_block_tables=tables,
                             decode_context_lens=torch.tensor(lens), decode_max_len=max(lens))
    cache = KVCache(k.clone(), v.clone(), ks.clone(), vs.clone())
    got = paged_attention(q, k_new, v_new, cache, meta, d ** -0.5)
    (kq, ksc), (vq, vsc) = quantize_kv(k_new), quantize_kv(v_new)
    assert torch.equal(cache.k.view(-1, hkv, d)[slots], kq)
    assert torch.equal(cache.v.view(-1, hkv, d)[slots], vq)
    assert torch.equal(cache.k_scale.view(-1, hkv)[slots], ksc)
    assert torch.equal(cache.v_scale.view(-1, hkv)[slots], vsc)
    want = _reference(q, cache.k.float() * cache.k_scale[..., None],
                      cache.v.float() * cache.v_scale[..., None], tables, lens, d ** -0.5, None)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


@needs_kernels
def test_fused_decode_step_quantizes_as_python_does():
    """The fused step's int8 writes equal quantize_kv of the rotated K and the V."""
    hq, hkv, d, bs = 4, 2, 16, 4
    k, ks, v, vs = _int8_pools(*_pools(8, bs, hkv, d, d))
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(1, (hq + 2 * hkv) * d, generator=g)
    cos, sin = torch.ones(1, d), torch.zeros(1, d)  # the identity rotation
    table = torch.tensor([[0, 1, 2]])
    ops.decode_attention_step(qkv, cos, sin, d, k, v, torch.tensor([9]), table,
                              torch.tensor([10]), d ** -0.5, None, hq, k_scales=ks,
                              v_scales=vs)
    kq, ksc = quantize_kv(qkv[:, hq * d:(hq + hkv) * d].view(1, hkv, d))
    vq, vsc = quantize_kv(qkv[:, (hq + hkv) * d:].view(1, hkv, d))
    assert torch.equal(k.view(-1, hkv, d)[9], kq[0]) and torch.equal(v.view(-1, hkv, d)[9], vq[0])
    torch.testing.assert_close(ks.view(-1, hkv)[9], ksc[0])
    torch.testing.assert_close(vs.view(-1, hkv)[9], vsc[0])


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mixtral", "deepseek_v2"])
def test_engine_int8_kv(arch, tmp_path):
    _, path = build_tiny_checkpoint(arch, tmp_path / arch)
    prompts = [[1, 17, 33, 4, 90, 5], [1, 200, 3, 3, 45, 91, 12, 7, 77, 8, 100, 9] * 3]
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    def run(**kw):
        llm = LLM(str(path), dtype="float32", num_kv_blocks=64, kv_cache_dtype="int8", **kw)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, p)], llm

    want, llm = run()
    fp32 = LLM(str(path), dtype="float32", num_kv_blocks=64)
    # int8 + one fp32 scale per head and token, against fp32 K and V
    shapes = [a.kv_shape for a in llm.engine.runner.model.attention_layers()]
    want_ratio = sum(h * (dk + dv) * 4 for h, dk, dv in shapes) / \
        sum(h * (dk + dv + 8) for h, dk, dv in shapes)
    ratio = fp32.engine.runner.kv_cache_bytes / llm.engine.runner.kv_cache_bytes
    assert ratio == pytest.approx(want_ratio) and ratio > 3
    assert run(native_decode=False)[0] == want  # the module path reads the same values
    # a prompt cut into chunks reads back the same int8 K/V as one computed whole
    assert run(max_num_batched_tokens=8, enable_chunked_prefill=True)[0] == want
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
            "adaptive": False, "disable_by_batch_size": None}
    assert run(speculative_config=spec)[0] == want
    tree = {**spec, "num_speculative_tokens": None, "token_tree": [[0], [1], [0, 0], [1, 0]]}
    assert run(speculative_config=tree)[0] == want


def test_bad_kv_cache_dtype(tmp_path):
    _, path = build_tiny_checkpoint("llama", tmp_path / "m")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(str(path), kv_cache_dtype="int4")
