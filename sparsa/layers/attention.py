"""Attention over a paged KV cache.

The model runner lays a step's tokens out as [decode tokens | prefill chunks]. Decode
sequences (one query each) are attended in one call: on CPU with fp32 pools a native kernel
walks each sequence's block table in place (`sparsa.kernels.ops.paged_decode_attention`);
elsewhere one batched SDPA over their gathered blocks. Each prefill chunk attends to its
cached prefix plus itself with a causal mask offset by the prefix length, which is what
makes chunked prefill and prefix reuse exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from sparsa import kernels
from sparsa.kernels import ops


@dataclass
class PrefillChunk:
    query_start: int  # row of the chunk's first token in the flattened batch
    query_len: int
    context_len: int  # tokens in the cache after this step (prefix + chunk)
    block_table: torch.Tensor  # [num_blocks] long


@dataclass
class AttentionMetadata:
    """Per-step layout shared by every attention layer (built once per step)."""

    slot_mapping: torch.Tensor  # [T] long: cache slot for each new token
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None  # [S_d, max_blocks] long
    decode_context_lens: torch.Tensor | None = None  # [S_d] long
    decode_max_len: int = 0
    # token-tree verification [S_d, 2] long: a decode row attends to every position before
    # decode_tree[s, 0] and, from there, only to positions whose bit is set in
    # decode_tree[s, 1] (its ancestors in the tree and itself); None: all rows plain
    decode_tree: torch.Tensor | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    # masks depend only on the layout and the window: built once per step, reused by layers
    _mask_cache: dict = field(default_factory=dict, repr=False)


class KVCache:
    """One layer's paged K and V pools: [num_blocks, block_size, kv_heads, head_dim]. An int8
    cache (`kv_cache_dtype="int8"`) holds each token's K and V per head as int8 with an fp32
    scale beside it (k_scale, v_scale [num_blocks, block_size, kv_heads]): a quarter of fp32's
    bytes plus 4 per head and token."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None):
        self.k = k
        self.v = v
        self.k_scale = k_scale
        self.v_scale = v_scale

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """K [T, Hkv, Dk] and V [T, Hkv, Dv] into `slots` (quantized for an int8 cache)."""
        if self.k_scale is not None:
            (k, k_sc), (v, v_sc) = quantize_kv(k), quantize_kv(v)
            self.k_scale.view(-1, self.k_scale.shape[2]).index_copy_(0, slots, k_sc)
            self.v_scale.view(-1, self.v_scale.shape[2]).index_copy_(0, slots, v_sc)
        self.k.view(-1, *self.k.shape[2:]).index_copy_(0, slots, k.to(self.k.dtype))
        self.v.view(-1, *self.v.shape[2:]).index_copy_(0, slots, v.to(self.v.dtype))

    @property
    def block_size(self) -> int:
        return self.k.shape[1]


def _decode_mask(meta: AttentionMetadata, length: int, window: int | None) -> torch.Tensor:
    key = ("decode", length, window)
    mask = meta._mask_cache.get(key)
    if mask is None:
        ctx = meta.decode_context_lens
        pos = torch.arange(length, device=ctx.device)
        mask = pos[None, :] < ctx[:, None]
        tree = meta.decode_tree
        if tree is not None:
            off = pos[None, :] - tree[:, :1]
            in_tree = (off >= 0) & (off < 64)
            bit = (tree[:, 1:] >> off.clamp(0, 63)) & 1
            mask &= ~in_tree | (bit == 1)
        if window is not None:
            # the last `window` positions the row attends to (a tree node skips siblings)
            seen = mask.flip(-1).cumsum(-1).flip(-1)
            mask &= seen <= window
        mask = mask[:, None, None, :]
        meta._mask_cache[key] = mask
    return mask


def _prefill_mask(chunk: PrefillChunk, window: int | None, device) -> torch.Tensor | None:
    q_pos = torch.arange(chunk.context_len - chunk.query_len, chunk.context_len, device=device)
    k_pos = torch.arange(chunk.context_len, device=device)
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > (q_pos[:, None] - window)
    return mask


