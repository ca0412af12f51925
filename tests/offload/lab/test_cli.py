"""`sparsa cache-sim` on tiny synthetic traces (in-process)."""

from __future__ import annotations

import json

from sparsa.cli import main
from sparsa.offload.lab.trace import save_trace
from tests.offload.helpers import synthetic


def test_cache_sim_smoke(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    train, test = tmp_path / "train.csv", tmp_path / "test.csv.gz"
    save_trace(synthetic(n_prompts=8, seed=1), train)
    save_trace(synthetic(n_prompts=3, seed=2), test)
    png = tmp_path / "hit.png"
    rc = main(["cache-sim", "--trace", str(test), "--train", str(train), "--sweep", "2,4,8",
               "--plot", str(png), "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(out)
    pols = {r["policy"] for r in doc["results"]}
    assert pols == {"lru", "lfu", "lrfu", "arc", "activation", "learned", "belady"}
    assert png.stat().st_size > 1000
    for r in doc["results"]:
        assert r["hit_rate"] <= doc["belady_demand"][str(r["capacity"])] + 1e-12

    rc = main(["cache-sim", "--trace", str(test), "--train", str(train), "--capacity", "2",
               "--policy", "lru,belady", "--predictor", "combined", "--prefetch", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "prefetch 2" in out and "lru" in out
    assert len(list((tmp_path / "cache" / "sparsa" / "offload").glob("*.fit"))) == 2
    # a second run reuses the cached fits and reports the same
    rc = main(["cache-sim", "--trace", str(test), "--train", str(train), "--capacity", "2",
               "--policy", "lru,belady", "--predictor", "combined", "--prefetch", "2"])
    again = capsys.readouterr().out
    assert rc == 0
    assert [ln.split()[:3] for ln in again.splitlines()[2:4]] == \
        [ln.split()[:3] for ln in out.splitlines()[2:4]]


def test_fit_cache_loads_only_files_it_signed(tmp_path, monkeypatch):
    """A cache file without this user's HMAC is never unpickled: the fit runs instead."""
    import pickle

    from sparsa.offload.lab.cache_sim_cli import _cached

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    train = tmp_path / "train.csv"
    train.write_text("x")
    assert _cached("k", train, lambda: {"fit": 1}, True) == {"fit": 1}
    (fit_file,) = (tmp_path / "cache" / "sparsa" / "offload").glob("*.fit")
    assert _cached("k", train, lambda: 1 / 0, True) == {"fit": 1}  # reused, not refit

    class Planted:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled a planted file')",))

    fit_file.write_bytes(b"\0" * 32 + pickle.dumps(Planted()))
    assert _cached("k", train, lambda: {"fit": 2}, True) == {"fit": 2}
    key = tmp_path / "cache" / "sparsa" / "offload" / ".key"
    assert key.stat().st_mode & 0o077 == 0
    key.chmod(0o644)  # a key others can read could forge files: nothing is cached then
    assert _cached("k", train, lambda: {"fit": 3}, True) == {"fit": 3}
    assert _cached("k", train, lambda: {"fit": 4}, True) == {"fit": 4}


def test_cache_sim_bad_policy(tmp_path, capsys):
    test = tmp_path / "t.csv"
    save_trace(synthetic(n_prompts=2), test)
    assert main(["cache-sim", "--trace", str(test), "--policy", "nope"]) == 2
    assert "unknown policy" in capsys.readouterr().err


def test_cache_sim_neural_and_learned_eviction(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    save_trace(synthetic(n_prompts=6, seed=1), train)
    save_trace(synthetic(n_prompts=2, seed=2), test)
    rc = main(["cache-sim", "--trace", str(test), "--train", str(train), "--capacity", "2",
               "--policy", "lru", "--predictor", "neural", "--prefetch", "2", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["predictor"] == "neural"
    assert 0.0 < doc["results"][0]["prefetch_precision"] <= 1.0
    rc = main(["cache-sim", "--trace", str(test), "--train", str(train), "--capacity", "3,5",
               "--policy", "nextuse,oracle1,belady", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert {r["policy"] for r in doc["results"]} == {"nextuse", "oracle1", "belady"}
    for r in doc["results"]:
        assert r["hit_rate"] <= doc["belady_demand"][str(r["capacity"])] + 1e-12
