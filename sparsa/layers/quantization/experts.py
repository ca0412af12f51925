"""`QuantizedExperts`: the quantized drop-in for `FusedExperts`."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from sparsa import kernels
from sparsa.kernels import ops
from sparsa.kernels.layout import BF16_K_ALIGN, INT8_K_ALIGN, int4_padded_k, pad_to
from sparsa.layers.moe import FusedExperts, GroupedExperts
from sparsa.layers.quantization.matmul import (
    bf16_matmul,
    int4_matmul,
    int8_matmul,
    kernel_policy,
    use_native,
    use_w8a8,
)
from sparsa.layers.quantization.modules import _trusted_ext
from sparsa.layers.quantization.schemes import (
    QuantConfig,
    dequantize_int4_packed,
    dequantize_int8,
    quantize_int4_packed,
    quantize_int8_padded,
    to_bf16_padded,
)


class QuantizedExperts(GroupedExperts):
    """Drop-in for `FusedExperts` with int8, int4 or bf16 expert weights (each expert
    quantized on its own, with the same scheme as the linear layers). Weights are kept [out, in] per
    expert: w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I].

    Small batches run the fused native MoE kernel (one C++ call per layer); larger ones, and
    every non-CPU device, group tokens by expert (`GroupedExperts.forward`) and run each
    active expert's matmuls through `int8_matmul` / `int4_matmul`."""

    # the buffers that hold each method's weights, [E, ...] each
    BUFFERS = {"int8": ("w13_q", "w13_s", "w2_q", "w2_s"),
               "int4": ("w13_q", "w13_sm", "w2_q", "w2_sm"), "bf16": ("w13_w", "w2_w")}

    def __init__(self, experts: FusedExperts, config: QuantConfig):
        super().__init__()
        if not config.enabled:
            raise ValueError("QuantizedExperts needs method int8 or int4")
        if experts.w13.is_meta or experts.w2.is_meta:
            raise ValueError("cannot quantize experts whose weights were never loaded")
        self._init_fields(config, experts.num_experts, experts.hidden_size,
                          experts.intermediate_size)
        E = self.num_experts
        dev = experts.w13.device
        for name, (N, K) in self._shapes.items():
            src = getattr(experts, name).data  # [E, K, N]
            if self.method == "bf16":
                w = torch.empty(E, N, pad_to(K, BF16_K_ALIGN), dtype=torch.bfloat16,
                                device=dev)
                for e in range(E):
                    w[e] = to_bf16_padded(src[e].t())
                self.register_buffer(f"{name}_w", w)
            elif self.method == "int8":
                q = torch.empty(E, N, pad_to(K, INT8_K_ALIGN), dtype=torch.int8, device=dev)
                s = torch.empty(E, N, dtype=torch.float32, device=dev)
                for e in range(E):
                    q[e], s[e] = quantize_int8_padded(src[e].t())
                self.register_buffer(f"{name}_q", q)
                self.register_buffer(f"{name}_s", s)
            else:
                G = self.group_size
                kp = int4_padded_k(K, G)
                q = torch.empty(E, N, kp // 2, dtype=torch.uint8, device=dev)
                sm = torch.empty(E, N, 2, kp // G, dtype=torch.bfloat16, device=dev)
                for e in range(E):
                    q[e], sm[e] = quantize_int4_packed(src[e].t(), G, config.clip_search)
                self.register_buffer(f"{name}_q", q)
                self.register_buffer(f"{name}_sm", sm)
                self.register_buffer(f"{name}_sm_f32", None)

    def load_expert(self, expert: int, which: str, loaded: torch.Tensor) -> None:
        """Quantize one expert's checkpoint projection into place (`streaming`)."""
        from sparsa.layers.quantization.rows import load_expert_rows

        load_expert_rows(self, expert, which, loaded)

    def _init_fields(self, config: QuantConfig, num_experts: int, hidden_size: int,
                     intermediate_size: int) -> None:
        self.method = config.method
        self.group_size = config.group_size
        self.w8a8 = config.int8_activations == "dynamic"
        self.bf16_gemm = config.bf16_prefill
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        # (out features N, in features K) of the two stacked projections
        self._shapes = {"w13": (2 * intermediate_size, hidden_size),
                        "w2": (hidden_size, intermediate_size)}

    @classmethod
    def from_buffers(cls, config: QuantConfig, hidden_size: int, intermediate_size: int,
                     buffers: dict[str, torch.Tensor]) -> QuantizedExperts:
        """A block over already quantized weights (`BUFFERS[method]`, each [E, ...], as
        another QuantizedExperts of the same config holds them): offloaded experts are
        quantized once into a store on disk and rebuilt from its bytes, one per load."""
        m = cls.__new__(cls)
        GroupedExperts.__init__(m)
        names = cls.BUFFERS[config.method]
        m._init_fields(config, buffers[names[0]].shape[0], hidden_size, intermediate_size)
        for name in names:
            m.register_buffer(name, buffers[name])
        if config.method == "int4":
            for name in m._shapes:
                sm = buffers[f"{name}_sm"]
                m.register_buffer(f"{name}_sm_f32",
                                  None if sm.device.type == "cpu" else sm.float())
        return m

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.method == "int4":
            for name in self._shapes:
                sm = getattr(self, f"{name}_sm")
                setattr(self, f"{name}_sm_f32", None if sm.device.type == "cpu" else sm.float())
        return out

    def _mm(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.method == "bf16":
            return bf16_matmul(x, getattr(self, f"{name}_w")[e], self.bf16_gemm)
        if self.method == "int8":
            return int8_matmul(x, getattr(self, f"{name}_q")[e], getattr(self, f"{name}_s")[e],
                               self.w8a8)
        sm32 = getattr(self, f"{name}_sm_f32")
        return int4_matmul(x, getattr(self, f"{name}_q")[e], getattr(self, f"{name}_sm")[e],
                           self.group_size, None if sm32 is None else sm32[e])

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = self._mm("w13", e, x)[:, : 2 * self.intermediate_size]
        gate, up = h.chunk(2, dim=-1)
        return self._mm("w2", e, F.silu(gate) * up)

    def moe_path(self, x: torch.Tensor, topk_ids: torch.Tensor,
                 num_experts: int | None = None) -> str:
        """How `forward` computes this batch: "fused" (the native MoE kernel), "w8a8"
        (int8 x int8 GEMMs per expert, `ops.moe_w8a8`) or "grouped" (`GroupedExperts` with
        `int8_matmul` / `int4_matmul` per expert). `num_experts`: of the whole block, when
        this one holds only some of its experts (offloading: one)."""
        if self.method == "bf16":
            return "grouped"
        if use_native(x, x.shape[0], "moe"):
            return "fused"
        # few rows per expert (batched decode): the fused kernel reads each expert's weights
        # once for all of its rows, which neither int8 GEMMs this thin nor a loop of
        # per-expert int4 matmuls beats
        E = num_experts or self.num_experts
        few = topk_ids.numel() <= kernel_policy().get("moe_fused_rows", 0) * E
        if self.method == "int8" and self.w8a8 and use_w8a8(x) and kernels.available():
            return "fused" if few else "w8a8"
        if self.method == "int4" and few and x.device.type == "cpu" and kernels.available():
            return "fused"
        return "grouped"

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
        path = self.moe_path(x, topk_ids)
        if path == "fused":
            return self.fused_moe(x, topk_weights, topk_ids)
        if path == "w8a8":
            return ops.moe_w8a8(x.float(), self.w13_q, self.w13_s, self.w2_q, self.w2_s,
                                topk_ids, topk_weights).to(x.dtype)
        return super().forward(x, topk_weights, topk_ids)

    def expert_rows(self, path: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU over the rows of x, computed as `forward` computes a batch it
        sends down `path` (`moe_path`): the kernels with one expert and weight 1."""
        if path == "grouped":
            return self.expert_forward(e, x)
        ids = torch.full((x.shape[0], 1), e, dtype=torch.int64, device=x.device)
        ones = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
        if path == "w8a8":
            return ops.moe_w8a8(x.float(), self.w13_q, self.w13_s, self.w2_q, self.w2_s,
                                ids, ones).to(x.dtype)
        return self.fused_moe(x, ones, ids)

    def fused_moe(self, x: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
        """The fused native MoE kernel: called unchecked when the inputs are already in its
        form (it checks the expert ids itself), through the checked wrapper otherwise.
        (Buffers come straight from `_buffers`: offloaded decode calls this per expert, and
        nn.Module's attribute lookup costs ~0.4 us each.)"""
        b = self._buffers
        ext = _trusted_ext(x, x.shape[0])
        if (ext is not None and topk_ids.dtype == torch.int64 and topk_ids.is_contiguous()
                and topk_weights.dtype == torch.float32 and topk_weights.is_contiguous()
                and topk_ids.dim() == 2 and topk_ids.shape[0] == x.shape[0]
                and topk_weights.shape == topk_ids.shape and x.shape[1] == self.hidden_size):
            xf, moe8, moe4 = x, ext.moe_int8, ext.moe_int4
        else:
            xf, moe8, moe4 = x.float(), ops.moe_int8, ops.moe_int4
        if self.method == "int8":
            y = moe8(xf, b["w13_q"], b["w13_s"], b["w2_q"], b["w2_s"], topk_ids, topk_weights)
        else:
            y = moe4(xf, b["w13_q"], b["w13_sm"], b["w2_q"], b["w2_sm"], self.group_size,
                     topk_ids, topk_weights)
        return y.to(x.dtype)

    def dequantize(self, name: str, e: int) -> torch.Tensor:
        """Expert e's effective `name` ('w13' | 'w2') weight in FusedExperts' layout [K, N]."""
        N, K = self._shapes[name]
        if self.method == "bf16":
            w = getattr(self, f"{name}_w")[e][:, :K].float()
        elif self.method == "int8":
            w = dequantize_int8(getattr(self, f"{name}_q")[e][:, :K],
                                getattr(self, f"{name}_s")[e])
        else:
            w = dequantize_int4_packed(getattr(self, f"{name}_q")[e],
                                       getattr(self, f"{name}_sm")[e], N, K)
        return w.t()

    def extra_repr(self) -> str:
        extra = f", group_size={self.group_size}" if self.method == "int4" else ""
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, method={self.method}{extra}")
