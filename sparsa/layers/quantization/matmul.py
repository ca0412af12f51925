"""Quantized matmuls: pick the native kernel, torch's packed kernel or dequantize + GEMM.

* Few rows (decode) on CPU: the AVX2 kernels of `sparsa.kernels` (weights streamed once,
  activations quantized to int8 per block; see `sparsa.kernels.layout`).
* int8 with more rows (prefill, batched decode) on CPU: W8A8, each activation row quantized
  to int8 with its own scale and one ``torch._int_mm`` (oneDNN's int8 GEMM: VNNI where the CPU
  has it, ``vpmaddubsw`` otherwise) over the stored int8 weight: several times faster than
  dequantize + fp32 GEMM (figures in BENCHMARKS.md). ``int8_activations="none"`` turns it
  off (exact activations).
* Otherwise (int4, bf16, that switch off, or no native kernels): the weight is dequantized
  tile by tile to the activation dtype and multiplied with torch's GEMM. Without the native
  kernels, int8 at small row counts still uses torch's packed ``_weight_int8pack_mm``. This
  path is plain PyTorch and also runs on CUDA.

`kernel_policy()` holds the row thresholds; ``SPARSA_QUANT_NATIVE_MAX_ROWS`` overrides them.
"""

from __future__ import annotations

import os

import torch
from torch.nn import functional as F

from sparsa import kernels
from sparsa.kernels import ops
from sparsa.layers.quantization.schemes import (
    dequantize_int4_packed,
    dequantize_int8,
    dequantize_u8g,
)
from sparsa.platform import cpu_has_bf16_dot

_INT8_OP = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
_INT_MM = getattr(torch, "_int_mm", None)
_DEQUANT_BLOCK_ELEMS = 1 << 21  # weights dequantized at a time (8 MiB fp32, stays in L3)
_TORCH_INT8_MAX_ROWS = 16  # torch's packed int8 kernel vs dequant + GEMM, AVX2, 2 threads

_policy: dict[str, int] | None = None
# a policy without a key for one of the lossy fast paths (W8A8, int4 bf16 GEMM) never takes it
_NEVER = 1 << 62


def kernel_policy() -> dict[str, int]:
    """Largest row count (tokens; for MoE, tokens in the batch) that uses the native kernels,
    per op. Measured single-threaded on mixtral-mini shapes (5632x1024, 1024x2816) on this
    AVX2 CPU without VNNI, on a shared machine: the native kernels' time grows ~linearly per
    row (integer dot products), dequantize + fp32 GEMM costs a fixed dequantization plus an
    MKL GEMM that is slow for small row counts; native won up to 64 rows and tied at 128.
    The thresholds sit lower (32 / 16) since an idle machine's fp32 GEMM gains more."""
    global _policy
    if _policy is None:
        # w8a8: rows above which the int8 x int8 GEMM beats the native kernel (measured
        # 2x at 16 rows, 0.5x at 4, with and without VNNI)
        # int4_bf16: rows above which int4 runs a bf16 GEMM on CPUs with bf16 dot-product
        # instructions (4.4x the fp32 GEMM at 512 rows; Qwen3-MoE prefill gives each of its
        # 64 experts ~64 rows, and 16 rather than 64 took its pp512 from 797 to 1533 tok/s)
        # moe_fused_rows: mean rows per expert up to which a batch past `moe` still runs
        # the fused kernel (batched decode) rather than W8A8 GEMMs (int8; mixtral-mini
        # shapes: equal at 16, the GEMMs 1.35x faster at 32, the fused kernel 1.7x faster
        # at 4) or per-expert matmuls (int4; Qwen3-MoE-mini batch 32, ~4 rows per expert:
        # 605-662 vs 427-433 tok/s)
        # bf16_gemm: rows above which bf16 weights with bf16_prefill run torch's bf16 GEMM
        policy = {"int8": 32, "int4": 32, "bf16": 32, "moe": 16, "w8a8": 8, "int4_bf16": 16,
                  "moe_fused_rows": 16, "bf16_gemm": 16}
        env = os.environ.get("SPARSA_QUANT_NATIVE_MAX_ROWS")
        if env:
            policy = dict.fromkeys(policy, int(env))
        _policy = policy
    return _policy


def use_native(x: torch.Tensor, rows: int, op: str) -> bool:
    return (x.device.type == "cpu" and 1 <= rows <= kernel_policy()[op]
            and kernels.available())


