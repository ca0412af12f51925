"""What a store of experts on disk gives the reader: where each expert's bytes are, and how
to turn the bytes read into what the cache computes with. The checkpoint itself needs no
store object (the reader reads its tensors as they are); the quantized store
(quantized_store.py) and the lossless compressed one (compressed_store.py) implement this."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class ExpertSource(Protocol):
    """An opened store of experts, as `load_offloaded` hands it to the `ExpertReader`."""

    locations: dict  # (layer, expert) -> where its bytes are in the store's files

    def assemble(self, raw: tuple[torch.Tensor, ...]) -> Any:
        """The cache's copy of one expert from the tensors read (views of a read buffer)."""
        ...

    def report(self) -> dict:
        """What the store says about itself for `/metrics` and benchmark reports."""
        ...
