"""`sparsa bench ab`: decode speed under several engine settings, one table."""

from __future__ import annotations

import pytest

from sparsa.bench.ab import main
from tests.tiny_models import build_tiny_checkpoint


def test_ab_compares_variants(tmp_path, capsys):
    _, path = build_tiny_checkpoint("mixtral", tmp_path / "m")
    rc = main([str(path), "--depth", "16", "--tokens", "4", "--rounds", "2",
               "--variant", "{}", "--variant", '{"kv_cache_dtype": "int8"}',
               "--variant", '{"dynamic_routing": {"max_k": 1}}'])
    out = capsys.readouterr().out
    assert rc == 0
    row = [line for line in out.splitlines() if line.startswith("| 16 |")]
    assert len(row) == 1 and row[0].count("(") == 3 and row[0].endswith("x |")
    assert '"experts_per_token": 1.0' in out


def test_ab_refuses_bad_variants(tmp_path):
    with pytest.raises(ValueError, match="JSON object"):
        main(["m", "--variant", "{", "--variant", "{}"])
    with pytest.raises(ValueError, match="at least two"):
        main(["m", "--variant", "{}"])
