"""Build a model whose parameters are meta tensors (no memory) while its buffers are real."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Fallback for models whose constructor computes real values (e.g. YaRN RoPE tables) and
    so cannot run entirely under ``torch.device('meta')``: build on the CPU but swap every
    parameter for a meta tensor as it is registered. The CPU ``torch.empty`` behind each one is
    never written, so its pages are never touched, and it is freed at once."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(torch.empty_like(param, device="meta"),
                                 requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
