"""`sparsa eval-ppl --methods`: the method vocabulary (weight forms + lossy settings), and a
run over combinations that writes the table and the plot."""

from __future__ import annotations

import pytest

from sparsa.bench.methods import parse_method
from sparsa.tokenizer import shared_dir

TINYMOE = shared_dir() / "models" / "tinymoe-stories"
CORPUS = shared_dir() / "corpora" / "tinystories_val.txt"


def test_parse_methods():
    label, s = parse_method("int4+top_p=0.8", group_size=32)
    assert label == "int4-g32+top_p=0.8"
    assert s["quantization"] == "int4" and s["dynamic_routing"] == {"top_p": 0.8}
    _, s = parse_method("skip=0.3/0.4+no-renorm+layer_k=2/1")
    assert s["quantization"] == "none"
    assert s["dynamic_routing"] == {"skip_threshold": [0.3, 0.4], "renormalize": False,
                                    "layer_top_k": [2, 1]}
    _, s = parse_method("int8-exact")
    assert s["quantization"] == "int8" and s["int8_activations"] == "none"
    assert "dynamic_routing" not in s


@pytest.mark.parametrize("bad,match", [("", "empty"), ("int8+int4", "two weight forms"),
                                       ("top_q=0.5", "not one of"), ("k=1/2", "not one of"),
                                       ("top_p=x", "not one of"), ("fp7", "not a weight form")])
def test_bad_methods(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_method(bad)


@pytest.mark.skipif(not (TINYMOE.exists() and CORPUS.exists()),
                    reason="tinymoe-stories or the corpus not in ../shared")
def test_eval_ppl_compares_routing_methods_and_plots(tmp_path, capsys):
    from sparsa.cli import main

    png = tmp_path / "ppl.png"
    rc = main(["eval-ppl", str(TINYMOE), "--text", str(CORPUS), "--slice", "0.99:1",
               "--max-windows", "4", "--methods", "none,k=1,skip=0.3+no-renorm",
               "--decode-tokens", "8", "--plot", str(png), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0 and png.stat().st_size > 1000
    rows = {line.split("|")[2].strip(): line for line in out.splitlines()
            if line.startswith("| tinymoe")}
    assert set(rows) == {"none", "k=1", "skip=0.3+no-renorm"}
    assert "| 2.000 |" in rows["none"] and "| 1.000 |" in rows["k=1"]
    import json

    res = {r["quantization"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert res["k=1"]["bytes_per_token"] < res["skip=0.3+no-renorm"]["bytes_per_token"] \
        < res["none"]["bytes_per_token"]
    assert res["k=1"]["perplexity"] > res["none"]["perplexity"]
    assert all(r["decode_tok_s"] > 0 for r in res.values())
