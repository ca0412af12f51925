"""A decode step of a `DecoderModel` as a straight run of native calls (CPU, fp32, decode only).

At batch 1 a mixtral-mini int8 step streams ~190 MB of weights in ~4.3 ms, and the Python
around those kernels (module calls, per-call checks, a dozen small torch ops per layer, each
waking the thread pool) took another ~1.3 ms. `NativeDecodePlan` looks at the model once,
checks that every layer is made of parts it knows (standard attention with the fused decode
kernel; a routed MoE block or a SwiGLU MLP; int8 / int4 / bf16 / fp32 linears), and records
what each layer calls. A step then runs, per layer: the qkv GEMV, the fused rotary + KV write
+ paged attention, the output GEMV, the residual add fused with the next RMSNorm, the router
(GEMV + softmax + top-k in one call), the fused MoE kernel, and the next fused add + norm.
An offloaded expert block (`OffloadedExperts`: cache, prefetch and lookahead are Python)
is called as a module for the MoE part only; the rest of its layer runs natively.

It computes what the module path computes, op for op (the same native kernels, the same fp32
adds), except routing, whose router GEMV sums in another order than torch's (tests compare
both paths). Any step it does not cover (a prefill, a batch above the kernels' row limits, a
hooked expert block, another device) takes the module path. `DeviceConfig.native_decode`
(`LLM(native_decode=False)`) turns it off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn
from torch.nn import functional as F

from sparsa.layers.attention import AttentionMetadata
from sparsa.layers.linear import Linear
from sparsa.layers.moe import FusedExperts
from sparsa.layers.norm import RMSNorm
from sparsa.layers.quantization.experts import QuantizedExperts
from sparsa.layers.quantization.matmul import native_max_rows
from sparsa.layers.quantization.modules import (
    Bf16Linear,
    Int4Linear,
    Int8Linear,
)

log = logging.getLogger(__name__)

# (ext, x [T, K]) -> y [T, N]
Step = Callable[[ModuleType, torch.Tensor], torch.Tensor]


class Unsupported(Exception):
    """A part of the model the plan does not cover (the module path runs instead)."""


def _linear(m: nn.Module) -> tuple[Step, int]:
    """The decode call of one linear layer and the most rows it takes natively."""
    bias = getattr(m, "bias", None)
    if isinstance(m, (Int8Linear, Int4Linear, Bf16Linear)):
        step, rows = m.native_call(), m.native_rows()
    elif type(m) is Linear and m.weight.dtype == torch.float32:
        w, rows = m.weight, 1 << 30
        if m.transposed:
            def step(ext, x):
                return x @ w
        else:
            def step(ext, x):
                return F.linear(x, w)
    else:
        raise Unsupported(f"linear layer {type(m).__name__}")
    if bias is None:
        return step, rows
    b = bias.detach().float()
    return (lambda ext, x: step(ext, x) + b), rows


def _norm(m: nn.Module) -> tuple[torch.Tensor, float]:
    if type(m) is not RMSNorm or m.weight.dtype != torch.float32:
        raise Unsupported(f"norm {type(m).__name__}")
    return m.weight, float(m.eps)


def _attention(attn: nn.Module) -> tuple[Callable, int]:
    from sparsa.models.blocks import Attention

    if type(attn) is not Attention:
        raise Unsupported(f"attention {type(attn).__name__}")
    if not attn.fused_decode_options():
        raise Unsupported("attention options outside the fused decode kernel")
    cache = attn.kv_cache
    if (cache is None or cache.k.device.type != "cpu"
            or cache.k.dtype != (torch.int8 if cache.quantized else torch.float32)):
        raise Unsupported("KV cache not fp32 or int8 on the CPU")
    qkv, qkv_rows = _linear(attn.qkv_proj)
    o_proj, o_rows = _linear(attn.o_proj)
    fused = attn.fused_decode_call()

    def step(ext, h, positions, meta: AttentionMetadata):
        return o_proj(ext, fused(ext, qkv(ext, h), positions, meta))

    return step, min(qkv_rows, o_rows)


def _mlp(mlp: nn.Module) -> tuple[Step, int]:
    from sparsa.models.blocks import MLP

    if type(mlp) is not MLP:
        raise Unsupported(f"feed-forward block {type(mlp).__name__}")
    gate_up, r1 = _linear(mlp.gate_up_proj)
    down, r2 = _linear(mlp.down_proj)

    def step(ext, h):
        gate, up = gate_up(ext, h).chunk(2, dim=-1)
        return down(ext, F.silu(gate) * up)

    return step, min(r1, r2)


def _moe(block: nn.Module) -> tuple[Step, int, nn.Module]:
    from sparsa.models.blocks import ROUTE_NATIVE_MAX_ROWS, SparseMoeBlock

    if type(block) is not SparseMoeBlock:
        return (*_mlp(block), None)
    router_w = block.native_router_weight()
    if router_w is None:
        raise Unsupported("router is not a plain fp32 linear")
    experts = block.experts
    k, renorm = block.top_k, block.renormalize
    policy = block.routing_policy
    if policy is not None:  # dynamic routing: the raw ranking, narrowed by the policy
        k, renorm = policy.route_k, False
    # the module path routes natively up to ROUTE_NATIVE_MAX_ROWS rows, torch beyond
    rows = min(native_max_rows("moe"), ROUTE_NATIVE_MAX_ROWS)
    def route(ext, h):
        weights, ids = ext.moe_route(h, router_w, k, renorm)
        return (weights, ids) if policy is None else policy.apply(weights, ids)

    if type(experts) is FusedExperts or (type(experts) is QuantizedExperts
                                         and experts.method == "bf16") or _offloaded(experts):
        # offloaded experts: their module (cache, prefetch, lookahead) for the MoE part only
        rows = ROUTE_NATIVE_MAX_ROWS  # their forward picks its own path for any row count

        def routed(ext, h):
            weights, ids = route(ext, h)
            return experts.forward(h, weights, ids)
    elif type(experts) is not QuantizedExperts:
        raise Unsupported(f"experts {type(experts).__name__}")
    elif experts.method == "int8":
        w13, s13, w2, s2 = experts.w13_q, experts.w13_s, experts.w2_q, experts.w2_s

        def routed(ext, h):
            weights, ids = route(ext, h)
            return ext.moe_int8(h, w13, s13, w2, s2, ids, weights)
    else:
        w13, s13, w2, s2 = experts.w13_q, experts.w13_sm, experts.w2_q, experts.w2_sm
        g = experts.group_size

        def routed(ext, h):
            weights, ids = route(ext, h)
            return ext.moe_int4(h, w13, s13, w2, s2, g, ids, weights)
    if block.shared_expert is None:
        return routed, rows, experts
    shared, r_shared = _mlp(block.shared_expert)
    shared_gate = None
    if block.shared_expert_gate is not None:
        shared_gate, _ = _linear(block.shared_expert_gate)

    def with_shared(ext, h):
        out = routed(ext, h)
        s = shared(ext, h)
        if shared_gate is not None:
            s = torch.sigmoid(shared_gate(ext, h)) * s
        return out + s

    return with_shared, min(rows, r_shared), experts


def _offloaded(experts: nn.Module) -> bool:
    from sparsa.offload.offloaded_experts import OffloadedExperts  # (offload imports layers)

    return type(experts) is OffloadedExperts


class NativeDecodePlan:
    """What each layer of a `DecoderModel` calls in a native decode step (see the module
    doc). Build with `NativeDecodePlan.build(model)`, which returns None for a model it does
    not cover."""

    def __init__(self, model: nn.Module):
        self.layers = []
        self.hooked: list[nn.Module] = []  # expert blocks whose hooks force the module path
        rows = []
        norms = [_norm(layer.input_layernorm) for layer in model.layers] + [_norm(model.norm)]
        self.first_norm = norms[0]
        for i, layer in enumerate(model.layers):
            attn, r_attn = _attention(layer.self_attn)
            ffn, r_ffn, experts = _moe(layer.mlp)
            if experts is not None:
                self.hooked.append(experts)
            self.layers.append((attn, _norm(layer.post_attention_layernorm), ffn, norms[i + 1]))
            rows += [r_attn, r_ffn]
        self.max_rows = min(rows) if rows else 0

    @classmethod
    def build(cls, model: nn.Module) -> NativeDecodePlan | None:
        try:
            plan = cls(model)
        except Unsupported as e:
            log.info("native decode plan: not used (%s); decode steps run module by module", e)
            return None
        log.info("native decode plan: %d layers as straight native calls, %s", len(plan.layers),
                 f"batches of up to {plan.max_rows} rows" if plan.max_rows < 1 << 20
                 else "any batch size")
        return plan

    def covers(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        T = x.shape[0]
        return (meta.num_decodes == T and not meta.prefills and 1 <= T <= self.max_rows
                and x.dtype == torch.float32 and x.device.type == "cpu"
                and not any(e._forward_hooks or e._forward_pre_hooks for e in self.hooked))

    def run(self, ext: ModuleType, x: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata, early_exit: Callable | None = None) -> torch.Tensor:
        """x: the embedded tokens [T, H] (used as the residual stream, updated in place);
        returns the final-normed hidden states. `early_exit(layer, residual, positions,
        meta)` (sparsa.spec.early_exit), called after every layer, may end the step early
        by returning its final hidden state."""
        residual = x
        w, eps = self.first_norm
        h = ext.rms_norm(x, w, eps)
        for i, (attn, (w_post, eps_post), ffn, (w_next, eps_next)) in enumerate(self.layers):
            h = ext.add_rms_norm_(residual, attn(ext, h, positions, meta), w_post, eps_post)
            h = ext.add_rms_norm_(residual, ffn(ext, h), w_next, eps_next)
            if early_exit is not None and (out := early_exit(i, residual, positions,
                                                             meta)) is not None:
                return out
        return h
