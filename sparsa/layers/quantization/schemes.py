"""Quantization schemes (plain PyTorch, any device) and the config that selects one.

* ``int8``: symmetric, one scale per output channel: ``w = q * s``, ``q`` in [-127, 127].
* ``bf16``: weights stored in bf16 (half of fp32), widened exactly to fp32 for the math; the
  form for bf16 checkpoints on a CPU without bf16 GEMMs (lossless for them).
* ``int4``: asymmetric, one (scale, min) pair per group of ``group_size`` input channels of
  each output channel: ``w = q * s + m``, ``q`` in [0, 15]. The range of every group is
  clipped by the shrink factor (from a small grid) that minimizes the group's squared error.

Scales and mins are rounded to bf16-representable values before the weights are quantized
against them, so the bf16 tables the CPU kernels read and fp32 copies describe exactly the
same weights. Packed layouts are those of `sparsa.kernels.layout`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from sparsa.kernels.layout import (
    BF16_K_ALIGN,
    INT4_GROUP_SIZES,
    INT8_K_ALIGN,
    U8G_K_ALIGN,
    int4_padded_k,
    pack_int4,
    pad_to,
    unpack_int4,
)

METHODS = ("none", "int8", "int4", "bf16")
INT8_ACTIVATIONS = ("dynamic", "none")
_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
_MIN_SCALE = 1e-10  # bf16 keeps fp32's exponent range, so this is representable


@dataclass
class QuantConfig:
    """What `quantize_model` does.

    method: "none" | "int8" | "int4" | "bf16". group_size: input channels per int4 scale
    (ignored otherwise). skip_lm_head: keep the LM head in full precision. skip_router: keep
    MoE routers (`...mlp.gate`, `shared_expert_gate`) in full precision; they are tiny and the top-k
    choice is sensitive to their precision. clip_search: int4 only, pick each group's range
    by minimum squared error over a few shrink factors instead of plain min/max.
    int8_activations, bf16_prefill: see the fields.
    """

    method: str = "none"
    group_size: int = 64
    skip_lm_head: bool = False
    # the LM head's own form: "same" as the rest, or "int8" (a 4-bit body with an 8-bit
    # head, as llama.cpp's files keep their output/embedding tensor)
    lm_head: str = "same"
    skip_router: bool = True
    clip_search: bool = True
    # int8 only: "dynamic" quantizes activation rows to int8 for batched matmuls (W8A8 GEMM,
    # the fast path for prefill); "none" keeps them exact (dequantize + fp32 GEMM).
    int8_activations: str = "dynamic"
    # bf16 only: prefill-sized matmuls as torch's bf16 GEMM (activations and outputs rounded
    # to bf16) on CPUs with bf16 dot products; False keeps fp32 math, lossless for bf16
    # checkpoints.
    bf16_prefill: bool = False
    # int4 only: the dtype of the group scale/min tables. bf16 for Sparsa's own quantizer;
    # fp16 when loading GGUF Q4_0/Q4_1 blocks, whose fp16 scales are then kept exactly.
    scale_dtype: torch.dtype = torch.bfloat16
    # int8 only: 0 = one scale per row; 32 = a scale (and min) per group of 32 in
    # `scale_dtype`, GGUF's Q8_0 (its blocks then load unchanged). Linears only: routed
    # experts keep per-row int8.
    int8_group_size: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.bf16_prefill, bool):
            raise ValueError(f"bf16_prefill must be True or False, got {self.bf16_prefill!r}")
        if self.int8_activations not in INT8_ACTIVATIONS:
            raise ValueError(f"int8_activations must be one of {INT8_ACTIVATIONS}, "
                             f"got {self.int8_activations!r}")
        if self.method is None:
            self.method = "none"
        if self.lm_head not in ("same", "int8", "none"):
            raise ValueError(f"lm_head must be 'same', 'int8' or 'none', got {self.lm_head!r}")
        self.method = str(self.method).lower()
        if self.method not in METHODS:
            raise ValueError(f"quantization method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise ValueError(f"group_size must be an integer, got {self.group_size!r}")
        if self.int8_group_size not in (0, 32):
            raise ValueError(f"int8_group_size must be 0 (per row) or 32, got "
                             f"{self.int8_group_size!r}")
        if self.scale_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"scale_dtype must be torch.bfloat16 or torch.float16, got "
                             f"{self.scale_dtype!r}")
        if self.method == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(
                f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}"
            )

    def for_module(self, name: str) -> QuantConfig:
        """The config of module `name` (the LM head may have its own method)."""
        if name == "lm_head" and self.lm_head == "int8" and self.enabled and \
                self.method != "int8":
            from dataclasses import replace

            return replace(self, method="int8", lm_head="same")
        return self

    @property
    def enabled(self) -> bool:
        return self.method != "none"


def _round_bf16(t: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return t.to(dtype).to(torch.float32)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (q int8 [..., N, K], scale fp32 [..., N]) with w ~= q * scale[..., None].

    Symmetric per output channel (row); the scale is bf16-representable."""
    w = w.float().contiguous()
    scale = _round_bf16((w.abs().amax(dim=-1) / 127.0).clamp(min=_MIN_SCALE))
    q = torch.round(w / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int8_padded(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_int8` of w [N, K] with K zero-padded to a multiple of `INT8_K_ALIGN`."""
    K = w.shape[-1]
    Kp = pad_to(K, INT8_K_ALIGN)
    q, scale = quantize_int8(w)
    return (F.pad(q, (0, Kp - K)) if Kp != K else q).contiguous(), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype).unsqueeze(-1)


def quantize_int4(
    w: torch.Tensor, group_size: int, clip_search: bool = True, chunk_rows: int = 2048,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] (K a multiple of group_size) -> (q uint8 [N, K] in [0, 15], scale [N, K/G],
    min [N, K/G]) with w ~= q * scale + min per group; scale/min representable in
    `scale_dtype` (the table the kernels read).

    With clip_search each group's [min, max] range is shrunk about its centre by the factor in
    `_CLIP_RATIOS` that gives the smallest squared error (outliers get clipped when that
    makes the other 31..255 values more precise)."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"K={K} is not a multiple of group_size={group_size}")
    q_out = torch.empty(N, K, dtype=torch.uint8, device=w.device)
    s_out = torch.empty(N, K // group_size, dtype=torch.float32, device=w.device)
    m_out = torch.empty_like(s_out)
    ratios = _CLIP_RATIOS if clip_search else (1.0,)
    for r0 in range(0, N, chunk_rows):
        wg = w[r0 : r0 + chunk_rows].float().reshape(-1, K // group_size, group_size)
        mn, mx = wg.amin(dim=-1), wg.amax(dim=-1)
        centre, half = (mx + mn) / 2, (mx - mn) / 2
        best_err = best_q = best_s = best_m = None
        for ratio in ratios:
            scale = _round_bf16((2 * half * ratio / 15).clamp(min=_MIN_SCALE), scale_dtype)
            lo = _round_bf16(centre - half * ratio, scale_dtype)
            q = torch.round((wg - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(0, 15)
            err = ((q * scale.unsqueeze(-1) + lo.unsqueeze(-1)) - wg).square_().sum(-1)
            if best_err is None:
                best_err, best_q, best_s, best_m = err, q, scale, lo
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_q = torch.where(better.unsqueeze(-1), q, best_q)
                best_s = torch.where(better, scale, best_s)
                best_m = torch.where(better, lo, best_m)
        rows = best_q.shape[0]
        q_out[r0 : r0 + rows] = best_q.reshape(rows, K).to(torch.uint8)
        s_out[r0 : r0 + rows] = best_s
        m_out[r0 : r0 + rows] = best_m
    return q_out, s_out, m_out


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_int4`: q [N, K] with scale/min [N, K/G] -> w [N, K]."""
    N, K = q.shape
    G = K // scale.shape[-1]
    w = q.reshape(N, -1, G).to(dtype) * scale.to(dtype).unsqueeze(-1) + mn.to(dtype).unsqueeze(-1)
    return w.reshape(N, K)


def quantize_int4_packed(weight: torch.Tensor, group_size: int, clip_search: bool = True,
                         scale_dtype: torch.dtype = torch.bfloat16
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (packed [N, Kp/2] uint8, sm [N, 2, Kp/G] in `scale_dtype`) in the
    kernel layout (K zero-padded to `int4_padded_k`)."""
    K = weight.shape[1]
    Kp = int4_padded_k(K, group_size)
    w = weight.float()
    if Kp != K:
        w = F.pad(w, (0, Kp - K))
    q, scale, mn = quantize_int4(w, group_size, clip_search, scale_dtype=scale_dtype)
    sm = torch.stack((scale, mn), dim=1).to(scale_dtype).contiguous()
    return pack_int4(q).contiguous(), sm


def dequantize_int4_packed(packed: torch.Tensor, sm: torch.Tensor, n: int | None = None,
                           k: int | None = None,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed [N, Kp/2], sm [N, 2, Kp/G] -> w [n, k] (default: all of [N, Kp])."""
    smf = sm.to(dtype)
    w = dequantize_int4(unpack_int4(packed), smf[:, 0], smf[:, 1], dtype)
    return w[:n, :k]


def quantize_u8g_padded(weight: torch.Tensor, scale_dtype: torch.dtype = torch.float16
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q [N, Kp] uint8, sm [N, 2, Kp/32]) in the u8g layout: symmetric
    per group of 32 as GGUF's Q8_0 (d = amax / 127 in `scale_dtype`, codes round(w / d) +
    128, min -128 d), K zero padded to `U8G_K_ALIGN`."""
    N, K = weight.shape
    kp = pad_to(K, U8G_K_ALIGN)
    w = F.pad(weight.float(), (0, kp - K)).reshape(N, kp // 32, 32)
    d = _round_bf16((w.abs().amax(dim=-1) / 127.0), scale_dtype)
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(w * inv.unsqueeze(-1)).clamp_(-127, 127) + 128
    sm = torch.stack((d, d * -128), dim=1).to(scale_dtype)
    return q.reshape(N, kp).to(torch.uint8).contiguous(), sm.contiguous()


def dequantize_u8g(q: torch.Tensor, sm: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_u8g_padded`: [N, Kp] (w = q * scale + min, fp32 math)."""
    N, kp = q.shape
    s = sm.float()
    w = q.reshape(N, -1, 32).float() * s[:, 0].unsqueeze(-1) + s[:, 1].unsqueeze(-1)
    return w.reshape(N, kp).to(dtype)


def to_bf16_padded(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> bf16 [N, Kp], zero padded to `BF16_K_ALIGN` (the kernel layout)."""
    K = weight.shape[1]
    w = weight.detach().to(torch.bfloat16)
    kp = pad_to(K, BF16_K_ALIGN)
    return (F.pad(w, (0, kp - K)) if kp != K else w).contiguous()
