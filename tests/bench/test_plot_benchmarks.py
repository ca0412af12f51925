"""scripts/plot_benchmarks.py draws every chart of docs/bench-data.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "plot_benchmarks.py"
DATA = ROOT / "docs" / "bench-data.json"
EXPECTED = ["bench_llamacpp_ratios.png", "bench_beyond_ram.png", "bench_serving_goodput.png",
            "bench_perplexity.png", "bench_hit_rate_dsv2lite.png"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_script():
    pytest.importorskip("matplotlib", reason="the chart script needs matplotlib "
                                             "(the plot extra)")
    spec = importlib.util.spec_from_file_location("plot_benchmarks", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_writes_every_chart(tmp_path: Path) -> None:
    script = _load_script()
    assert sorted(script.CHARTS) == sorted(EXPECTED)
    assert script.main(["--data", str(DATA), "--out", str(tmp_path)]) == 0
    for name in EXPECTED:
        path = tmp_path / name
        assert path.is_file(), name
        assert path.stat().st_size > 10_000, name
        assert path.read_bytes()[:8] == PNG_MAGIC, name


def test_data_series_name_command_date_and_machine() -> None:
    data = json.loads(DATA.read_text())
    for section in ("llamacpp_ratios", "serving_goodput", "beyond_ram", "hit_rate",
                    "perplexity"):
        sec = data[section]
        assert sec["date"] and sec["machine"] in data["machines"], section
    for row in data["llamacpp_ratios"]["rows"]:
        assert row["command"].startswith("sparsa ")
    for series in data["beyond_ram"]["series"] + data["beyond_ram"]["unbudgeted"]:
        assert series["command"].startswith("sparsa bench beyond-ram ")
    for model in data["perplexity"]["models"]:
        assert all("sparsa bench ppl " in c for c in model["commands"])
