"""Weights that arrive already quantized in groups of 32 (GGUF's Q4_0, Q4_1, Q8_0 blocks).

Q4_0 and Q4_1 are ``w = q * scale + min`` per group of 32 with fp16 scale (and min; Q4_0's
min is ``-8 * scale``, exact in fp16), which is Sparsa's int4 form at group size 32 with an
fp16 scale table: the codes and scales are copied, not re-quantized, so the weights the
kernels multiply are exactly the file's. Q8_0 (``w = d * q``, q int8) is the u8g form with
codes ``q + 128`` and min ``-128 d`` (see `sparsa.kernels.layout`), exact the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from sparsa.kernels.layout import pack_int4

GROUP = 32


@dataclass
class Int4Rows:
    """Rows of a weight [n, K] as 4-bit codes q (uint8, 0..15) with per-32 fp16 scale and
    min [n, K/32]."""

    q: torch.Tensor
    scale: torch.Tensor
    min: torch.Tensor

    def __post_init__(self) -> None:
        n, k = self.q.shape
        if k % GROUP or self.scale.shape != (n, k // GROUP) or \
                self.min.shape != self.scale.shape:
            raise ValueError(f"4-bit rows of shape {(n, k)} need [n, K/{GROUP}] scales, got "
                             f"{tuple(self.scale.shape)} and {tuple(self.min.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.q.shape[1])

    def __getitem__(self, rows: slice) -> Int4Rows:
        return Int4Rows(self.q[rows], self.scale[rows], self.min[rows])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in fp32 arithmetic (as the `gguf` package decodes it), then `dtype`."""
        n, k = self.shape
        w = self.q.reshape(n, -1, GROUP).float() * self.scale.float().unsqueeze(-1) \
            + self.min.float().unsqueeze(-1)
        return w.reshape(n, k).to(dtype)

    def packed(self, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes packed in the kernel layout [n, kp/2], sm [n, 2, kp/32] fp16), K zero
        padded to kp (padding groups have scale and min 0, so they add nothing)."""
        k = self.shape[1]
        q = F.pad(self.q, (0, kp - k))
        sm = torch.stack((self.scale, self.min), dim=1).to(torch.float16)
        sm = F.pad(sm, (0, kp // GROUP - k // GROUP))
        return pack_int4(q).contiguous(), sm.contiguous()


@dataclass
class Int8Rows:
    """Rows of a weight [n, K] as GGUF's Q8_0 holds them: int8 codes q with one fp16 scale
    per group of 32 [n, K/32], w = q * scale."""

    q: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        n, k = self.q.shape
        if k % GROUP or self.scale.shape != (n, k // GROUP):
            raise ValueError(f"8-bit rows of shape {(n, k)} need [n, K/{GROUP}] scales, got "
                             f"{tuple(self.scale.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.q.shape[1])

    def __getitem__(self, rows: slice) -> Int8Rows:
        return Int8Rows(self.q[rows], self.scale[rows])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.shape
        w = self.q.reshape(n, -1, GROUP).float() * self.scale.float().unsqueeze(-1)
        return w.reshape(n, k).to(dtype)

    def packed(self, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes q + 128 [n, kp] uint8, sm [n, 2, kp/32] fp16: scales, then mins -128 d)
        in the u8g layout; padding groups have scale and min 0."""
        k = self.shape[1]
        q = F.pad((self.q.to(torch.int16) + 128).to(torch.uint8), (0, kp - k))
        d = self.scale.to(torch.float16)
        sm = torch.stack((d, (d.float() * -128).to(torch.float16)), dim=1)
        sm = F.pad(sm, (0, kp // GROUP - k // GROUP))
        return q.contiguous(), sm.contiguous()


QuantizedRows = Int4Rows | Int8Rows
