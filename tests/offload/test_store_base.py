"""Both stores of experts on disk give the reader the same small interface."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from sparsa.offload.compressed_store import CompressedStore
from sparsa.offload.quantized_store import QuantizedStore
from sparsa.offload.store_base import ExpertSource


@pytest.mark.parametrize("cls", [QuantizedStore, CompressedStore])
def test_stores_implement_expert_source(cls):
    for name in ("assemble", "report"):
        want = inspect.signature(getattr(ExpertSource, name)).parameters
        have = inspect.signature(getattr(cls, name)).parameters
        assert list(have) == list(want), (cls.__name__, name)
    assert "locations" in {f.name for f in dataclasses.fields(cls)}, cls.__name__