def native_max_rows(op: str, w8a8: bool = False) -> int:
    """Most rows `op` sends to the native kernel: its threshold, and with `w8a8` never past
    the row count where the W8A8 GEMM takes over."""
    policy = kernel_policy()
    return min(policy[op], policy.get("w8a8", _NEVER)) if w8a8 else policy[op]


def use_w8a8(x: torch.Tensor) -> bool:
    return (_INT_MM is not None and x.device.type == "cpu"
            and x.shape[0] > kernel_policy().get("w8a8", _NEVER))


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                w8a8: bool = False) -> torch.Tensor:
    """x [T, K] @ (q [N, Kp] * scale [N, 1])^T -> [T, N] in x's dtype. `w8a8` lets rows
    beyond the native-kernel threshold run as an int8 x int8 GEMM (see the module doc)."""
    T = x.shape[0]
    if w8a8 and use_w8a8(x):
        return w8a8_matmul(x.float(), q, scale).to(x.dtype)
    if use_native(x, T, "int8"):
        return ops.int8_gemm(x.float(), q, scale).to(x.dtype)
    if x.shape[1] != q.shape[1]:
        x = F.pad(x, (0, q.shape[1] - x.shape[1]))
    if (_INT8_OP is not None and x.device.type == "cpu" and T <= _TORCH_INT8_MAX_ROWS
            and not kernels.available()):
        xb = x.to(torch.bfloat16).contiguous()  # its fp32 path is a slow generic loop
        return _INT8_OP(xb, q, scale.to(torch.bfloat16)).to(x.dtype)
    return int8_matmul_reference(x, q, scale)


