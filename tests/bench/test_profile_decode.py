"""sparsa.bench.profile_decode: the per-op split of a decode step adds up and leaves no timers."""

from __future__ import annotations

import pytest

from sparsa import LLM, kernels
from sparsa.bench.profile_decode import profile
from tests.tiny_models import build_tiny_checkpoint

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels not built")


def test_profile_splits_a_step_into_native_ops(tmp_path):
    _, path = build_tiny_checkpoint("mixtral", tmp_path / "m")
    llm = LLM(str(path), dtype="float32", quantization="int8", kv_cache_memory="8MiB",
              num_threads=1)
    ext = kernels.load()
    before = ext.moe_int8
    r = profile(llm, tokens=8)
    assert ext.moe_int8 is before  # the module is restored
    ops = r["ops"]
    # every forward pass (a 1-token prompt runs as a decode too): one fused MoE and one
    # fused attention step per layer (2 layers)
    assert ops["moe_int8"][1] == pytest.approx(2.0)
    assert ops["decode_attention_step"][1] == pytest.approx(2.0)
    assert r["native_s"] == pytest.approx(sum(s for s, _ in ops.values()))
    assert r["step_s"] > 0
