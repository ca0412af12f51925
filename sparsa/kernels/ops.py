"""Checked entry points to the native kernels (layouts in `sparsa.kernels.layout`).

Every argument is validated here, in Python, so a wrong shape, dtype, device or layout is a
`ValueError` naming it rather than a read out of bounds in C++. Callers check
`sparsa.kernels.available()` first; these raise `RuntimeError` when the kernels are not built.
"""

from __future__ import annotations

import torch

from sparsa.kernels.build import load
from sparsa.kernels.layout import (
    BF16_K_ALIGN,
    INT4_CHUNK,
    INT4_GROUP_SIZES,
    INT8_K_ALIGN,
    U8G_K_ALIGN,
)


def _ext():
    mod = load()
    if mod is None:
        raise RuntimeError("sparsa native kernels are not available (see sparsa.kernels)")
    return mod


def _check(t: torch.Tensor, name: str, dtype: torch.dtype | tuple[torch.dtype, ...],
           ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_x(x: torch.Tensor, k_max: int) -> torch.Tensor:
    _check(x if not isinstance(x, torch.Tensor) else x.contiguous(), "x", torch.float32, 2)
    if x.shape[1] > k_max:
        raise ValueError(f"x has {x.shape[1]} features, the weight only {k_max}")
    return x.contiguous()


# int4 scale/min tables: bf16 (Sparsa's own quantizer) or fp16 (GGUF Q4_0/Q4_1 kept exact)
SM_DTYPES = (torch.bfloat16, torch.float16)


def _check_int4(q: torch.Tensor, sm: torch.Tensor, group_size: int, lead: tuple) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    kp = q.shape[-1] * 2
    if kp % INT4_CHUNK or kp % group_size:
        raise ValueError(f"int4 weight K={kp} must be a multiple of {INT4_CHUNK} and the group")
    want = (*lead, q.shape[-2], 2, kp // group_size)
    if tuple(sm.shape) != want:
        raise ValueError(f"scale/min table must be {want}, got {tuple(sm.shape)}")


def int8_gemm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
              exact: bool = False) -> torch.Tensor:
    """x [T, K] fp32 @ (q [N, Kp] int8 * scale [N, 1])^T -> [T, N] fp32.

    exact=False quantizes x to int8 per block of 128 (fast); exact=True converts the weights
    to fp32 instead (no activation error, slower)."""
    _check(q, "q", torch.int8, 2)
    _check(scale, "scale", torch.float32, 1)
    x = _check_x(x, q.shape[1])
    if q.shape[1] % INT8_K_ALIGN:
        raise ValueError(f"int8 weight K={q.shape[1]} must be a multiple of {INT8_K_ALIGN}")
    if scale.shape[0] != q.shape[0]:
        raise ValueError(f"scale has {scale.shape[0]} rows, q has {q.shape[0]}")
    return _ext().int8_gemm(x, q, scale, bool(exact))


def int4_gemm(x: torch.Tensor, q: torch.Tensor, sm: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """x [T, K] fp32 @ W^T for the int4 weight (q [N, Kp/2] uint8, sm [N, 2, Kp/G] bf16)."""
    _check(q, "q", torch.uint8, 2)
    _check(sm, "sm", SM_DTYPES, 3)
    _check_int4(q, sm, group_size, ())
    x = _check_x(x, q.shape[1] * 2)
    return _ext().int4_gemm(x, q, sm, int(group_size))


def u8g_gemm(x: torch.Tensor, q: torch.Tensor, sm: torch.Tensor) -> torch.Tensor:
    """x [T, K] fp32 @ W^T for 8-bit groups of 32 (q [N, Kp] uint8 codes, sm [N, 2, Kp/32]
    scales then mins, fp16 or bf16; w = q * scale + min): GGUF's Q8_0 as it is."""
    _check(q, "q", torch.uint8, 2)
    _check(sm, "sm", SM_DTYPES, 3)
    if q.shape[1] % U8G_K_ALIGN or tuple(sm.shape) != (q.shape[0], 2, q.shape[1] // 32):
        raise ValueError(f"8-bit group weight K={q.shape[1]} must be a multiple of "
                         f"{U8G_K_ALIGN} with sm [N, 2, K/32], got {tuple(sm.shape)}")
    x = _check_x(x, q.shape[1])
    return _ext().u8g_gemm(x, q, sm)


def bf16_gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, K] fp32 @ (w [N, Kp] bf16)^T -> [T, N] fp32, each weight widened exactly to fp32
    (Kp a multiple of `BF16_K_ALIGN`, zero padded past K)."""
    _check(w, "w", torch.bfloat16, 2)
    x = _check_x(x, w.shape[1])
    if w.shape[1] % BF16_K_ALIGN:
        raise ValueError(f"bf16 weight K={w.shape[1]} must be a multiple of {BF16_K_ALIGN}")
    return _ext().bf16_gemm(x, w)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of fp32 rows x [T, H] (rows contiguous) with weight [H]; one native call.
    Unchecked beyond what the caller (`sparsa.layers.norm.RMSNorm`) guarantees: it runs
    once per layer per step, where a Python check would cost as much as the op."""
    return _ext().rms_norm(x, weight, float(eps))


def add_rms_norm_(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """residual += x in place; returns RMSNorm(residual) * weight (all fp32 [T, H])."""
    _check(residual, "residual", torch.float32, 2)
    _check(x, "x", torch.float32, 2)
    _check(weight, "weight", torch.float32, 1)
    if x.shape != residual.shape or weight.shape[0] != x.shape[1]:
        raise ValueError(f"shapes: residual {tuple(residual.shape)}, x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    return _ext().add_rms_norm_(residual, x, weight, float(eps))


def moe_route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int,
              renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax_topk(x @ router_weight, top_k, renormalize) for x [T, H], weight [H, E]."""
    _check(x, "x", torch.float32, 2)
    _check(router_weight, "router_weight", torch.float32, 2)
    if router_weight.shape[0] != x.shape[1]:
        raise ValueError(f"router weight {tuple(router_weight.shape)} does not take "
                         f"{x.shape[1]} features")
    if not 1 <= top_k <= router_weight.shape[1]:
        raise ValueError(f"top_k must be in [1, {router_weight.shape[1]}]; got {top_k}")
    return _ext().moe_route(x, router_weight, int(top_k), bool(renormalize))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of fp32 logits [T, V] (first index of the maximum)."""
    two_d = isinstance(logits, torch.Tensor) and logits.dim() == 2
    # dtype, dims and device (the row stride may be anything)
    _check(logits[:, :1].contiguous() if two_d else logits, "logits", torch.float32, 2)
    if logits.stride(1) != 1:
        raise ValueError("logits rows must be contiguous")
    if logits.shape[1] == 0:
        raise ValueError("logits have an empty vocabulary")
    return _ext().argmax_rows(logits)


def rope_neox_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> None:
    """NeoX rotary embedding in place on fp32 x [T, heads, D] (last dim contiguous) with
    cos/sin [T, rotary_dim] contiguous rows; the caller (`RotaryEmbedding`) guarantees it."""
    _ext().rope_neox_(x, cos, sin, int(rotary_dim))


def _check_moe(x: torch.Tensor, n13: int, e: int, h: int, topk_ids: torch.Tensor,
               topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        raise ValueError("topk_ids must be a [T, k] tensor")
    if topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} rows, x has {x.shape[0]}")
    if not isinstance(topk_weights, torch.Tensor) or topk_weights.shape != topk_ids.shape:
        raise ValueError("topk_weights must have the shape of topk_ids")
    if n13 % 2:
        raise ValueError("w13 must have an even number of rows (gate | up)")
    if x.shape[1] != h:
        raise ValueError(f"x has {x.shape[1]} features, experts expect {h}")
    ids = topk_ids.to(torch.int64).contiguous()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= e):
        raise ValueError(f"topk_ids must be in [0, {e})")
    return ids, topk_weights.to(torch.float32).contiguous()


def _check_int8_experts(x: torch.Tensor, w13_q: torch.Tensor, w13_s: torch.Tensor,
                        w2_q: torch.Tensor, w2_s: torch.Tensor, topk_ids: torch.Tensor,
                        topk_weights: torch.Tensor):
    """Shapes of stacked int8 experts and their routing; returns (x, ids, weights) ready
    for the kernel."""
    for t, n, d in ((w13_q, "w13_q", torch.int8), (w2_q, "w2_q", torch.int8)):
        _check(t, n, d, 3)
    for t, n in ((w13_s, "w13_s"), (w2_s, "w2_s")):
        _check(t, n, torch.float32, 2)
    x = _check_x(x, w13_q.shape[2])
    E, n13, hp = w13_q.shape
    H, ip = w2_q.shape[1], w2_q.shape[2]
    if hp % INT8_K_ALIGN or ip % INT8_K_ALIGN or ip < n13 // 2 or w2_q.shape[0] != E:
        raise ValueError(f"inconsistent int8 expert shapes {tuple(w13_q.shape)}, "
                         f"{tuple(w2_q.shape)}")
    if tuple(w13_s.shape) != (E, n13) or tuple(w2_s.shape) != (E, H):
        raise ValueError("expert scales must be [E, N] for each weight")
    ids, tw = _check_moe(x, n13, E, H, topk_ids, topk_weights)
    return x, ids, tw


def moe_int8(x: torch.Tensor, w13_q: torch.Tensor, w13_s: torch.Tensor, w2_q: torch.Tensor,
             w2_s: torch.Tensor, topk_ids: torch.Tensor,
             topk_weights: torch.Tensor) -> torch.Tensor:
    """Fused SwiGLU MoE over int8 experts: w13_q [E, 2I, Hp], w13_s [E, 2I], w2_q [E, H, Ip],
    w2_s [E, H] -> [T, H] = sum_j w_j * down(silu(gate(x)) * up(x))."""
    x, ids, tw = _check_int8_experts(x, w13_q, w13_s, w2_q, w2_s, topk_ids, topk_weights)
    return _ext().moe_int8(x, w13_q, w13_s, w2_q, w2_s, ids, tw)


def moe_w8a8(x: torch.Tensor, w13_q: torch.Tensor, w13_s: torch.Tensor, w2_q: torch.Tensor,
             w2_s: torch.Tensor, topk_ids: torch.Tensor,
             topk_weights: torch.Tensor) -> torch.Tensor:
    """`moe_int8` for many tokens: activations quantized per row, each active expert's two
    projections as int8 x int8 GEMMs (torch._int_mm) with SwiGLU fused in between."""
    x, ids, tw = _check_int8_experts(x, w13_q, w13_s, w2_q, w2_s, topk_ids, topk_weights)
    return _ext().moe_w8a8(x, w13_q, w13_s, w2_q, w2_s, ids, tw)


def moe_int4(x: torch.Tensor, w13_q: torch.Tensor, w13_sm: torch.Tensor, w2_q: torch.Tensor,
             w2_sm: torch.Tensor, group_size: int, topk_ids: torch.Tensor,
             topk_weights: torch.Tensor) -> torch.Tensor:
    """Fused SwiGLU MoE over int4 experts: w13_q [E, 2I, Hp/2], w13_sm [E, 2I, 2, Hp/G],
    w2_q [E, H, Ip/2], w2_sm [E, H, 2, Ip/G]."""
    for t, n in ((w13_q, "w13_q"), (w2_q, "w2_q")):
        _check(t, n, torch.uint8, 3)
    for t, n in ((w13_sm, "w13_sm"), (w2_sm, "w2_sm")):
        _check(t, n, SM_DTYPES, 4)
    E, n13 = w13_q.shape[:2]
    _check_int4(w13_q, w13_sm, group_size, (E,))
    _check_int4(w2_q, w2_sm, group_size, (w2_q.shape[0],))
    x = _check_x(x, w13_q.shape[2] * 2)
    H = w2_q.shape[1]
    if w2_q.shape[0] != E or w2_q.shape[2] * 2 < n13 // 2:
        raise ValueError(f"inconsistent int4 expert shapes {tuple(w13_q.shape)}, "
                         f"{tuple(w2_q.shape)}")
    ids, tw = _check_moe(x, n13, E, H, topk_ids, topk_weights)
    return _ext().moe_int4(x, w13_q, w13_sm, w2_q, w2_sm, int(group_size), ids, tw)


def int8_dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [N, Kp] int8, scale [N] -> fp32 [N, Kp]."""
    _check(q, "q", torch.int8, 2)
    _check(scale, "scale", torch.float32, 1)
    if q.shape[1] % 8 or scale.shape[0] != q.shape[0]:
        raise ValueError("int8_dequant needs K % 8 == 0 and one scale per row")
    return _ext().int8_dequant(q, scale)


def int4_dequant(q: torch.Tensor, sm: torch.Tensor, group_size: int) -> torch.Tensor:
    """q [N, Kp/2] uint8, sm [N, 2, Kp/G] bf16 or fp16 -> fp32 [N, Kp]."""
    _check(q, "q", torch.uint8, 2)
    _check(sm, "sm", SM_DTYPES, 3)
    _check_int4(q, sm, group_size, ())
    return _ext().int4_dequant(q, sm, int(group_size))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, window: int | None,
                           tree: torch.Tensor | None = None,
                           k_scales: torch.Tensor | None = None,
                           v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention over the paged fp32 KV pools, in place (no gather): q [S, Hq, Dk],
    k_cache [NB, bs, Hkv, Dk], v_cache [NB, bs, Hkv, Dv], block_tables [S, W] int64,
    context_lens [S] int64 -> [S, Hq, Dv]. tree [S, 2] int64 (token-tree verification):
    row s attends to positions before tree[s, 0], then only to positions tree[s, 0] + b
    with bit b of tree[s, 1] set (rows with tree[s, 0] >= their context are plain).
    int8 pools carry fp32 scales [NB, bs, Hkv] (k_scales, v_scales): a row is q * scale.
    Checks are the cheap shape/dtype ones; block ids are checked in C++."""
    _check(q, "q", torch.float32, 3)
    kv = torch.int8 if k_scales is not None else torch.float32
    for t, n in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        _check(t, n, kv, 4)
    _check(block_tables, "block_tables", torch.int64, 2)
    _check(context_lens, "context_lens", torch.int64, 1)
    S, hq, dk = q.shape
    nb, bs, hkv, kdk = k_cache.shape
    if kdk != dk or tuple(v_cache.shape[:3]) != (nb, bs, hkv) or hq % hkv:
        raise ValueError(f"inconsistent attention shapes q {tuple(q.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if block_tables.shape[0] != S or context_lens.shape[0] != S:
        raise ValueError("block_tables and context_lens need one row per query")
    return _ext().paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                         float(scale), int(window or 0), tree, k_scales,
                                         v_scales)


def quantize_rows_int8(x: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 x [T, K] -> (q [T, kp] int8 zero padded past K, scale [T] fp32), x ~= q * scale
    per row (symmetric, round half to even, q in [-127, 127])."""
    x = _check_x(x, kp)
    return _ext().quantize_rows_int8(x, int(kp))


def scale_int32_rows(acc: torch.Tensor, row_scale: torch.Tensor,
                     col_scale: torch.Tensor) -> torch.Tensor:
    """int32 acc [T, N] -> fp32 acc * row_scale[:, None] * col_scale[None, :]."""
    _check(acc, "acc", torch.int32, 2)
    _check(row_scale, "row_scale", torch.float32, 1)
    _check(col_scale, "col_scale", torch.float32, 1)
    if row_scale.shape[0] != acc.shape[0] or col_scale.shape[0] != acc.shape[1]:
        raise ValueError(f"scales {tuple(row_scale.shape)}, {tuple(col_scale.shape)} do not "
                         f"match acc {tuple(acc.shape)}")
    return _ext().scale_int32_rows(acc, row_scale, col_scale)


def decode_attention_step(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          rotary_dim: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slots: torch.Tensor, block_tables: torch.Tensor,
                          context_lens: torch.Tensor, scale: float, window: int | None,
                          num_heads: int, q_norm: torch.Tensor | None = None,
                          k_norm: torch.Tensor | None = None, eps: float = 1e-6,
                          tree: torch.Tensor | None = None,
                          k_scales: torch.Tensor | None = None,
                          v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of standard attention (all rows decodes): NeoX rotary on q/k from
    the fused qkv [S, (Hq + 2 Hkv) D], K/V written into the pools at `slots`, attention over
    each sequence's blocks -> [S, Hq * D]. q_norm / k_norm ([D] weights): per-head RMSNorm
    of q and k before the rotation (Qwen3); tree, k_scales, v_scales: as
    paged_decode_attention's (int8 pools: K/V quantized per token and head as written).
    CPU; block ids are checked in C++."""
    _check(qkv, "qkv", torch.float32, 2)
    for t, n in ((cos, "cos"), (sin, "sin")):
        _check(t, n, torch.float32, 2)
    kv = torch.int8 if k_scales is not None else torch.float32
    for t, n in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        _check(t, n, kv, 4)
    for t, n, nd in ((slots, "slots", 1), (block_tables, "block_tables", 2),
                     (context_lens, "context_lens", 1)):
        _check(t, n, torch.int64, nd)
    S = qkv.shape[0]
    if (cos.shape != (S, rotary_dim) or sin.shape != cos.shape or rotary_dim % 2
            or rotary_dim > k_cache.shape[3] or k_cache.shape != v_cache.shape
            or num_heads % k_cache.shape[2] or slots.shape[0] != S
            or block_tables.shape[0] != S or context_lens.shape[0] != S):
        raise ValueError("inconsistent decode attention arguments")
    for t, n in ((q_norm, "q_norm"), (k_norm, "k_norm")):
        if t is not None:
            _check(t, n, torch.float32, 1)
            if t.shape[0] != k_cache.shape[3]:
                raise ValueError(f"{n} must have head_dim ({k_cache.shape[3]}) weights")
    return _ext().decode_attention_step(qkv, cos, sin, int(rotary_dim), k_cache, v_cache,
                                        slots, block_tables, context_lens, float(scale),
                                        int(window or 0), int(num_heads), q_norm, k_norm,
                                        float(eps), tree, k_scales, v_scales)
