"""Loading streams tensors: peak RSS stays within ~1.3x the weight bytes."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint

_CHILD = r"""
import json, sys, psutil, torch
from sparsa.config import ModelConfig
from sparsa.loader.model_loader import load_model, resolve_model
from sparsa.models.registry import resolve_architecture
# import-time allocations (torch, transformers' config classes) happen before the baseline
resolve_architecture(resolve_model(ModelConfig(sys.argv[1])).hf_config)
base = psutil.Process().memory_info().rss
model, _, _ = load_model(ModelConfig(sys.argv[1], dtype="float32"), torch.device("cpu"))
# VmHWM belongs to this exec'd image; ru_maxrss would include the forked parent's RSS
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
peak = int(hwm.split()[1]) * 1024
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"base": base, "peak": peak, "weights": weights}))
"""


def test_peak_rss_during_load(tmp_path):
    cfg = dict(TINY_CONFIGS["mixtral"], hidden_size=512, intermediate_size=1024,
               num_hidden_layers=4, vocab_size=8000, num_attention_heads=8,
               num_key_value_heads=2)
    _, path = build_tiny_checkpoint("mixtral", tmp_path / "m", config=cfg)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True,
                         text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["weights"] > 100e6
    growth = r["peak"] - r["base"]
    assert growth <= 1.3 * r["weights"], (growth / r["weights"], r)
