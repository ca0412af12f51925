"""Expert offloading with int8/int4 quantization: the quantized expert store.

What is checked: greedy outputs equal the all-resident model of the same quantization, token
for token (batched and batch 1; a prompt long enough for the W8A8 prefill path), on three
MoE architectures; the budget counts quantized bytes and is never exceeded; the store is
built once and reused (not rewritten); a truncated, incomplete or mismatched store is
rebuilt with a warning; non-finite scales are a CheckpointError; option conflicts raise.
"""

from __future__ import annotations

import itertools
import json
import struct

import pytest

from sparsa import LLM, SamplingParams
from sparsa.config import OffloadConfig
from sparsa.layers.quantization import module_bytes
from sparsa.loader.safetensors_reader import CheckpointError
from sparsa.offload.quantized_store import STORE_ENV, store_root
from tests.offload.helpers import assert_rebuilt_after, bf16_copy, moe_checkpoint
from tests.offload.test_offload_engine import GREEDY, PROMPTS
from tests.tiny_models import build_tiny_checkpoint

# 80 tokens x top-2 is more rows than 16 per expert: int8 prefill takes the W8A8 path
LONG = PROMPTS + [[1] + [(7 * i) % 250 + 3 for i in range(79)]]


@pytest.fixture(autouse=True)
def _store_dir(tmp_path_factory, monkeypatch):
    """Every store of this module under one temporary root (never ~/.cache)."""
    root = tmp_path_factory.getbasetemp() / "expert-stores"
    monkeypatch.setenv(STORE_ENV, str(root))
    return root


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "deepseek_v2"])
def checkpoint(request, tmp_path_factory):
    name = request.param
    return moe_checkpoint(name, tmp_path_factory.mktemp(name))


def _greedy(llm: LLM, prompts=LONG) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


def _store_files(llm: LLM):
    store = llm.engine.model.offload.store
    return sorted(store.path.glob("*.safetensors")), store


@pytest.mark.parametrize("method", ["int8", "int4", "bf16"])
def test_offloaded_quantized_greedy_is_identical(checkpoint, method):
    ref_llm = LLM(str(checkpoint), quantization=method)
    ref = _greedy(ref_llm)
    # (alone, not from the batch: batched prefill takes other kernel paths, in both models)
    ref1 = _greedy(ref_llm, [LONG[-1]])
    for memory in ("25%", "50%"):
        llm = LLM(str(checkpoint), quantization=method, expert_memory=memory)
        assert _greedy(llm) == ref
        assert _greedy(llm, [LONG[-1]]) == ref1  # batch 1
        state = llm.engine.model.offload
        rep = state.report()
        assert rep["quantization"] == method and state.cache.reader.layout == "packed"
        assert rep["evictions"] > 0 and rep["disk_bytes_read"] > 0
        assert rep["peak_bytes"] <= rep["budget_bytes"]
        assert rep["resident_bytes"] <= rep["budget_bytes"]
        # the budget is a share of the quantized experts' bytes
        n = len(state.store.locations)
        assert rep["total_expert_bytes"] == n * state.store.expert_bytes
        assert rep["budget_bytes"] == int(rep["total_expert_bytes"] * int(memory[:-1]) / 100)
        # the same bytes per expert as the all-resident quantized block holds
        block = next(m for m in ref_llm.engine.model.modules()
                     if type(m).__name__ == "QuantizedExperts")
        assert state.store.expert_bytes * block.num_experts == module_bytes(block)


def test_bf16_checkpoint_with_bf16_reads_its_experts_directly(tmp_path):
    """-q bf16 on a bf16 checkpoint needs no store: the experts are bf16 on disk already
    (outputs as with the automatic bf16 form)."""
    path = bf16_copy(moe_checkpoint("mixtral", tmp_path / "m"), tmp_path / "bf16")
    llm = LLM(str(path), quantization="bf16", expert_memory="25%")
    state = llm.engine.model.offload
    assert state.store is None and state.cache.reader.layout == "native"
    auto = LLM(str(path), expert_memory="25%")
    assert _greedy(llm, PROMPTS) == _greedy(auto, PROMPTS)


