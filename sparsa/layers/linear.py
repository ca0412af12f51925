"""Linear layers that know how checkpoint tensors map onto their (possibly fused) weights.

Fusing q/k/v and gate/up into one weight turns several small GEMMs into one larger one,
which matters at batch 1 where per-op overhead is a visible share of the step time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Linear(nn.Module):
    """y = x W^T (+ b). `output_sizes` lists the fused shards stacked along the output dim."""

    def __init__(self, in_features: int, output_sizes: list[int] | int, bias: bool = False):
        super().__init__()
        if isinstance(output_sizes, int):
            output_sizes = [output_sizes]
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        self.out_features = sum(self.output_sizes)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        )

    def shard_slice(self, shard: int) -> slice:
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])

    def load_shard(self, name: str, loaded: torch.Tensor, shard: int | None) -> None:
        param = self.weight if name == "weight" else self.bias
        if param is None:
            raise ValueError(f"checkpoint has a {name} for a layer built without one")
        target = param.data if shard is None else param.data[self.shard_slice(shard)]
        if tuple(target.shape) != tuple(loaded.shape):
            raise ValueError(
                f"shape mismatch for {name} (shard {shard}): checkpoint {tuple(loaded.shape)}, "
                f"model {tuple(target.shape)}"
            )
        target.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
