"""The blocks a decoder layer is made of (attention, dense MLP, sparse MoE) and the config
helpers the model families share; decoder.py stacks them into a model."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from sparsa import kernels
from sparsa.layers.attention import AttentionMetadata, KVCache, native_decode, paged_attention
from sparsa.layers.linear import Linear
from sparsa.layers.moe import FusedExperts, softmax_topk
from sparsa.layers.norm import RMSNorm
from sparsa.layers.rotary import get_rope

# Most rows routed by the native call (sparsa.kernels: moe_route); the native decode step
# never takes more (its MoE kernel's limit is 16).
ROUTE_NATIVE_MAX_ROWS = 16


def cfg(config, name: str, default=None):
    value = getattr(config, name, default)
    return default if value is None else value


def head_dim_of(config) -> int:
    return cfg(config, "head_dim") or config.hidden_size // config.num_attention_heads


def check_activation(config) -> None:
    act = cfg(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"unsupported hidden_act {act!r}: only SwiGLU (silu) MLPs are supported")


def sliding_window_for_layer(config, layer_idx: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] != "sliding_attention":
        return None
    return int(window)


class Attention(nn.Module):
    """Multi-head attention with GQA/MQA, optional q/k RMSNorm ('head' or 'full') and
    optional qkv clipping, over the paged KV cache."""

    def __init__(
        self,
        config,
        layer_idx: int,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: str | None = None,
    ):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = cfg(config, "num_key_value_heads", self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        self.head_dim = head_dim_of(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(
            config.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=qkv_bias
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=o_bias)
        self.qk_norm = qk_norm
        eps = cfg(config, "rms_norm_eps", 1e-6)
        if qk_norm == "head":
            self.q_norm = RMSNorm(self.head_dim, eps)
            self.k_norm = RMSNorm(self.head_dim, eps)
        elif qk_norm == "full":
            self.q_norm = RMSNorm(self.q_size, eps)
            self.k_norm = RMSNorm(self.kv_size, eps)
        self.clip_qkv = getattr(config, "clip_qkv", None)
        self.rotary = get_rope(
            config, self.head_dim, cfg(config, "max_position_embeddings", 4096)
        )
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.sliding_window = sliding_window_for_layer(config, layer_idx)
        self.kv_cache: KVCache | None = None

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        return self.num_kv_heads, self.head_dim, self.head_dim

    def _head_norms(self) -> tuple:
        if self.qk_norm != "head":
            return None, None, 1e-6
        return self.q_norm.weight, self.k_norm.weight, self.q_norm.eps

    def fused_decode_options(self) -> bool:
        """Whether this layer's options fit the fused native decode step (per-head or no
        q/k norm, no qkv clipping, NeoX rotary with fp32 tables)."""
        return (self.qk_norm in (None, "head") and self.clip_qkv is None
                and not self.rotary.interleaved and self.rotary.cos.dtype == torch.float32)

    def _fused_decode(self, qkv: torch.Tensor, meta: AttentionMetadata) -> bool:
        """All-decode step of plain attention on CPU: rotary, KV write and attention run as
        one native call (at batch 1 the dozen small ops around them cost as much as the
        attention itself)."""
        return (meta.num_decodes == qkv.shape[0] and not meta.prefills
                and qkv.is_contiguous() and self.fused_decode_options()
                and native_decode(qkv, self.kv_cache.k, self.kv_cache.v))

    def fused_decode_step(self, ext, qkv: torch.Tensor, positions: torch.Tensor,
                          meta: AttentionMetadata) -> torch.Tensor:
        """Rotary + KV write + paged attention of an all-decode batch in one native call,
        unchecked: the cache pools, tables and norms are the engine's own (their shapes are
        fixed at load; block ids are checked in C++). Returns [T, Hq * D] before o_proj."""
        return self.fused_decode_call()(ext, qkv, positions, meta)

    def fused_decode_call(self):
        """`fused_decode_step` with this layer's tensors and settings bound now, for the
        native decode plan (no nn.Module attribute lookups per step)."""
        rotary, rd = self.rotary, self.rotary.rotary_dim
        k_pool, v_pool = self.kv_cache.k, self.kv_cache.v
        k_scales, v_scales = self.kv_cache.k_scale, self.kv_cache.v_scale
        scale, window, heads = self.scale, self.sliding_window or 0, self.num_heads
        norms = self._head_norms()

        def step(ext, qkv, positions, meta: AttentionMetadata):
            cos, sin = rotary.tables_2d(positions)
            return ext.decode_attention_step(
                qkv, cos, sin, rd, k_pool, v_pool, meta.slot_mapping, meta.decode_block_tables,
                meta.decode_context_lens, scale, window, heads, *norms, meta.decode_tree,
                k_scales, v_scales)

        return step

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        if self._fused_decode(qkv, meta):
            return self.o_proj(self.fused_decode_step(kernels.load(), qkv, positions, meta))
        q, k, v = self.qkv_heads(qkv, positions)
        o = paged_attention(q, k, v, self.kv_cache, meta, self.scale, self.sliding_window)
        return self.o_proj(o.reshape(T, -1))

    def qkv_heads(self, qkv: torch.Tensor, positions: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection [T, (Hq + 2 Hkv) D] as per-head q, k, v, clipped, normed
        and rotated as the model does."""
        T = qkv.shape[0]
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return q, k, v


