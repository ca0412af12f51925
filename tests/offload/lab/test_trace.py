"""Trace CSV round trip, the recorder, and the fast and fallback parsers."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from sparsa.offload.lab.trace import TraceRecorder, load_trace, make_trace, save_trace
from sparsa.tokenizer import shared_dir
from tests.offload.helpers import synthetic


@pytest.mark.parametrize("name", ["t.csv", "t.csv.gz"])
def test_round_trip(tmp_path, name):
    tr = synthetic()
    tr.tokens[3] = ","  # a quoted field
    tr.tokens[4] = 'say "hi"'
    save_trace(tr, tmp_path / name)
    back = load_trace(tmp_path / name, num_experts=tr.num_experts)
    np.testing.assert_array_equal(back.experts, tr.experts)
    np.testing.assert_array_equal(back.prompts, tr.prompts)
    np.testing.assert_array_equal(back.pos, tr.pos)
    assert list(back.tokens) == list(tr.tokens)
    assert back.layers == tr.layers


def test_rows_in_any_order_sort_to_replay_order(tmp_path):
    text = ("prompt,layer,pos,token,experts\n"
            "7,2,1,b,3 1\n7,1,0,a,0 1\n5,1,0,x,2 3\n7,1,1,b,1 2\n7,2,0,a,0 2\n5,2,0,x,1 0\n")
    (tmp_path / "t.csv").write_text(text)
    tr = load_trace(tmp_path / "t.csv")
    assert list(tr.prompts) == ["5", "7", "7"] and list(tr.pos) == [0, 0, 1]
    assert tr.experts[2].tolist() == [[1, 2], [3, 1]]
    assert tr.num_experts == 4 and tr.top_k == 2


def test_ragged_rows_pad_and_bad_header(tmp_path):
    p = tmp_path / "r.csv.gz"
    with gzip.open(p, "wt") as f:
        f.write("prompt,layer,pos,token,experts\r\nr1,1,0,a,1 2\r\nr1,1,1,b,3\r\n")
    tr = load_trace(p)
    assert tr.experts[:, 0].tolist() == [[1, 2], [3, -1]]
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header"):
        load_trace(tmp_path / "bad.csv")


def test_recorder_writes_the_same_format(tmp_path):
    rec = TraceRecorder(token_text=lambda i: f"tok{i}")
    rec.record("req-1", 0, 11, 1, [4, 2])
    rec.record_batch("req-1", [1, 2], [12, 13], 1, np.array([[0, 1], [2, 3]]))
    for pos in range(3):
        rec.record("req-1", pos, 11 + pos, 2, [pos, pos + 1])
    rec.save(tmp_path / "rec.csv.gz")
    tr = load_trace(tmp_path / "rec.csv.gz")
    assert len(rec) == 6 and tr.num_tokens == 3 and tr.layers == [1, 2]
    assert list(tr.tokens) == ["tok11", "tok12", "tok13"]
    assert tr.experts[0].tolist() == [[4, 2], [0, 1]]


def test_make_trace_positions_and_multi_hot():
    tr = make_trace(np.array([[[0, 1]], [[1, 2]], [[2, 3]]]), prompts=["a", "a", "b"])
    assert tr.pos.tolist() == [0, 1, 0]
    assert tr.prompt_starts().tolist() == [0, 2]
    assert tr.multi_hot()[1, 0].tolist() == [False, True, True, False]


HELDOUT = shared_dir() / "traces" / "deepseek-v2-lite" / "heldout.csv.gz"


@pytest.mark.slow
@pytest.mark.skipif(not HELDOUT.is_file(), reason=f"{HELDOUT} not found (set SPARSA_SHARED)")
def test_shared_heldout_trace_loads():
    tr = load_trace(HELDOUT)
    assert tr.experts.shape == (30202, 26, 6) and tr.num_experts == 64
    assert (tr.experts >= 0).all() and tr.layers == list(range(1, 27))
    assert len(np.unique(tr.prompts)) == 250
    # six distinct experts per (token, layer)
    first = np.sort(tr.experts[:50], axis=2)
    assert (first[:, :, 1:] != first[:, :, :-1]).all()