def quantize_rows_int8_reference(x: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of x [T, K] (zero padded to kp), as the native kernel does it."""
    d = x.abs().amax(dim=-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(x * inv[:, None]).clamp_(-127, 127).to(torch.int8)
    if kp != x.shape[1]:
        q = F.pad(q, (0, kp - x.shape[1]))
    return q.contiguous(), d


def w8a8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 x [T, K] @ (q [N, Kp] * scale)^T via a per-row int8 quantization of x and an
    int32-accumulating int8 GEMM; the only error is the activations' rounding."""
    native = x.device.type == "cpu" and kernels.available()
    if native:
        xq, xs = ops.quantize_rows_int8(x, q.shape[1])
    else:
        xq, xs = quantize_rows_int8_reference(x, q.shape[1])
    acc = _INT_MM(xq, q.t())
    if native:
        return ops.scale_int32_rows(acc, xs, scale)
    return acc.float() * xs[:, None] * scale[None, :]


def _dt(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype.is_floating_point else torch.float32


def int8_matmul_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dequantize row tiles of the weight and GEMM (x already padded to q's K)."""
    N, K = q.shape
    dt = _dt(x)
    xd = x.to(dt)
    step = max(1, _DEQUANT_BLOCK_ELEMS // K)
    out = torch.empty(x.shape[0], N, dtype=dt, device=x.device)
    native = x.device.type == "cpu" and dt == torch.float32 and kernels.available()
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        w = ops.int8_dequant(q[n0:n1], scale[n0:n1]) if native \
            else dequantize_int8(q[n0:n1], scale[n0:n1], dt)
        out[:, n0:n1] = xd @ w.t()
    return out


def use_bf16_gemm(x: torch.Tensor, op: str) -> bool:
    """Whether x's rows go to a bf16 GEMM: on the CPU, more rows than the policy's `op`
    threshold, and a CPU with bf16 dot products."""
    return (x.device.type == "cpu" and x.shape[0] > kernel_policy().get(op, _NEVER)
            and cpu_has_bf16_dot())


def int4_matmul(x: torch.Tensor, q: torch.Tensor, sm: torch.Tensor, group_size: int,
                sm_f32: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ W^T for the int4 weight (q [N, Kp/2], sm [N, 2, Kp/G] bf16) -> [T, N] in
    x's dtype. `sm_f32` (the same table in fp32) serves the reference path off the CPU."""
    T = x.shape[0]
    if use_native(x, T, "int4"):
        return ops.int4_gemm(x.float(), q, sm, group_size).to(x.dtype)
    kp = q.shape[1] * 2
    if x.shape[1] != kp:
        x = F.pad(x, (0, kp - x.shape[1]))
    if sm_f32 is None and use_bf16_gemm(x, "int4_bf16"):
        return int4_matmul_reference(x.float(), q, sm, group_size, torch.bfloat16).to(x.dtype)
    return int4_matmul_reference(x, q, sm if sm_f32 is None else sm_f32, group_size)


def int4_matmul_reference(x: torch.Tensor, q: torch.Tensor, sm: torch.Tensor,
                          group_size: int, gemm_dtype: torch.dtype | None = None
                          ) -> torch.Tensor:
    """Dequantize row tiles of the int4 weight and GEMM (x already padded). `gemm_dtype`
    bfloat16 runs the GEMM in bf16 (activations and weights rounded to bf16; the output
    stays fp32): the int4 prefill path on CPUs with bf16 dot products."""
    N, kp = q.shape[0], q.shape[1] * 2
    dt = _dt(x)
    xd = x.to(gemm_dtype or dt)
    step = max(1, _DEQUANT_BLOCK_ELEMS // kp)
    out = torch.empty(x.shape[0], N, dtype=dt, device=x.device)
    native = (x.device.type == "cpu" and dt == torch.float32 and sm.dtype in ops.SM_DTYPES
              and kernels.available())
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        w = ops.int4_dequant(q[n0:n1], sm[n0:n1], group_size) if native \
            else dequantize_int4_packed(q[n0:n1], sm[n0:n1], dtype=dt)
        out[:, n0:n1] = xd @ w.to(xd.dtype).t()
    return out


def u8g_matmul(x: torch.Tensor, q: torch.Tensor, sm: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ W^T for 8-bit groups of 32 (q [N, Kp] uint8, sm [N, 2, Kp/32]) -> [T, N]
    in x's dtype: the native kernel for decode-sized x, else row tiles decoded (exactly)
    and a GEMM (fp32, or bf16 where `int4_matmul` would take one)."""
    T = x.shape[0]
    if use_native(x, T, "int8"):
        return ops.u8g_gemm(x.float(), q, sm).to(x.dtype)
    kp = q.shape[1]
    if x.shape[1] != kp:
        x = F.pad(x, (0, kp - x.shape[1]))
    dt = _dt(x)
    # prefill on CPUs with bf16 dot products: a bf16 GEMM, as the int4 path takes it
    gemm_dt = torch.bfloat16 if use_bf16_gemm(x, "int4_bf16") else dt
    xd = x.to(gemm_dt)
    step = max(1, _DEQUANT_BLOCK_ELEMS // kp)
    out = torch.empty(T, q.shape[0], dtype=dt, device=x.device)
    for n0 in range(0, q.shape[0], step):
        n1 = min(q.shape[0], n0 + step)
        out[:, n0:n1] = xd @ dequantize_u8g(q[n0:n1], sm[n0:n1], gemm_dt).t()
    return out


def bf16_matmul(x: torch.Tensor, w: torch.Tensor, bf16_gemm: bool = False) -> torch.Tensor:
    """x [T, K] @ w^T for a bf16 weight w [N, Kp] (zero padded past K), computed in fp32 (or
    x's dtype off the CPU): exact upcast of the weight, no bf16 GEMM on a CPU without one.
    `bf16_gemm` (QuantConfig.bf16_prefill): prefill-sized x on a CPU with bf16 dot products
    runs torch's bf16 GEMM instead, lossy (activations and outputs rounded to bf16)."""
    T = x.shape[0]
    if use_native(x, T, "bf16"):
        return ops.bf16_gemm(x.float(), w).to(x.dtype)
    if x.shape[1] != w.shape[1]:
        x = F.pad(x, (0, w.shape[1] - x.shape[1]))
    dt = _dt(x)
    if x.device.type != "cpu" and dt == torch.bfloat16:
        return x @ w.t()  # a GPU with bf16 GEMMs
    if bf16_gemm and use_bf16_gemm(x, "bf16_gemm"):
        # torch on CPU has no bf16 GEMM with an fp32 output (mm's out_dtype is CUDA-only)
        return (x.to(torch.bfloat16) @ w.t()).to(x.dtype)
    xd = x.to(dt)
    N, K = w.shape
    step = max(1, _DEQUANT_BLOCK_ELEMS // K)
    out = torch.empty(T, N, dtype=dt, device=x.device)
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        out[:, n0:n1] = xd @ w[n0:n1].to(dt).t()
    return out
