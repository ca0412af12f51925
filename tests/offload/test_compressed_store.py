"""Expert offloading from the lossless compressed expert store (compression="zstd").

What is checked: the byte-plane codec round-trips bf16, fp16 and fp32 bit for bit (subnormals,
signed zeros, extremes, inf/NaN) and stores a plane raw where zstd does not pay; greedy tokens
and logprobs with compression equal those without, on Mixtral and DeepSeek-V2, fp32 and bf16
checkpoints, with the budget (decompressed bytes) never exceeded; the store is built once and
reused; a truncated or incomplete store is rebuilt with a warning; a flipped byte in a
compressed plane and non-finite weights are CheckpointErrors; option conflicts raise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparsa import LLM, SamplingParams
from sparsa.config import OffloadConfig
from sparsa.loader.safetensors_reader import CheckpointError
from sparsa.offload.compressed_store import (
    CompressedStore,
    decode_plane,
    encode_plane,
    merge_planes,
    split_planes,
)
from sparsa.offload.quantized_store import STORE_ENV
from tests.offload.helpers import assert_rebuilt_after, bf16_copy, moe_checkpoint
from tests.offload.test_offload_engine import PROMPTS

SAMPLING = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3)


@pytest.fixture(autouse=True)
def _store_dir(tmp_path_factory, monkeypatch):
    """Every store of this module under one temporary root (never ~/.cache)."""
    root = tmp_path_factory.getbasetemp() / "compressed-stores"
    monkeypatch.setenv(STORE_ENV, str(root))
    return root




@pytest.fixture(scope="module", params=["mixtral-fp32", "deepseek_v2-fp32", "mixtral-bf16",
                                        "deepseek_v2-bf16"])
def checkpoint(request, tmp_path_factory):
    arch, dtype = request.param.split("-")
    root = tmp_path_factory.mktemp(request.param)
    path = moe_checkpoint(arch, root / "fp32")
    return bf16_copy(path, root / "bf16") if dtype == "bf16" else path


def _run(llm: LLM, prompts=PROMPTS):
    outs = [o.outputs[0] for o in llm.generate(prompts, SAMPLING)]
    return [o.token_ids for o in outs], [o.logprobs for o in outs]


def _special(dtype: torch.dtype) -> torch.Tensor:
    fi = torch.finfo(dtype)
    vals = [0.0, -0.0, fi.tiny, -fi.tiny, fi.smallest_normal / 4, -fi.smallest_normal / 3,
            fi.max, -fi.max, fi.eps, 1.0, -1.0, float("inf"), float("-inf"), float("nan")]
    sub = torch.tensor([fi.tiny * 2.0 ** -k for k in range(1, 8)])  # subnormals
    torch.manual_seed(0)
    return torch.cat([torch.tensor(vals), sub, sub.neg(), 0.02 * torch.randn(5000)]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_codec_round_trip_is_bit_exact(dtype):
    t = _special(dtype)
    planes = split_planes(t)
    assert len(planes) == t.element_size()
    stored = [encode_plane(p) for p in planes]
    # the top plane (sign and exponent) compresses; the lowest (mantissa) stays raw
    assert isinstance(stored[-1], bytes) and len(stored[-1]) < 0.8 * planes[-1].nbytes
    assert isinstance(stored[0], np.ndarray)
    n = t.numel()
    scratch = np.empty(n * len(planes), dtype=np.uint8)
    back = [decode_plane(np.frombuffer(s, dtype=np.uint8) if isinstance(s, bytes) else s, n,
                         scratch[j * n:]) for j, s in enumerate(stored)]
    out = np.empty(n * t.element_size(), dtype=np.uint8)
    merge_planes(back, out)
    assert torch.equal(torch.from_numpy(out), t.view(torch.uint8).flatten())
    # a damaged frame is a CheckpointError, not garbage
    bad = bytearray(stored[-1])
    bad[len(bad) // 2] ^= 0x40
    with pytest.raises(CheckpointError, match="corrupt compressed plane"):
        decode_plane(np.frombuffer(bytes(bad), dtype=np.uint8), n, scratch)


def test_non_finite_weights_are_a_checkpoint_error(tmp_path):
    shapes = ((4, 8), (4, 8), (8, 4))
    w = [0.1 * torch.randn(s).bfloat16() for s in shapes]
    w[2][1, 1] = float("nan")
    store = CompressedStore(tmp_path, torch.bfloat16, shapes, torch.bfloat16)
    raw = tuple(torch.from_numpy(p) for t in w for p in split_planes(t))
    with pytest.raises(CheckpointError, match="non-finite"):
        store.assemble(raw)
    w[2][1, 1] = 0.5
    raw = tuple(torch.from_numpy(p) for t in w for p in split_planes(t))
    assert all(torch.equal(a, b) for a, b in zip(store.assemble(raw), w))


def test_compressed_offload_is_identical(checkpoint):
    for memory in ("25%", "60%"):
        plain = LLM(str(checkpoint), expert_memory=memory)
        llm = LLM(str(checkpoint), expert_memory=memory, offload_compression="zstd")
        assert _run(llm) == _run(plain)
        assert _run(llm, PROMPTS[:1]) == _run(plain, PROMPTS[:1])  # batch 1
        state = llm.engine.model.offload
        rep = state.report()
        assert state.cache.reader.layout == "packed" and rep["compression"] == "zstd"
        assert rep["evictions"] > 0 and rep["disk_bytes_read"] > 0
        assert rep["peak_bytes"] <= rep["budget_bytes"]
        assert rep["resident_bytes"] <= rep["budget_bytes"]
        # the budget counts decompressed bytes; the disk holds fewer
        assert rep["total_expert_bytes"] == state.store.raw_bytes
        assert 0.3 < rep["compression_ratio"] < 1.0
        assert rep["compressed_bytes"] < rep["expert_store_disk_bytes"]


def test_store_is_built_once_and_reused(tmp_path, _store_dir):
    path = moe_checkpoint("mixtral", tmp_path / "m")
    llm = LLM(str(path), expert_memory="30%", offload_compression="zstd")
    first = _run(llm, PROMPTS[:2])
    store = llm.engine.model.offload.store
    files = sorted(store.path.glob("*.safetensors"))
    assert store.built and files and store.path.parent == _store_dir
    assert store.path.name.startswith("m-zstd1-")
    stamps = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}
    again = LLM(str(path), expert_memory="30%", offload_compression="zstd")
    store2 = again.engine.model.offload.store
    assert not store2.built and store2.path == store.path
    assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files} == stamps
    assert _run(again, PROMPTS[:2]) == first
    for loc in store2.locations.values():  # one contiguous, 4 KiB-aligned span each
        assert loc.parts[0].offset % 4096 == 0
        for a, b in zip(loc.parts, loc.parts[1:]):
            assert a.offset + a.nbytes == b.offset


def _compressed_part(store):
    for loc in store.locations.values():
        for name, part in zip(loc.names, loc.parts):
            n = int(np.prod([int(s) for s in loc.parts[0].shape]))
            if name.endswith(".p3") and part.nbytes < n:
                return part
    raise AssertionError("no compressed plane")


def test_damaged_store_is_rebuilt_or_refused(tmp_path, caplog):
    path = moe_checkpoint("mixtral", tmp_path / "m")
    ref = _run(LLM(str(path), expert_memory="25%"), PROMPTS)
    llm = LLM(str(path), expert_memory="25%", offload_compression="zstd")
    store = llm.engine.model.offload.store
    files = sorted(store.path.glob("*.safetensors"))
    damages = (lambda: files[0].write_bytes(files[0].read_bytes()[:-5000]),  # truncated
               lambda: (store.path / "store.json").unlink())  # a build cut short
    again = assert_rebuilt_after(
        damages, "sparsa.offload.compressed_store",
        lambda: LLM(str(path), expert_memory="25%", offload_compression="zstd"), _run, ref,
        caplog)
    # a flipped byte inside a compressed plane: the frame's checksum fails at load
    part = _compressed_part(again.engine.model.offload.store)
    with open(part.path, "r+b") as f:
        f.seek(part.offset + part.nbytes // 2)
        b = f.read(1)
        f.seek(part.offset + part.nbytes // 2)
        f.write(bytes([b[0] ^ 0x21]))
    bad = LLM(str(path), expert_memory="100%", offload_compression="zstd")
    assert not bad.engine.model.offload.store.built  # (sizes intact: not noticed at open)
    with pytest.raises(CheckpointError, match=r"layer \d+ expert \d+: corrupt compressed"):
        bad.generate(PROMPTS, SAMPLING)


def test_non_finite_checkpoint_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    path = moe_checkpoint("mixtral", tmp_path / "m")
    f = next(path.glob("*.safetensors"))
    d = load_file(f)
    name = next(k for k in d if "experts.3.w2" in k or "experts.3.down" in k)
    d[name][0, 0] = float("inf")
    save_file(d, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="non-finite"):
        LLM(str(path), expert_memory="25%", offload_compression="zstd")


def test_options(tmp_path):
    path = moe_checkpoint("mixtral", tmp_path / "m")
    with pytest.raises(ValueError, match="compression"):
        OffloadConfig(expert_memory="25%", compression="lz4")
    with pytest.raises(ValueError, match="int8 experts have their own"):
        LLM(str(path), quantization="int8", expert_memory="25%", offload_compression="zstd")
    # a host tier holds the compressed bytes and decompresses on the way to the cache
    plain = _run(LLM(str(path), expert_memory="25%"), PROMPTS[:2])
    tiered = LLM(str(path), expert_memory="25%", offload_compression="zstd",
                 offload_host_memory="50%")
    assert _run(tiered, PROMPTS[:2]) == plain
    # ... and, with on_miss='host', decompresses a miss it holds to compute it on the CPU
    fiddler = LLM(str(path), expert_memory="25%", offload_compression="zstd",
                  offload_on_miss="host", offload_host_memory="100%")
    assert _run(fiddler, PROMPTS[:2]) == plain
    assert fiddler.engine.model.offload.report()["host_computes"] > 0
    # the low-precision miss tier reads the experts through the compressed store too
    llm = LLM(str(path), expert_memory="25%", offload_compression="zstd",
              offload_on_miss="low_precision")
    _run(llm, PROMPTS[:1])
    rep = llm.engine.model.offload.report()
    assert rep["compression"] == "zstd" and rep["low_precision_experts"] > 0


def test_cli_compressed_offload(tmp_path, capsys):
    from sparsa.cli import main

    path = moe_checkpoint("mixtral", tmp_path / "m")
    ref = _run(LLM(str(path)), PROMPTS[:1])[0]
    stores = tmp_path / "stores"
    argv = ["generate", str(path), "--prompt-ids", ",".join(map(str, PROMPTS[0])),
            "--temperature", "0", "--max-tokens", "16", "--ignore-eos", "--json",
            "--expert-memory", "25%", "--offload-store-dir", str(stores),
            "--offload-compression", "zstd"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"][0]["outputs"][0]["token_ids"] == ref[0]
    assert len(list(stores.glob("m-zstd1-*/layer_*.safetensors"))) == 2
