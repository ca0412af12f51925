"""Every test here writes its compressed copies under its own tmp folder, not ~/.cache."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _compressed_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSA_COMPRESSED_DIR", str(tmp_path / "compressed-cache"))
