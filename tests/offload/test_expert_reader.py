"""ExpertReader: coalesced O_DIRECT reads into reused slabs give the bytes on disk, in either
layout; truncation and corruption stay clear errors; slabs are reused only when free."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sparsa.loader.safetensors_reader import CheckpointError, TensorLocation
from sparsa.offload.expert_reader import ExpertLocation, ExpertReader, plan_reads

H, INTER = 96, 160  # [I, H] fp32 = 61,440 B: not a multiple of the 4 KiB page


def _write(path: Path, parts: list[tuple[int, torch.Tensor]], size: int | None = None
           ) -> list[TensorLocation]:
    """Tensors at chosen byte offsets of one file (the rest random bytes)."""
    end = max(off + t.numel() * t.element_size() for off, t in parts)
    raw = bytearray(os.urandom(size or end + 777))
    locs = []
    for off, t in parts:
        b = t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        raw[off : off + len(b)] = b
        locs.append(TensorLocation(path, off, len(b), t.dtype, tuple(t.shape)))
    path.write_bytes(bytes(raw))
    return locs


def _expert(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(dtype) for s in ((INTER, H), (INTER, H), (H, INTER))]


def _adjacent(tmp_path: Path, n: int = 3, start: int = 1000, dtype=torch.float32):
    """n experts stored gate, down, up (Mixtral's w1, w2, w3 order), back to back from an
    unaligned offset: each expert is one contiguous span."""
    parts, keys, off = [], [], start
    for e in range(n):
        gate, up, down = _expert(e, dtype)
        for t in (gate, down, up):
            parts.append((off, t))
            off += t.numel() * t.element_size()
        keys.append((0, e))
    locs = _write(tmp_path / "a.bin", parts)
    experts = {k: ExpertLocation(locs[3 * i], locs[3 * i + 2], locs[3 * i + 1])
               for i, k in enumerate(keys)}
    return experts, {k: _expert(k[1], dtype) for k in keys}


@pytest.fixture(params=["4MiB", "16KiB"])
def chunk(request, monkeypatch):
    """The default chunk (one read per span here) and small ones (many reads per span)."""
    from sparsa.offload import expert_reader

    if request.param == "16KiB":
        monkeypatch.setattr(expert_reader, "_CHUNK", 16 << 10)
    return request.param


@pytest.mark.parametrize("direct", [True, False])
def test_coalesced_reads_are_byte_identical(tmp_path, direct, chunk):
    experts, want = _adjacent(tmp_path)
    plan = plan_reads(experts[(0, 1)])
    assert len(plan.segments) == 1  # gate, down, up adjacent: one span, one read
    seg = plan.segments[0]
    assert seg.start % 4096 == 0 and seg.length % 4096 == 0
    reader = ExpertReader(experts, torch.float32, direct_io=direct)
    reader.set_pool_slabs(2)
    try:
        for key, (gate, up, down) in want.items():
            got = reader.load(*key)
            assert len(got) == 3
            for a, b in zip(got, (gate, up, down)):
                assert a.shape == b.shape and torch.equal(a, b)
        assert reader.bytes_read >= sum(t.numel() * 4 for w in want.values() for t in w)
    finally:
        reader.close()


def test_resident_layout_is_the_transpose(tmp_path):
    experts, want = _adjacent(tmp_path)
    reader = ExpertReader(experts, torch.float32, layout="resident")
    reader.set_pool_slabs(4)
    try:
        for key, (gate, up, down) in want.items():
            w13, w2 = reader.load(*key)
            assert torch.equal(w13, torch.cat((gate.t(), up.t()), dim=1))
            assert torch.equal(w2, down.t())
    finally:
        reader.close()
    with pytest.raises(ValueError, match="layout"):
        ExpertReader(experts, torch.float32, layout="columns")


def test_scattered_tensors_and_two_files(tmp_path):
    """Tensors far apart, out of order, in two files: one span each, still exact."""
    gate, up, down = _expert(7)
    a = _write(tmp_path / "a.bin", [(5 << 20, gate), (12, down)])
    b = _write(tmp_path / "b.bin", [(4096 * 3 + 8, up)])
    loc = ExpertLocation(a[0], b[0], a[1])
    plan = plan_reads(loc)
    assert len(plan.segments) == 3
    # a gap smaller than the merge threshold is read through: one span
    assert len(plan_reads(loc, merge_gap=6 << 20).segments) == 2
    for direct in (True, False):
        reader = ExpertReader({(2, 5): loc}, torch.float32, direct_io=direct)
        got = reader.load(2, 5)
        assert all(torch.equal(x, y) for x, y in zip(got, (gate, up, down)))
        reader.close()


def test_bf16_on_disk_and_misaligned_offsets(tmp_path):
    gate, up, down = _expert(3, torch.bfloat16)
    # odd offsets: no dtype view is possible, the reader copies
    locs = _write(tmp_path / "c.bin", [(3, gate), (3 + gate.numel() * 2, down),
                                       (3 + 4 * INTER * H, up)])
    loc = ExpertLocation(locs[0], locs[2], locs[1])
    for dtype in (torch.bfloat16, torch.float32):
        reader = ExpertReader({(0, 0): loc}, dtype)
        got = reader.load(0, 0)
        assert all(x.dtype == dtype and torch.equal(x, y.to(dtype))
                   for x, y in zip(got, (gate, up, down)))
        reader.close()


def test_truncated_after_open_is_a_checkpoint_error(tmp_path, chunk):
    experts, _ = _adjacent(tmp_path)
    path = tmp_path / "a.bin"
    for direct in (True, False):
        reader = ExpertReader(experts, torch.float32, direct_io=direct)
        reader.load(0, 0)  # opens the file
        size = path.stat().st_size
        try:
            os.truncate(path, experts[(0, 2)].down.offset + 100)
            with pytest.raises(CheckpointError, match="truncated"):
                reader.load(0, 2)
            reader.load(0, 0)  # what is still there still reads
        finally:
            reader.close()
        with open(path, "r+b") as f:  # restore the length (content past it is zeros now)
            f.truncate(size)


def test_non_finite_weights_are_a_checkpoint_error(tmp_path):
    experts, _ = _adjacent(tmp_path)
    with open(tmp_path / "a.bin", "r+b") as f:
        f.seek(experts[(0, 1)].up.offset + 400)
        f.write(b"\xff" * 4)  # one NaN
    reader = ExpertReader(experts, torch.float32)
    with pytest.raises(CheckpointError, match="non-finite"):
        reader.load(0, 1)
    reader.load(0, 0)
    reader.close()


@pytest.mark.parametrize("bad", [b"\x80\x7f", b"\xc0\x7f"], ids=["inf", "nan"])
def test_non_finite_bf16_weights_are_a_checkpoint_error(tmp_path, bad):
    """bf16 experts are summed natively (no fp32 copy): inf and NaN are still caught, and
    huge finite weights whose sum overflows still load (isfinite confirms them)."""
    experts, want = _adjacent(tmp_path, dtype=torch.bfloat16)
    with open(tmp_path / "a.bin", "r+b") as f:
        f.seek(experts[(0, 1)].gate.offset + 400)
        f.write(bad)  # one bf16 element: 0x7f80 = +inf, 0x7fc0 = NaN (little endian)
        f.seek(experts[(0, 2)].down.offset)
        f.write(b"\x7f\x7f" * 64)  # 64 x 3.4e38: finite, but their sum is inf in bf16
    reader = ExpertReader(experts, torch.bfloat16)
    with pytest.raises(CheckpointError, match="non-finite"):
        reader.load(0, 1)
    got = reader.load(0, 2)
    assert torch.isfinite(got[2]).all() and got[2].float().max() > 3e38
    assert torch.equal(reader.load(0, 0)[0], want[(0, 0)][0])
    reader.close()


def test_slabs_are_reused_only_when_nothing_views_them(tmp_path):
    experts, want = _adjacent(tmp_path)
    reader = ExpertReader(experts, torch.float32)
    reader.set_pool_slabs(2)
    try:
        w = reader.load(0, 0)
        del w
        for _ in range(3):
            reader.load(0, 1)  # each result dropped at once: the same slab every time
        assert reader.pool.allocated == 1
        # a derived view outlives the tensors it came from: its slab is not handed out
        held = reader.load(0, 0)[2].t()
        others = [reader.load(0, e) for e in (1, 2)]
        assert reader.pool.allocated == 3  # two pooled, one of its own beyond the pool
        assert torch.equal(held, want[(0, 0)][2].t())
        assert all(torch.equal(a, b) for o, e in zip(others, (1, 2))
                   for a, b in zip(o, want[(0, e)]))
        del others
        reader.load(0, 2)
        assert reader.pool.allocated == 3 and torch.equal(held, want[(0, 0)][2].t())
        assert reader.pool.pooled_bytes == 2 * reader.slab_bytes
    finally:
        reader.close()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no tmpfs at /dev/shm")
# (tmpfs refuses O_DIRECT at open before Linux 6.6)
def test_reads_from_tmpfs(tmp_path):
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        experts, want = _adjacent(Path(d))
        reader = ExpertReader(experts, torch.float32, direct_io=True)
        got = reader.load(0, 2)
        assert all(torch.equal(a, b) for a, b in zip(got, want[(0, 2)]))
        reader.close()


def test_failed_direct_read_falls_back_to_buffered(tmp_path, monkeypatch, chunk):
    """A filesystem that opens with O_DIRECT but fails the read: the reader retries without
    it (dropping the pages after each read), once and for good."""
    import errno

    from sparsa.offload import expert_reader

    experts, want = _adjacent(tmp_path)
    reader = ExpertReader(experts, torch.float32, direct_io=True)
    real = os.preadv
    direct_fds = set()

    def preadv(fd, bufs, off):
        if fd in direct_fds:
            direct_fds.discard(fd)  # the buffered reopen may get the same number
            raise OSError(errno.EINVAL, "direct read refused")
        return real(fd, bufs, off)

    fd, direct = reader._fd(str(tmp_path / "a.bin"))
    if not direct:
        pytest.skip("O_DIRECT refused at open here")
    direct_fds.add(fd)
    monkeypatch.setattr(expert_reader.os, "preadv", preadv)
    fadvised = []
    monkeypatch.setattr(expert_reader.os, "posix_fadvise",
                        lambda *a: fadvised.append(a[1:]), raising=False)
    got = reader.load(0, 1)
    assert all(torch.equal(a, b) for a, b in zip(got, want[(0, 1)]))
    assert reader.direct_io is False and fadvised
    reader.close()


def test_reserved_slabs_are_what_leases_get():
    """reserve maps slabs up front (within the pool's limit); leases then map nothing new
    until every reserved slab is in use."""
    from sparsa.offload.expert_reader import SlabPool

    n = 3 * 4096
    pool = SlabPool(max_bytes=3 * n)
    assert pool.reserve(5, n, threads=2) == 3 and pool.allocated == 3
    assert pool.reserve(1, n) == 0  # the pool is full
    held = [pool.lease(n) for _ in range(3)]
    assert pool.allocated == 3
    held.append(pool.lease(n))  # all in use: a buffer of its own
    assert pool.allocated == 4 and pool.pooled_bytes == 3 * n
    del held
    pool.lease(n)
    assert pool.allocated == 4
