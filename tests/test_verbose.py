"""`-v` (issue 19): Sparsa's own decisions on stderr as `sparsa: ...` lines (weight form,
threads, KV cache, kernels, offload budget), and not transformers' config dump. Run as a
subprocess: the command's own logging setup is what is being tested."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.server.conftest import build_tiny_chat_model
from tests.tiny_models import build_tiny_checkpoint

HF_DUMP = ("Model config", "loading configuration file")


def _sparsa(*argv: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "sparsa", *argv], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return build_tiny_chat_model(tmp_path_factory.mktemp("verbose") / "tiny")


def test_verbose_generate_logs_the_engine_decisions(dense):
    argv = ["generate", str(dense), "--prompt", "Hi", "--max-tokens", "3", "--temperature",
            "0", "--num-threads", "1", "--kv-cache-memory", "8MiB", "-q", "int8"]
    err = _sparsa(*argv, "-v").stderr
    for line in ("sparsa: loading tiny (safetensors in", "on cpu with 1 thread\n",
                 "sparsa: compute dtype float32 (the checkpoint's)",
                 "sparsa: weight form: int8 (a scale per row, activations dynamic)",
                 "sparsa: quantized 9 linear layers and 0 expert blocks to int8",
                 "sparsa: KV cache: ", "sparsa: native decode plan: "):
        assert line in err, err
    assert re.search(r"^sparsa: native (CPU )?kernels (loaded|unavailable|disabled)", err,
                     re.M), err
    assert not any(d in err for d in HF_DUMP), err
    quiet = _sparsa(*argv).stderr
    assert "sparsa: " not in quiet and not any(d in quiet for d in HF_DUMP), quiet


def test_verbose_logs_the_offload_budget(tmp_path):
    _, moe = build_tiny_checkpoint("mixtral", tmp_path / "moe")
    err = _sparsa("generate", str(moe), "--prompt-ids", "1,5,9", "--max-tokens", "2",
                  "--expert-memory", "50%", "--kv-cache-memory", "8MiB", "-v").stderr
    assert "sparsa: offload: 8 routed experts of " in err, err
    assert "expert_memory=50% -> budget " in err and "4 experts cached (50%)" in err, err
    assert "sparsa: offload: experts read from the checkpoint, layout " in err, err
