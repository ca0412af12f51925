"""The interface every expert-cache eviction policy implements (policies.py explains the
protocol) and what the policies share."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Stream:
    """What a policy may know about the replay before it starts.

    ``requests[t, g]`` are the slots group g requests at step t (-1 = none). Only
    :class:`Belady` may read ``requests``; the others use ``step_token``/``prompt_start`` (a
    new request starting is known to a real server) and ``slot_layer``/``slot_expert``.
    """

    requests: np.ndarray  # (T, G, k) int
    step_token: np.ndarray  # (T,) token index of each step
    prompt_start: np.ndarray  # (T,) bool: the step is the first of a new prompt
    slot_layer: np.ndarray  # (S,) layer index of each slot
    slot_expert: np.ndarray  # (S,) expert id of each slot
    num_layers: int
    num_experts: int
    capacity: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.requests.shape[1]), int(self.slot_layer.shape[0])


class CachePolicy:
    """Base class: subclasses override :meth:`priority` and usually :meth:`observe`."""

    name = "base"

    def begin(self, stream: Stream) -> None:
        self.G, self.S = stream.shape
        self.stream = stream

    def priority(self, t: int) -> np.ndarray:
        """(G, S) float: eviction candidates with the lowest value go first (at step t)."""
        raise NotImplementedError

    def observe(self, t: int, req: np.ndarray, hit: np.ndarray,
                mask: np.ndarray | None = None) -> None:
        """Step t's demand requests (G, k) slots (-1 = none), whether each was resident, and
        optionally the same requests as a (G, S) mask (saves rebuilding it)."""

    def inserted(self, t: int, mask: np.ndarray, prefetched: bool) -> None:
        """(G, S) bool: slots loaded at step t (by prefetch or on a miss)."""

    def evicted(self, t: int, mask: np.ndarray) -> None:
        """(G, S) bool: slots evicted at step t."""


def scatter_mask(shape: tuple[int, int], req: np.ndarray) -> np.ndarray:
    """(G, k) slot ids (-1 = none) -> (G, S) bool mask."""
    out = np.zeros((shape[0], shape[1] + 1), dtype=bool)
    np.put_along_axis(out, np.where(req < 0, shape[1], req), True, axis=1)
    return out[:, : shape[1]]
