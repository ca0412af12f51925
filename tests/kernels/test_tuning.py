"""Kernel tuning: every tiling choice gives bit-identical results; the cache and the
override are read and validated."""

from __future__ import annotations

import json

import pytest
import torch

from sparsa import kernels
from sparsa.kernels import layout, ops, tuning
from sparsa.layers.quantization import quantize_int4_packed, quantize_int8_padded

needs_kernels = pytest.mark.skipif(
    not kernels.available(), reason=f"native kernels unavailable: {kernels.unavailable_reason()}")


def _all_forms(T: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One output per weight form and the fused MoE, for T activation rows."""
    N, K, E, H, inter = 70, 300, 4, 256, 128
    w = torch.randn(N, K, generator=g)
    q8, s8 = quantize_int8_padded(w)
    q4, sm = quantize_int4_packed(w, 64)
    wb = torch.nn.functional.pad(w, (0, layout.pad_to(K, 8) - K)).to(torch.bfloat16)
    x = torch.randn(T, K, generator=g)
    w13q, w13s = quantize_int8_padded(torch.randn(E * 2 * inter, H, generator=g))
    w2q, w2s = quantize_int8_padded(torch.randn(E * H, inter, generator=g))
    w13q4, w13sm = quantize_int4_packed(torch.randn(E * 2 * inter, H, generator=g), 64)
    w2q4, w2sm = quantize_int4_packed(torch.randn(E * H, inter, generator=g), 64)
    ids = torch.randint(0, E, (T, 2), generator=g)
    tw = torch.rand(T, 2, generator=g)
    xm = torch.randn(T, H, generator=g)
    wl = torch.randn(40, 1100, generator=g)  # rows longer than 512 bytes: the other slots
    q8l, s8l = quantize_int8_padded(wl)
    q4l, sml = quantize_int4_packed(wl, 64)
    xl = torch.randn(T, 1100, generator=g)
    return {
        "int8_long": ops.int8_gemm(xl, q8l, s8l),
        "int4_long": ops.int4_gemm(xl, q4l, sml, 64),
        "bf16_long": ops.bf16_gemm(xl, torch.nn.functional.pad(wl, (0, 4)).to(torch.bfloat16)),
        "int8": ops.int8_gemm(x, q8, s8),
        "int8_exact": ops.int8_gemm(x, q8, s8, exact=True),
        "int4": ops.int4_gemm(x, q4, sm, 64),
        "bf16": ops.bf16_gemm(x, wb),
        "moe_int8": ops.moe_int8(xm, w13q.view(E, 2 * inter, -1), w13s.view(E, -1),
                                 w2q.view(E, H, -1), w2s.view(E, -1), ids, tw),
        "moe_int4": ops.moe_int4(xm, w13q4.view(E, 2 * inter, -1), w13sm.view(E, 2 * inter, 2, -1),
                                 w2q4.view(E, H, -1), w2sm.view(E, H, 2, -1), 64, ids, tw),
    }


@needs_kernels
@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_every_tiling_choice_is_bit_identical(T):
    ext = kernels.load()
    before = tuning.current(ext)
    try:
        tuning.set_choices(ext, {k: tuning.DEFAULT for k in tuning.KINDS})
        ref = _all_forms(T, torch.Generator().manual_seed(T))
        for choice in tuning.CHOICES + ((2, 0), (4, 4)):
            tuning.set_choices(ext, {k: choice for k in tuning.KINDS})
            got = _all_forms(T, torch.Generator().manual_seed(T))
            for name in ref:
                assert torch.equal(got[name], ref[name]), (choice, name)
    finally:
        tuning.set_choices(ext, before)


@needs_kernels
def test_set_tuning_rejects_bad_values():
    ext = kernels.load()
    with pytest.raises(RuntimeError, match="row_block"):
        ext.set_tuning(0, 3, 0)
    with pytest.raises(RuntimeError, match="pf_rows"):
        ext.set_tuning(0, 1, 1000)
    with pytest.raises(RuntimeError, match="slot"):
        ext.set_tuning(8, 1, 0)


def test_parse_override():
    assert tuning.parse_override("int8=1:0, int4_short=4:16") == {"int8": (1, 0),
                                                                  "int4_short": (4, 16)}
    assert tuning.parse_override("") == {}
    for bad in ("int9=1:0", "int8=1", "int8=3:0", "int8=1:x", "int8=1:99"):
        with pytest.raises(ValueError, match="SPARSA_KERNEL_TUNING"):
            tuning.parse_override(bad)


def test_cpu_info_names_model_and_flags():
    info = tuning.cpu_info()
    assert info["model"]
    assert set(info["flags"]) <= set(tuning._FLAGS)


@needs_kernels
def test_tune_caches_per_machine_and_apply_reads_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSA_KERNEL_TUNING_FILE", str(tmp_path / "t.json"))
    monkeypatch.delenv("SPARSA_KERNEL_TUNING", raising=False)
    ext = kernels.load()
    before = tuning.current(ext)
    try:
        choice, rates = tuning.tune(ext, kinds=("int8", "int4"), shapes=((64, 256),),
                                    nbytes=1 << 16, rounds=1)
        assert set(rates["int8"]) == set(tuning.CHOICES)
        data = json.loads((tmp_path / "t.json").read_text())
        entry = data[tuning.machine_key()]
        assert entry["choice"]["int8"] == list(choice["int8"])
        # another thread count is another machine entry
        assert tuning.cached(threads=torch.get_num_threads() + 7) is None
        # apply: the cached choice, then the environment over it
        data[tuning.machine_key()]["choice"]["int4"] = [4, 16]
        (tmp_path / "t.json").write_text(json.dumps(data))
        assert tuning.apply(ext)["int4"] == (4, 16)
        assert tuple(ext.tuning(tuning.KINDS["int4"])) == (4, 16)
        monkeypatch.setenv("SPARSA_KERNEL_TUNING", "int4=2:8")
        assert tuning.apply(ext)["int4"] == (2, 8)
        (tmp_path / "t.json").write_text("not json")
        monkeypatch.delenv("SPARSA_KERNEL_TUNING")
        assert tuning.apply(ext)["int4"] == tuning.DEFAULTS["int4"]  # a broken cache is ignored
    finally:
        tuning.set_choices(ext, before)


@needs_kernels
def test_native_read_probe_reads_the_buffer():
    ext = kernels.load()
    buf = torch.ones(1 << 20, dtype=torch.uint8)
    for threads in (1, 2):
        assert 0 < ext.read_bandwidth(buf, threads) < 10
    with pytest.raises(RuntimeError, match="uint8"):
        ext.read_bandwidth(torch.ones(64), 1)
    with pytest.raises(RuntimeError, match="threads"):
        ext.read_bandwidth(buf, 0)
    from sparsa.bench.env import ReadProbe

    probe = ReadProbe(threads=1, nbytes=1 << 20, readings=2)
    assert probe.kind == "native read_bandwidth"
    assert probe.point("t")["median"] > 0
