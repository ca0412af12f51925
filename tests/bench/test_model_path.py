"""What `sparsa bench --model` accepts, and a clear line for what it does not."""

from __future__ import annotations

import pytest

from sparsa.bench.engines import model_path


def test_a_missing_path_is_named(tmp_path):
    with pytest.raises(ValueError, match="no such model file or folder: /any/path"):
        model_path("/any/path", tmp_path)


def test_an_unknown_name_is_a_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises((ValueError, FileNotFoundError),
                       match=r"not a built-in model config|not in the Hugging Face cache"):
        model_path("nonexistent", tmp_path)
