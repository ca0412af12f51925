"""Issue 19's loading defects: each message points at the problem."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from sparsa import LLM
from sparsa.tokenizer import shared_dir


def test_a_folder_with_a_llama2c_bin_points_at_the_file(tmp_path):
    (tmp_path / "stories.bin").write_bytes(b"\0" * 64)
    with pytest.raises(FileNotFoundError, match=r"holds stories\.bin: for a llama2\.c "
                                                r"checkpoint pass that file"):
        LLM(str(tmp_path))


def test_an_fp8_checkpoint_names_the_dtype(tmp_path):
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [2, 2], "data_offsets": [0, 4]}})
    raw = header.encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    from sparsa.loader.safetensors_reader import CheckpointError, SafetensorsCheckpoint

    with pytest.raises(CheckpointError, match=r"has dtype F8_E4M3, which Sparsa does not "
                                              r"load .*FP8 checkpoint needs its bf16"):
        SafetensorsCheckpoint(tmp_path)


def test_info_flags_a_truncated_checkpoint(tmp_path, capsys):
    from sparsa.cli import main

    src = shared_dir() / "models" / "tinymoe-stories"
    if not (src / "config.json").is_file():
        pytest.skip(f"{src} not found (set SPARSA_SHARED)")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    f = next(dst.glob("*.safetensors"))
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    assert main(["info", str(dst)]) == 2
    assert "truncated" in capsys.readouterr().err


def test_random_weights_are_announced(caplog):
    """Issue 19: a built-in config or load_format='dummy' says its output is noise."""
    with caplog.at_level("WARNING"):
        LLM("mixtral-mini", load_format="dummy", hf_overrides={"num_hidden_layers": 1},
            max_model_len=64)
    assert "RANDOM weights" in caplog.text
