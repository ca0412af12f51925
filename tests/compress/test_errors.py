"""Bad input to expert pruning / merging: one clear error naming the setting."""

from __future__ import annotations

import pytest

from sparsa import LLM
from sparsa.config.compress import CompressConfig
from sparsa.config.settings import engine_config
from tests.compress.tiny import calibration_text, tiny_moe


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return tiny_moe(d / "src"), calibration_text(d / "calib.txt")


@pytest.mark.parametrize("setting,extra,match", [
    ("expert_pruning", {"fraction": 1.0}, "removes every expert of a layer"),
    ("expert_pruning", {"count": 4}, "removes every expert of a layer"),
    ("expert_merging", {"count": 3}, "fewer than the 2 each token is routed to"),
    ("expert_pruning", {"fraction": 0.1}, "removes no expert"),
    ("expert_pruning", {"fraction": 0.5, "calibration_tokens": 100000},
     "calibration_tokens asks for 100000"),
])
def test_bad_amounts_and_short_calibration(model, setting, extra, match):
    src, calib = model
    with pytest.raises(ValueError, match=match) as e:
        LLM(str(src), **{setting: {"calibration": str(calib), **extra}}, num_kv_blocks=16)
    assert setting in str(e.value)


@pytest.mark.parametrize("method,d,match", [
    ("prune", {"fraction": 0.5, "similarity": "router"}, r"unknown key\(s\) \['similarity'\]"),
    ("merge", {"fraction": 0.5, "ratio": 2}, r"unknown key\(s\) \['ratio'\]"),
    ("prune", {"fraction": 0.5}, "needs calibration"),
    ("prune", {"calibration": "CALIB"}, "exactly one of fraction"),
    ("prune", {"fraction": 0.5, "count": 1, "calibration": "CALIB"}, "exactly one of"),
    ("prune", {"fraction": 1.5, "calibration": "CALIB"}, r"fraction must be a number in"),
    ("prune", {"fraction": 0.5, "calibration": "/no/such.txt"}, "calibration file not found"),
    ("merge", {"fraction": 0.5, "calibration": "CALIB", "router": "max"}, "router must be"),
    ("prune", {"fraction": 0.5, "calibration": "CALIB", "calibration_tokens": 4}, ">= 16"),
])
def test_bad_settings(model, method, d, match):
    _, calib = model
    d = {k: (str(calib) if v == "CALIB" else v) for k, v in d.items()}
    with pytest.raises(ValueError, match=match):
        CompressConfig.from_dict(d, method)


def test_pruning_and_merging_together_is_an_error(model):
    src, calib = model
    d = {"fraction": 0.5, "calibration": str(calib)}
    with pytest.raises(ValueError, match="cannot both be set"):
        engine_config(str(src), expert_pruning=d, expert_merging=d)


def test_not_a_safetensors_moe_checkpoint(model, tmp_path):
    _, calib = model
    d = {"fraction": 0.5, "calibration": str(calib)}
    with pytest.raises(ValueError, match="not load_format='dummy'"):
        LLM("mixtral-mini", load_format="dummy", expert_pruning=d)
    with pytest.raises(ValueError, match="needs an HF safetensors checkpoint folder"):
        LLM("mixtral-mini", expert_pruning=d)
    dense = tiny_moe(tmp_path / "dense", "llama")
    with pytest.raises(ValueError, match="supports mixtral"):
        LLM(str(dense), expert_pruning=d)
    grouped = tiny_moe(tmp_path / "ds", "deepseek_v2")  # group-limited routing
    with pytest.raises(ValueError, match="group-limited routing"):
        LLM(str(grouped), expert_merging=d)


def test_calibration_windows_cut_long_documents(model, tmp_path):
    from transformers import AutoTokenizer

    from sparsa.compress.calibrate import calibration_windows

    src, _ = model
    tok = AutoTokenizer.from_pretrained(str(src))
    text = tmp_path / "long.txt"
    text.write_text("a" * 250 + "\n\n" + "b" * 30)
    windows = calibration_windows(tok, str(text), 260, 100, "expert_pruning")
    assert [len(w) for w in windows] == [100, 100, 51, 31]  # BOS + 250, then BOS + 30
    assert windows[0][0] == windows[3][0] == tok.bos_token_id
