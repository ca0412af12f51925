"""`sparsa prune` and `sparsa eval-ppl --methods prune=F,merge=F`."""

from __future__ import annotations

import json

from sparsa.cli import main
from tests.compress.tiny import calibration_text, tiny_moe


def test_prune_command_writes_a_checkpoint(tmp_path, capsys):
    src = tiny_moe(tmp_path / "src")
    calib = calibration_text(tmp_path / "calib.txt")
    out = tmp_path / "merged"
    rc = main(["prune", str(src), "--count", "1", "--calibration", str(calib), "--out",
               str(out), "--merge", "--calibration-tokens", "256", "--router", "anchor"])
    assert rc == 0
    assert "4 -> 3 experts per MoE layer" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 3
    assert (out / "tokenizer.json").is_file()
    recipe = json.loads((out / "compression.json").read_text())
    assert recipe["method"] == "merge" and recipe["router"] == "anchor"
    # a merge option without --merge, and a folder that is not empty: one-line errors
    rc = main(["prune", str(src), "--count", "1", "--calibration", str(calib), "--out",
               str(tmp_path / "x"), "--router", "anchor"])
    assert rc == 2 and "--router is a --merge option" in capsys.readouterr().err
    rc = main(["prune", str(src), "--count", "1", "--calibration", str(calib), "--out",
               str(out), "--calibration-tokens", "256"])
    assert rc == 2 and "exists and is not empty" in capsys.readouterr().err


def test_eval_ppl_compares_pruning_and_merging(tmp_path, capsys):
    src = tiny_moe(tmp_path / "src")
    calib = calibration_text(tmp_path / "calib.txt")
    text = calibration_text(tmp_path / "text.txt", stories=4)
    rc = main(["eval-ppl", str(src), "--text", str(text), "--calibration", str(calib),
               "--methods", "none,prune=0.25+prune.calibration_tokens=256,"
               "int8+merge=0.5+merge.calibration_tokens=256+merge.grouping=dominant",
               "--num-kv-blocks", "64"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = {line.split("|")[2].strip(): line.split("|") for line in out.splitlines()
            if line.startswith("| src")}
    assert len(rows) == 3
    weight_mb = [float(r[6]) for r in rows.values()]
    assert weight_mb[0] > weight_mb[1] > weight_mb[2]  # 4, 3, then 2 experts (in int8)
    rc = main(["eval-ppl", str(src), "--text", str(text), "--methods", "none,prune=0.25"])
    assert rc == 2 and "needs a calibration text" in capsys.readouterr().err
