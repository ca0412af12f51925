"""Sliding-window models give back the KV blocks every layer's window has left: outputs equal
keeping them, and the pool a long generation holds stays flat."""

from __future__ import annotations

import pytest

from sparsa import LLM, SamplingParams
from sparsa.core.block_manager import RELEASED, BlockManager
from sparsa.core.sequence import Sequence
from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint


def test_block_manager_releases_blocks_behind_the_window():
    bm = BlockManager(16, 4, sliding_window=6)
    seq = Sequence("r", list(range(20)))
    bm.allocate(seq, 20)
    seq.num_computed_tokens = 20
    bm.release_out_of_window(seq)
    # the next query (position 20) sees 15..20: blocks 0-2 (positions 0-11) are behind it
    assert seq.block_table[:3] == [RELEASED] * 3 and RELEASED not in seq.block_table[3:]
    assert bm.num_free_blocks == 16 - 2
    bm.release_out_of_window(seq)  # idempotent
    assert bm.num_free_blocks == 14
    bm.free(seq)
    assert bm.num_free_blocks == 16


@pytest.mark.parametrize("native", [True, False])
def test_long_generation_keeps_a_flat_pool_and_equal_tokens(native, tmp_path):
    cfg = dict(TINY_CONFIGS["mistral-sliding"])  # every layer's window: 8 tokens
    _, path = build_tiny_checkpoint("mistral-sliding", tmp_path / "m", config=cfg)
    prompts = [[1, 17, 33, 4, 90, 5], [1] + list(range(40, 70))]
    p = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)  # 15x the window

    def run(free, **kw):
        llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4,
                  free_out_of_window=free, native_decode=native, **kw)
        engine = llm.engine
        ids = [engine.add_request(q, p) for q in prompts]
        outs, peak = {}, 0
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    outs[o.request_id] = o.outputs[0].token_ids
            peak = max(peak, engine.block_manager.num_used_blocks)
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        return [outs[i] for i in ids], peak

    want, peak_kept = run(False)
    got, peak = run(True)
    assert got == want
    # two sequences of up to 151 tokens: 76 blocks kept (more than the pool: it preempts)
    # against a window of 8 plus a block or two each
    assert peak <= 2 * 5 and peak < peak_kept
    chunked, _ = run(True, max_num_batched_tokens=8, enable_chunked_prefill=True,
                     enable_prefix_caching=True)
    assert chunked == want
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
            "adaptive": False, "disable_by_batch_size": None}
    assert run(True, speculative_config=spec)[0] == want