class MLP(nn.Module):
    """SwiGLU feed-forward with fused gate/up projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, [intermediate_size, intermediate_size], bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SparseMoeBlock(nn.Module):
    """Router + experts (+ optional shared expert with a sigmoid gate, as in Qwen-MoE)."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
        shared_intermediate_size: int = 0,
        shared_gate: bool = False,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be in [1, {num_experts}]")
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = Linear(hidden_size, num_experts)
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size)
        self.shared_expert = (
            MLP(hidden_size, shared_intermediate_size) if shared_intermediate_size else None
        )
        self.shared_expert_gate = Linear(hidden_size, 1) if shared_gate else None
        # sparsa.layers.dynamic_routing.DynamicRouting when dynamic routing is on
        self.routing_policy = None

    @property
    def num_routed_experts(self) -> int:
        return self.gate.weight.shape[1] if self.gate.transposed else self.gate.weight.shape[0]

    @property
    def renormalizes_top_k(self) -> bool:
        return self.renormalize

    def native_router_weight(self) -> torch.Tensor | None:
        """The router's [H, E] fp32 weight when the native `moe_route` can apply it (a plain
        transposed fp32 Linear without bias), else None."""
        gate = self.gate
        if (type(gate) is Linear and gate.transposed and gate.bias is None
                and gate.weight.dtype == torch.float32):
            return gate.weight
        return None

    def route(self, x: torch.Tensor, guess: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, ids) [T, k]; guess=True: a lookahead's guess (dynamic routing does not
        count it)."""
        policy = self.routing_policy
        if policy is None:
            return self._route(x, self.top_k, self.renormalize)
        return policy.apply(*self._route(x, policy.route_k, False), count=not guess)

    def _route(self, x: torch.Tensor, top_k: int, renormalize: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if (x.dim() == 2 and x.shape[0] <= ROUTE_NATIVE_MAX_ROWS and x.dtype == torch.float32
                and x.device.type == "cpu" and x.is_contiguous()
                and not (x.requires_grad and torch.is_grad_enabled())):
            w = self.native_router_weight()
            ext = kernels.load() if w is not None else None
            if ext is not None:
                # one call for GEMV + softmax + top-k, as the native decode step routes; torch's
                # blocked GEMM is 3x faster from a few dozen rows on (prefill)
                return ext.moe_route(x, w, top_k, renormalize)
        return softmax_topk(self.gate(x), top_k, renormalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out