def native_decode(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> bool:
    """Whether decode attention over these pools can run natively (fp32 or int8 pools, fp32
    queries, on the CPU)."""
    return (kc.device.type == "cpu" and kc.dtype in (torch.float32, torch.int8)
            and vc.dtype == kc.dtype and q.dtype == torch.float32
            and not (q.requires_grad and torch.is_grad_enabled()) and kernels.available())


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, H, D] -> int8 [T, H, D] and fp32 scales [T, H], x ~= q * scale per token and
    head (symmetric; the native decode step quantizes with the same arithmetic)."""
    x = x.float()
    amax = x.abs().amax(dim=-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round((x * inv[..., None]).clamp(-127, 127)).to(torch.int8)
    return q, amax / 127.0


def _gather(pool: torch.Tensor, scales: torch.Tensor | None, blocks: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """The pool's rows of `blocks` [n, bs, H, D], dequantized for an int8 cache."""
    rows = pool.index_select(0, blocks)
    if scales is None:
        return rows
    return (rows.to(dtype) * scales.index_select(0, blocks)[..., None].to(dtype))


def paged_attention(
    q: torch.Tensor,  # [T, Hq, Dk]
    k: torch.Tensor,  # [T, Hkv, Dk]
    v: torch.Tensor,  # [T, Hkv, Dv]
    cache: KVCache,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Writes this step's K/V into the cache and returns attention output [T, Hq, Dv]."""
    cache.write(k, v, meta.slot_mapping)
    kc, vc = cache.k, cache.v
    ks, vs = cache.k_scale, cache.v_scale
    bs = kc.shape[1]
    T, Hq, _ = q.shape
    out = q.new_empty(T, Hq, vc.shape[-1])
    gqa = Hq != kc.shape[2]
    dtype = q.dtype

    nd = meta.num_decodes
    if nd and native_decode(q, kc, vc):
        out[:nd] = ops.paged_decode_attention(
            q[:nd].contiguous(), kc, vc, meta.decode_block_tables, meta.decode_context_lens,
            scale, sliding_window, meta.decode_tree, ks, vs)
    elif nd:
        bt = meta.decode_block_tables
        nblk = (meta.decode_max_len + bs - 1) // bs
        bt = bt[:, :nblk]
        length = nblk * bs
        flat = bt.reshape(-1)
        # index_select on the block dim is a plain memcpy gather; advanced indexing with a
        # 2-D index takes a much slower generic path on CPU.
        kd = _gather(kc, ks, flat, dtype).view(nd, length, kc.shape[2], kc.shape[3]).transpose(1, 2)
        vd = _gather(vc, vs, flat, dtype).view(nd, length, vc.shape[2], vc.shape[3]).transpose(1, 2)
        mask = _decode_mask(meta, length, sliding_window)
        o = F.scaled_dot_product_attention(
            q[:nd].unsqueeze(2).to(kd.dtype), kd, vd, attn_mask=mask, scale=scale, enable_gqa=gqa
        )
        out[:nd] = o.squeeze(2).to(out.dtype)

    for ch in meta.prefills:
        s, n, c = ch.query_start, ch.query_len, ch.context_len
        qs = q[s : s + n].transpose(0, 1).unsqueeze(0)
        if c == n and ks is None:
            # Whole prompt in this chunk: attend to the fresh K/V, no cache gather needed
            # (an int8 cache is read back, so a prompt sees the K/V its decode steps see).
            kk = k[s : s + n].transpose(0, 1).unsqueeze(0)
            vv = v[s : s + n].transpose(0, 1).unsqueeze(0)
        else:
            nblk = (c + bs - 1) // bs
            blocks = ch.block_table[:nblk]
            kk = _gather(kc, ks, blocks, dtype).view(-1, kc.shape[2], kc.shape[3])[:c]
            vv = _gather(vc, vs, blocks, dtype).view(-1, vc.shape[2], vc.shape[3])[:c]
            kk = kk.transpose(0, 1).unsqueeze(0)
            vv = vv.transpose(0, 1).unsqueeze(0)
        if sliding_window is None and c == n:
            o = F.scaled_dot_product_attention(
                qs.to(kk.dtype), kk, vv, is_causal=True, scale=scale, enable_gqa=gqa
            )
        else:
            key = ("prefill", s, sliding_window)
            mask = meta._mask_cache.get(key)
            if mask is None:
                mask = _prefill_mask(ch, sliding_window, q.device)
                meta._mask_cache[key] = mask
            o = F.scaled_dot_product_attention(
                qs.to(kk.dtype), kk, vv, attn_mask=mask, scale=scale, enable_gqa=gqa
            )
        out[s : s + n] = o.squeeze(0).transpose(0, 1).to(out.dtype)
    return out