def test_store_is_built_once_and_reused(checkpoint, _store_dir):
    llm = LLM(str(checkpoint), quantization="int4", quantization_group_size=32,
              expert_memory="30%")
    first = _greedy(llm, PROMPTS[:2])
    files, store = _store_files(llm)
    assert store.built and files and store.path.parent == _store_dir
    assert store.path.name.startswith(checkpoint.name + "-int4-g32-")
    stamps = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}
    again = LLM(str(checkpoint), quantization="int4", quantization_group_size=32,
                expert_memory="30%")
    files2, store2 = _store_files(again)
    assert not store2.built and store2.path == store.path
    assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files2} == stamps
    assert _greedy(again, PROMPTS[:2]) == first
    # each expert is one contiguous, 4 KiB-aligned span of its layer's file
    for loc in store2.locations.values():
        parts = sorted(loc.parts, key=lambda t: t.offset)
        assert parts[0].offset % 4096 == 0
        for a, b in itertools.pairwise(parts):
            assert a.offset + a.nbytes == b.offset
    # another group size is another store
    other = LLM(str(checkpoint), quantization="int4", expert_memory="30%")
    assert other.engine.model.offload.store.path != store.path


def test_damaged_store_is_rebuilt(tmp_path, caplog):
    _, path = build_tiny_checkpoint("mixtral", tmp_path / "m")
    ref = _greedy(LLM(str(path), quantization="int8"), PROMPTS)
    llm = LLM(str(path), quantization="int8", expert_memory="25%")
    files, store = _store_files(llm)
    damages = [
        lambda: files[0].write_bytes(files[0].read_bytes()[:-5000]),  # truncated
        lambda: (store.path / "store.json").unlink(),  # a build cut short
        lambda: files[1].write_bytes(b"\x00" * 8 + files[1].read_bytes()[8:]),  # bad header
    ]
    assert_rebuilt_after(damages, "sparsa.offload.quantized_store",
                         lambda: LLM(str(path), quantization="int8", expert_memory="25%"),
                         lambda llm: _greedy(llm, PROMPTS), ref, caplog)


def test_non_finite_store_scales_are_a_clear_error(tmp_path):
    _, path = build_tiny_checkpoint("mixtral", tmp_path / "m")
    llm = LLM(str(path), quantization="int8", expert_memory="100%")
    _, store = _store_files(llm)
    for loc in store.locations.values():  # every expert's first scale row -> NaN
        s = next(t for n, t in zip(loc.names, loc.parts) if n == "w13_s")
        with open(s.path, "r+b") as f:
            f.seek(s.offset)
            f.write(struct.pack("<f", float("nan")) * 4)
    again = LLM(str(path), quantization="int8", expert_memory="25%")
    with pytest.raises(CheckpointError, match="non-finite"):
        again.generate([[1, 5, 9]], SamplingParams(temperature=0, max_tokens=2))


def test_options_and_store_root(tmp_path, monkeypatch):
    _, path = build_tiny_checkpoint("mixtral", tmp_path / "m")
    with pytest.raises(ValueError, match="low_precision"):
        LLM(str(path), quantization="int8", expert_memory="25%",
            offload_on_miss="low_precision")
    assert store_root("/x/y") == store_root("/x/y").expanduser()
    assert str(store_root("/x/y")) == "/x/y"
    monkeypatch.delenv(STORE_ENV)
    assert store_root() == store_root(None)
    assert store_root().parts[-3:] == (".cache", "sparsa", "experts")
    assert OffloadConfig(expert_memory="25%", store_dir=str(tmp_path)).store_dir == \
        str(tmp_path)
    # a store that cannot be written says where and how to choose another place
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(OSError, match="quantized expert store"):
        LLM(str(path), quantization="int4", expert_memory="25%",
            offload_store_dir=str(blocker))
    # the manifest records the scheme and the checkpoint it came from
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "stores"))
    llm = LLM(str(path), quantization="int8", expert_memory="50%")
    m = json.loads((llm.engine.model.offload.store.path / "store.json").read_text())
    assert m["identity"]["method"] == "int8"
    assert m["identity"]["shards"][0][0].endswith("model.safetensors")


def test_cli_quantized_offload(tmp_path, capsys):
    from sparsa.cli import main

    _, path = build_tiny_checkpoint("mixtral", tmp_path / "m")
    ref = _greedy(LLM(str(path), quantization="int8"), PROMPTS[:1])
    stores = tmp_path / "stores"
    argv = ["generate", str(path), "--prompt-ids", ",".join(map(str, PROMPTS[0])),
            "--temperature", "0", "--max-tokens", "24", "--ignore-eos", "--json",
            "-q", "int8", "--expert-memory", "25%", "--offload-store-dir", str(stores)]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"][0]["outputs"][0]["token_ids"] == ref[0]
    assert len(list(stores.glob("m-int8-*/layer_*.safetensors"))) == 2
    # a conflicting pair of options is a one-line error, not a traceback
    assert main(argv[:-2] + ["--offload-on-miss", "int4"]) == 2
    assert "low_precision" in capsys.readouterr().err
