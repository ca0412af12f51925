"""Linear layers that know how checkpoint tensors map onto their (possibly fused) weights.

Weights are stored transposed, [in, out], and applied as `x @ W`: on CPU the batch-1 GEMV
over that layout streams memory faster than `F.linear` over [out, in] (the log in
docs/bench-log.md has the measurement), and GEMMs are as fast. Fusing q/k/v and gate/up
into one weight turns several small GEMMs into one larger one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Linear(nn.Module):
    """y = x W^T (+ b). `output_sizes` lists fused shards stacked along the output dim.

    With `transposed=False` the weight keeps the checkpoint's [out, in] layout (needed when
    it is tied to an embedding table).
    """

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int] | int,
        bias: bool = False,
        transposed: bool = True,
    ):
        super().__init__()
        if isinstance(output_sizes, int):
            output_sizes = [output_sizes]
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        self.out_features = sum(self.output_sizes)
        self.transposed = transposed
        shape = (in_features, self.out_features) if transposed else (self.out_features,
                                                                      in_features)
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        )

    def shard_slice(self, shard: int) -> slice:
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])

    def load_shard(self, name: str, loaded: torch.Tensor, shard: int | None) -> None:
        """Copy a checkpoint tensor ([out, in] weight or [out] bias) into place."""
        param = self.weight if name == "weight" else self.bias if name == "bias" else None
        if param is None:
            raise ValueError(f"checkpoint has a {name} for a linear layer built without one")
        rows = slice(None) if shard is None else self.shard_slice(shard)
        if name == "weight" and self.transposed:
            target = param.data[:, rows]
            loaded = loaded.t()
        else:
            target = param.data[rows]
        if tuple(target.shape) != tuple(loaded.shape):
            got = tuple(loaded.t().shape) if name == "weight" and self.transposed else tuple(
                loaded.shape)
            want = (target.shape[1], target.shape[0]) if name == "weight" and self.transposed \
                else tuple(target.shape)
            raise ValueError(
                f"shape mismatch for {name} (shard {shard}): checkpoint {got}, model {want}"
            )
        target.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        y = x @ self.weight
        return y if self.bias is None else y + self.bias
