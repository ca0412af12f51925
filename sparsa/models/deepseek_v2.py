"""DeepSeek-V2 / V2-Lite: multi-head latent attention (MLA) and DeepSeek-MoE routing.

Numerics follow transformers' `DeepseekV2ForCausalLM` (the parity reference):

* MLA: q comes from `q_proj`, or from the low-rank `q_a_proj -> q_a_layernorm -> q_b_proj`;
  `kv_a_proj_with_mqa` gives a compressed latent (kv_lora_rank) plus one rope key (shared by
  every head), and `kv_b_proj` expands the normed latent into per-head k_nope and v.
* RoPE covers only the last `qk_rope_head_dim` dims of q and the shared k_pe, and pairs
  adjacent dims (complex/interleaved layout), unlike Llama's half-split layout.
* The softmax scale is qk_head_dim**-0.5 times yarn's mscale(factor, mscale_all_dim)**2.
* Routing: softmax over experts, then greedy or group-limited top-k, weights times
  routed_scaling_factor; shared experts are added ungated.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsa.layers.attention import AttentionMetadata, KVCache, paged_attention
from sparsa.layers.linear import Linear
from sparsa.layers.moe import FusedExperts, grouped_topk, softmax_topk
from sparsa.layers.norm import RMSNorm
from sparsa.layers.rotary import RotaryEmbedding, rope_parameters
from sparsa.models.decoder import MLP, DecoderForCausalLM, DecoderLayer, cfg

# transformers builds q_a_layernorm / kv_a_layernorm with the RMSNorm default eps, not
# config.rms_norm_eps, so the latent norms use this constant too.
_LATENT_NORM_EPS = 1e-6

# Checkpoint names -> our modules. q (full or q_a) and kv_a_proj_with_mqa read the same
# input, so they are fused into one GEMM (`qkv_a_proj`, shards 0 and 1). These rules run
# before the loader's defaults, which would otherwise send `q_proj` to a `qkv_proj` shard.
_FUSED_RULES: list[tuple[str, str, int | str | None]] = [
    (r"^(.*)\.self_attn\.(?:q_proj|q_a_proj)\.(weight|bias)$", r"\1.self_attn.qkv_a_proj.\2", 0),
    (r"^(.*)\.self_attn\.kv_a_proj_with_mqa\.(weight|bias)$", r"\1.self_attn.qkv_a_proj.\2", 1),
]
# q_proj never has a bias while kv_a_proj_with_mqa has one when attention_bias is set, so
# that combination can't share a fused Linear: q_proj is only renamed out of the defaults'
# way and kv_a_proj_with_mqa loads under its own name.
_UNFUSED_RULES: list[tuple[str, str, int | str | None]] = [
    (r"\.self_attn\.q_proj\.(weight|bias)$", r".self_attn.q_head_proj.\1", None),
]


def _fuse_q_with_kv_a(config) -> bool:
    return cfg(config, "q_lora_rank") is not None or not cfg(config, "attention_bias", False)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention-temperature factor (identity for scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def mla_softmax_scale(config) -> float:
    """qk_head_dim**-0.5, times mscale(factor, mscale_all_dim)**2 for any scaled RoPE that
    sets mscale_all_dim. YaRN stretches the rope frequencies, so DeepSeek compensates the
    logit temperature here; the cos/sin tables carry the separate mscale/mscale_all_dim
    ratio (transformers' yarn `attention_factor`, applied by RotaryEmbedding)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    mscale_all_dim = params.get("mscale_all_dim") or 0
    if params["rope_type"] != "default" and mscale_all_dim:
        m = yarn_mscale(float(params["factor"]), float(mscale_all_dim))
        scale *= m * m
    return scale


class MLAttention(nn.Module):
    """Multi-head latent attention over the paged KV cache.

    The cache holds the expanded per-head K ([qk_nope | qk_rope]) and V (v_head_dim), so
    the shared paged_attention kernel works unchanged. Caching the compressed latent
    (kv_lora_rank + qk_rope_head_dim per token, ~10x smaller for V2-Lite) and absorbing
    kv_b_proj into q / o_proj is the follow-up optimisation.
    """

    def __init__(self, config, layer_idx: int, rotary: RotaryEmbedding):
        super().__init__()
        self.layer_idx = layer_idx
        # MLA gives every head its own K and V (from kv_b_proj), so num_key_value_heads
        # plays no role (DeepSeek configs set it equal to num_attention_heads).
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = cfg(config, "q_lora_rank")
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        hidden = config.hidden_size
        bias = bool(cfg(config, "attention_bias", False))

        q_full = self.num_heads * self.qk_head_dim
        self.q_in_size = q_full if self.q_lora_rank is None else self.q_lora_rank
        self.latent_size = self.kv_lora_rank + self.qk_rope_head_dim
        if _fuse_q_with_kv_a(config):
            self.qkv_a_proj: Linear | None = Linear(
                hidden, [self.q_in_size, self.latent_size], bias=bias
            )
        else:
            self.qkv_a_proj = None
            self.q_head_proj = Linear(hidden, q_full, bias=False)
            self.kv_a_proj_with_mqa = Linear(hidden, self.latent_size, bias=bias)
        if self.q_lora_rank is not None:
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = Linear(self.q_lora_rank, q_full, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, _LATENT_NORM_EPS)
        self.kv_b_proj = Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim),
            bias=False,
        )
        self.o_proj = Linear(self.num_heads * self.v_head_dim, hidden, bias=bias)
        self.rotary = rotary
        self.scale = mla_softmax_scale(config)
        self.kv_cache: KVCache | None = None

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(heads, K head dim, V head dim) of this layer's paged cache."""
        return self.num_heads, self.qk_head_dim, self.v_head_dim

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        T, H = x.shape[0], self.num_heads
        nope, rope = self.qk_nope_head_dim, self.qk_rope_head_dim
        if self.qkv_a_proj is not None:
            q, latent = self.qkv_a_proj(x).split([self.q_in_size, self.latent_size], dim=-1)
        else:
            q, latent = self.q_head_proj(x), self.kv_a_proj_with_mqa(x)
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q_nope, q_pe = q.reshape(T, H, self.qk_head_dim).split([nope, rope], dim=-1)

        kv_c, k_pe = latent.split([self.kv_lora_rank, rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_c)).reshape(T, H, nope + self.v_head_dim)
        k_nope, v = kv.split([nope, self.v_head_dim], dim=-1)

        # k_pe is one head shared by all query heads: rotate it once, broadcast afterwards.
        # The interleaved rotary returns rope dims de-interleaved; q and k get the same
        # permutation, so q.k (and hence attention) equals transformers' complex rotation.
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe.unsqueeze(1))
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.expand(T, H, rope)), dim=-1)
        o = paged_attention(q, k, v, self.kv_cache, meta, self.scale)
        return self.o_proj(o.reshape(T, H * self.v_head_dim))


