"""Storage layouts the native kernels read, and plain-PyTorch references of their math.

int8: ``q [N, Kp]`` int8 with ``Kp`` the input size zero-padded to a multiple of
`INT8_K_ALIGN`, ``scale [N]`` fp32; ``w = q * scale``.

bf16: ``w [N, Kp]`` bf16, ``Kp`` padded to a multiple of `BF16_K_ALIGN`; widened to fp32
exactly (a 16-bit shift), so the math is the fp32 math of the upcast weight.

int4: ``q [N, Kp/2]`` uint8 with ``Kp`` padded to a multiple of `INT4_CHUNK` and of the group
size. Each 32-byte chunk ``c`` of a row holds weights ``64c .. 64c+31`` in its low nibbles and
``64c+32 .. 64c+63`` in its high nibbles: one 256-bit load, an AND and a shift give two
32-weight vectors already in activation order (no shuffles). ``sm [N, 2, Kp/G]`` bf16 holds
per row the group scales, then the group mins (so the kernel reads 8 of either per load):
``w = q * scale + min``, ``q`` in [0, 15].

u8g (8-bit groups of 32, GGUF's Q8_0): ``q [N, Kp]`` uint8 codes ``w / d + 128``, ``Kp``
padded to `U8G_K_ALIGN`; ``sm [N, 2, Kp/32]`` the group scales ``d`` then mins ``-128 d``
(fp16 from a file, exact): ``w = q * scale + min``, the int4 algebra with 8-bit codes.

The kernels quantize activations to int8 per block (symmetric, round half to even, one fp32
scale per block: `INT8_ACT_BLOCK` for int8 weights, the group size for int4 weights, with
blocks of 32 for group 32). `quantize_activations` and the ``*_reference`` functions
reproduce that arithmetic exactly, so tests can hold the kernels to a tight tolerance.
"""

from __future__ import annotations

import torch

INT8_K_ALIGN = 128
BF16_K_ALIGN = 8  # one 8-wide fp32 vector per step
INT8_ACT_BLOCK = 128
INT4_CHUNK = 64
INT4_GROUP_SIZES = (32, 64, 128, 256)
U8G_K_ALIGN = 64  # 8-bit groups of 32 (GGUF Q8_0): rows padded to whole 64-byte lines


def pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def int4_padded_k(k: int, group_size: int) -> int:
    return pad_to(k, max(INT4_CHUNK, group_size))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [..., K] with values 0..15 (K a multiple of 64) -> [..., K/2] uint8 (layout above)."""
    K = q.shape[-1]
    if K % INT4_CHUNK:
        raise ValueError(f"pack_int4 needs K % {INT4_CHUNK} == 0, got K={K}")
    c = q.to(torch.uint8).reshape(*q.shape[:-1], K // INT4_CHUNK, 2, INT4_CHUNK // 2)
    return (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(*q.shape[:-1], K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: [..., K/2] uint8 -> [..., K] uint8 in 0..15."""
    half = packed.shape[-1]
    c = packed.reshape(*packed.shape[:-1], half // 32, 32)
    return torch.cat((c & 15, c >> 4), dim=-1).reshape(*packed.shape[:-1], 2 * half)


def quantize_activations(x: torch.Tensor, kp: int, block: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, K] fp32 -> (q [T, kp] int8 as fp32 values, d [T, kp/block], s [T, kp/block]) as
    the kernels compute them (s: block sums of the quantized x, d * sum(q))."""
    T, K = x.shape
    xp = torch.nn.functional.pad(x.float(), (0, kp - K)).reshape(T, kp // block, block)
    d = xp.abs().amax(dim=-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xp * inv.unsqueeze(-1)).clamp_(-127, 127)
    return q.reshape(T, kp), d, d * q.sum(dim=-1)


def int8_gemm_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What the int8 kernel computes (activations quantized per block), in float64."""
    T, (N, kp) = x.shape[0], q.shape
    xq, d, _ = quantize_activations(x, kp, INT8_ACT_BLOCK)
    nb = kp // INT8_ACT_BLOCK
    dots = torch.einsum("tbk,nbk->tnb", xq.double().reshape(T, nb, -1),
                        q.double().reshape(N, nb, -1))
    return ((dots * d.double().unsqueeze(1)).sum(-1) * scale.double()).float()


def int4_gemm_reference(x: torch.Tensor, q: torch.Tensor, sm: torch.Tensor,
                        group_size: int) -> torch.Tensor:
    """What the int4 kernel computes (activations quantized per group), in float64."""
    T, N, kp = x.shape[0], q.shape[0], q.shape[1] * 2
    ng = kp // group_size
    xq, d, s = quantize_activations(x, kp, group_size)
    w = unpack_int4(q).double().reshape(N, ng, group_size)
    dots = torch.einsum("tgk,ngk->tng", xq.double().reshape(T, ng, -1), w)
    smd = sm.double()
    y = dots * d.double().unsqueeze(1) * smd[:, 0] + s.double().unsqueeze(1) * smd[:, 1]
    return y.sum(-1).float()


def u8g_gemm_reference(x: torch.Tensor, q: torch.Tensor, sm: torch.Tensor) -> torch.Tensor:
    """What the 8-bit-group kernel computes (activations quantized per 32), in float64."""
    T, (N, kp) = x.shape[0], q.shape
    xq, d, _ = quantize_activations(x, kp, 32)
    s = sm.double()
    w = q.double().reshape(N, kp // 32, 32) * s[:, 0].unsqueeze(-1) + s[:, 1].unsqueeze(-1)
    dots = torch.einsum("tgk,ngk->tng", xq.double().reshape(T, kp // 32, 32), w)
    return (dots * d.double().unsqueeze(1)).sum(-1).float()
