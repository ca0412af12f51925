"""Rotary position embeddings for every RoPE variant the supported models use.

The inverse frequencies come from transformers' own RoPE initialisers, so scaling variants
(linear, llama3, yarn, longrope, ...) match the reference implementation exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsa import kernels
from sparsa.kernels import ops


def rope_parameters(hf_config) -> dict:
    """RoPE settings from a config: transformers 5 keeps them in `rope_parameters`,
    hub configs at the top level (`rope_theta`, `rope_scaling`)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    for k, v in scaling.items():
        params.setdefault(k, v)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return params


def compute_inv_freq(hf_config, rotary_dim: int) -> tuple[torch.Tensor, float]:
    params = rope_parameters(hf_config)
    rope_type = params["rope_type"]
    if rope_type in ("default", "dynamic"):
        # "dynamic" only differs from default beyond the original context length.
        base = float(params["rope_theta"])
        inv = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"unsupported rope_type {rope_type!r}; supported: default, "
            + ", ".join(ROPE_INIT_FUNCTIONS)
        )
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv.float(), float(scaling)


def _native_ok() -> bool:
    return kernels.available()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by absolute position (no per-step trig)."""

    def __init__(self, hf_config, rotary_dim: int, max_position: int, interleaved: bool = False):
        super().__init__()
        inv_freq, scaling = compute_inv_freq(hf_config, rotary_dim)
        self.rotary_dim = rotary_dim
        self.interleaved = interleaved
        t = torch.arange(max_position, dtype=torch.float)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)
        self._last: tuple | None = None
        self._last_2d: tuple | None = None

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hk, D]; rotates the first `rotary_dim` dims of each head."""
        cos, sin = self.tables(positions, q.dtype)
        return self._apply(q, cos, sin), self._apply(k, cos, sin)

    def _native(self, x: torch.Tensor, cos: torch.Tensor) -> bool:
        return (not self.interleaved and x.dtype == torch.float32 and x.device.type == "cpu"
                and x.dim() == 3 and x.stride(-1) == 1 and cos.dtype == torch.float32
                and not (x.requires_grad and torch.is_grad_enabled()) and _native_ok())

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        # Layers share this module and the step's positions: gather cos/sin once per step.
        cached = self._last
        if cached is not None and cached[0] is positions and cached[1] == dtype:
            return cached[2], cached[3]
        cos = self.cos[positions].unsqueeze(1).to(dtype)
        sin = self.sin[positions].unsqueeze(1).to(dtype)
        self._last = (positions, dtype, cos, sin)
        return cos, sin

    def tables_2d(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos/sin [T, rotary_dim] of the step's positions (the native decode step's
        form), gathered once per step like `tables`."""
        cached = self._last_2d
        if cached is not None and cached[0] is positions:
            return cached[1], cached[2]
        cos, sin = self.tables(positions, torch.float32)
        cos, sin = cos.squeeze(1), sin.squeeze(1)
        self._last_2d = (positions, cos, sin)
        return cos, sin

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rd = self.rotary_dim
        if self._native(x, cos):
            # one native call instead of ~6 small ops; rotates x in place (a fresh q/k view)
            ops.rope_neox_(x, cos.squeeze(1), sin.squeeze(1), rd)
            return x
        if rd == x.shape[-1]:
            rot, rest = x, None
        else:
            rot, rest = x[..., :rd], x[..., rd:]
        if self.interleaved:
            # DeepSeek checkpoints store rope dims as interleaved pairs: de-interleave first.
            rot = torch.cat((rot[..., 0::2], rot[..., 1::2]), dim=-1)
        out = rot * cos + rotate_half(rot) * sin
        return out if rest is None else torch.cat((out, rest), dim=-1)


_SHARED: dict[tuple, RotaryEmbedding] = {}


def get_rope(hf_config, rotary_dim: int, max_position: int,
             interleaved: bool = False) -> RotaryEmbedding:
    """One table per distinct RoPE setting, shared by every layer: a long-context config
    (160k positions) would otherwise hold ~80 MB of identical cos/sin per layer."""
    key = (
        repr(sorted(rope_parameters(hf_config).items())),
        getattr(hf_config, "head_dim", None), hf_config.hidden_size,
        hf_config.num_attention_heads, getattr(hf_config, "max_position_embeddings", None),
        rotary_dim, max_position, interleaved, str(torch.get_default_device()),
        torch.get_default_dtype(),
    )
    rope = _SHARED.get(key)
    if rope is None:
        rope = _SHARED[key] = RotaryEmbedding(hf_config, rotary_dim, max_position, interleaved)
    return rope