class DeepseekV2MoE(nn.Module):
    """Routed experts (softmax, greedy or group-limited top-k, times routed_scaling_factor)
    plus ungated shared experts.

    transformers' DeepSeek-V2 router ignores `norm_topk_prob` (its router deletes the
    attribute), so it is ignored here too; every released V2 checkpoint sets it False.
    """

    def __init__(self, config):
        super().__init__()
        num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        if not 1 <= self.top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({self.top_k}) must be in [1, {num_experts}]")
        self.topk_method = cfg(config, "topk_method", "greedy")
        if self.topk_method == "group_limited_greedy":
            self.n_group = cfg(config, "n_group")
            self.topk_group = cfg(config, "topk_group")
            if not self.n_group or not self.topk_group or num_experts % self.n_group:
                raise ValueError(
                    f"group_limited_greedy needs n_group dividing n_routed_experts "
                    f"({num_experts}) and topk_group; got n_group={self.n_group}, "
                    f"topk_group={self.topk_group}"
                )
            if not 1 <= self.topk_group <= self.n_group or \
                    self.top_k > self.topk_group * (num_experts // self.n_group):
                raise ValueError(
                    f"topk_group={self.topk_group} of n_group={self.n_group} groups leaves "
                    f"fewer than num_experts_per_tok={self.top_k} experts"
                )
        elif self.topk_method != "greedy":
            raise ValueError(
                f"unsupported topk_method {self.topk_method!r} for DeepSeek-V2: "
                "expected 'greedy' or 'group_limited_greedy'"
            )
        self.routed_scaling_factor = float(cfg(config, "routed_scaling_factor", 1.0))
        self.num_routed_experts = num_experts
        self.renormalizes_top_k = False
        # sparsa.layers.dynamic_routing.DynamicRouting when dynamic routing is on
        self.routing_policy = None
        hidden, inter = config.hidden_size, config.moe_intermediate_size
        self.gate = Linear(hidden, num_experts)
        self.experts = FusedExperts(num_experts, hidden, inter)
        n_shared = cfg(config, "n_shared_experts", 0)
        self.shared_experts = (
            MLP(hidden, inter * n_shared, bias=bool(cfg(config, "mlp_bias", False)))
            if n_shared else None
        )

    def route(self, x: torch.Tensor, guess: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] fp32, expert ids [T, k]); guess: as SparseMoeBlock.route's."""
        # Router logits in fp32 like transformers: bf16 logits can flip near-tied choices.
        logits = x.float() @ self.gate.weight.float()
        policy = self.routing_policy
        k = self.top_k if policy is None else policy.route_k
        if self.topk_method == "greedy":
            weights, ids = softmax_topk(logits, k, renormalize=False)
        else:
            weights, ids = grouped_topk(
                logits, k, self.n_group, self.topk_group, renormalize=False
            )
        if policy is not None:  # it reads the ranking best first
            weights, order = weights.sort(dim=-1, descending=True)
            weights, ids = policy.apply(weights, ids.gather(-1, order), count=not guess)
        return weights * self.routed_scaling_factor, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


def is_moe_layer(config, layer_idx: int) -> bool:
    """MoE after the first `first_k_dense_replace` layers, every `moe_layer_freq`-th layer
    (DeepSeek's rule; transformers has no moe_layer_freq, and all released configs use 1)."""
    if not cfg(config, "n_routed_experts", 0):
        return False
    freq = cfg(config, "moe_layer_freq", 1)
    return layer_idx >= cfg(config, "first_k_dense_replace", 0) and layer_idx % freq == 0


class DeepseekV2ForCausalLM(DecoderForCausalLM):
    weight_rules = _FUSED_RULES

    def __init__(self, config):
        # One rope table for all layers: V2-Lite's 163840 positions x 64 dims would cost
        # ~84 MB per layer if every attention built its own.
        rotary = RotaryEmbedding(
            config, config.qk_rope_head_dim, cfg(config, "max_position_embeddings", 4096),
            interleaved=True,
        )

        def layer(c, i: int) -> DecoderLayer:
            if is_moe_layer(c, i):
                mlp: nn.Module = DeepseekV2MoE(c)
            else:
                mlp = MLP(c.hidden_size, c.intermediate_size, bias=bool(cfg(c, "mlp_bias", False)))
            return DecoderLayer(c, MLAttention(c, i, rotary), mlp)

        super().__init__(config, layer)
        if not _fuse_q_with_kv_a(config):
            self.weight_rules = _UNFUSED_RULES
