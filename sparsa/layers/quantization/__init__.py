"""Weight-only quantization of Linear layers and MoE experts, applied after loading.

Schemes and config in `schemes`, matmul dispatch (native kernel / dequantize + GEMM) in
`matmul`, the drop-in modules in `modules` (linears) and `experts`, whole-model conversion
in `model`. Activations, norms, embeddings and the KV cache stay as they are.
"""

from sparsa.layers.quantization.experts import QuantizedExperts
from sparsa.layers.quantization.matmul import (
    bf16_matmul,
    int4_matmul,
    int4_matmul_reference,
    int8_matmul,
    int8_matmul_reference,
    kernel_policy,
)
from sparsa.layers.quantization.model import module_bytes, quantize_linear, quantize_model
from sparsa.layers.quantization.modules import (
    Bf16Linear,
    Int4Linear,
    Int8Linear,
)
from sparsa.layers.quantization.schemes import (
    INT4_GROUP_SIZES,
    METHODS,
    QuantConfig,
    dequantize_int4,
    dequantize_int4_packed,
    dequantize_int8,
    quantize_int4,
    quantize_int4_packed,
    quantize_int8,
    quantize_int8_padded,
)

__all__ = [
    "INT4_GROUP_SIZES",
    "METHODS",
    "Bf16Linear",
    "Int4Linear",
    "Int8Linear",
    "QuantConfig",
    "QuantizedExperts",
    "bf16_matmul",
    "dequantize_int4",
    "dequantize_int4_packed",
    "dequantize_int8",
    "int4_matmul",
    "int4_matmul_reference",
    "int8_matmul",
    "int8_matmul_reference",
    "kernel_policy",
    "module_bytes",
    "quantize_int4",
    "quantize_int4_packed",
    "quantize_int8",
    "quantize_int8_padded",
    "quantize_linear",
    "quantize_model",
]
