"""llama.cpp as a benchmark peer: install (llama-cpp-python, built from source), convert an HF
checkpoint to GGUF, and run llama-bench, llama-batched-bench and llama-server on it.

Everything lives under one cache directory (default ~/.cache/sparsa/llamacpp): the sdist (its
vendored llama.cpp holds the converter), the kept CMake build tree (pip does not build the
tools, so they are built from the same tree afterwards) and the converted models.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VERSION = "0.3.36"
CMAKE_ARGS = ("-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DLLAMA_CURL=OFF "
              "-DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON "
              "-DLLAVA_BUILD=OFF")
TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize", "llama-server")
# Our weight formats and the llama.cpp type of equal bits (the first of EQUAL_BITS).
GGUF_TYPES = {"none": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_k_m"}
# Every llama.cpp type a Sparsa weight format is compared with by default.
EQUAL_BITS = {"none": ("f32",), "bf16": ("bf16",), "int8": ("q8_0",),
              "int4": ("q4_k_m", "q4_0")}
# Types the HF converter writes itself; the others come from llama-quantize.
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")


def default_cache() -> Path:
    return Path(os.environ.get("SPARSA_LLAMACPP_DIR",
                               Path.home() / ".cache" / "sparsa" / "llamacpp"))


@dataclass
class LlamaCpp:
    cache: Path
    build_info: str | None = None  # "build N (commit)", from the last llama-bench run

    @property
    def src(self) -> Path:
        return self.cache / f"llama_cpp_python-{VERSION}"

    @property
    def vendor(self) -> Path:
        return self.src / "vendor" / "llama.cpp"

    @property
    def build(self) -> Path:
        return self.cache / "build"

    def tool(self, name: str) -> Path:
        for d in (self.build / "bin", self.build / "vendor" / "llama.cpp" / "bin"):
            if (d / name).exists():
                return d / name
        return self.build / "bin" / name

    # ---- install ------------------------------------------------------------------------

    def installed(self) -> bool:
        return self.vendor.is_dir() and all(self.tool(t).exists() for t in TOOLS)

    def ensure_installed(self) -> None:
        """Download the sdist, build llama-cpp-python from it (~10 min on 2 cores) and the
        benchmark tools from the same build tree (seconds)."""
        if self.installed():
            return
        self.cache.mkdir(parents=True, exist_ok=True)
        if not self.src.is_dir():
            _run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}",
                  "--no-deps", "--no-binary", ":all:", "-d", str(self.cache)])
            with tarfile.open(self.cache / f"llama_cpp_python-{VERSION}.tar.gz") as tf:
                tf.extractall(self.cache, filter="data")
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS,
                       CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
            log.warning("building llama-cpp-python from source (about 10 minutes)")
            _run([sys.executable, "-m", "pip", "install", "-C", f"build-dir={self.build}",
                  f"{self.src}[server]", "gguf", "sentencepiece", "protobuf"], env=env)
        # pip builds only the library: configure the kept tree for the tools and build them
        _run(["cmake", str(self.build), "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON"])
        _run(["cmake", "--build", str(self.build), "--target", *TOOLS, "--parallel",
              str(os.cpu_count() or 2)])

    # ---- models ---------------------------------------------------------------------------

    def convert(self, model_dir: Path, quantization: str) -> Path:
        """GGUF of `model_dir` with the llama.cpp type matching `quantization`."""
        gtype = GGUF_TYPES.get(quantization)
        if gtype is None:
            raise ValueError(f"no llama.cpp type for {quantization!r}; one of {list(GGUF_TYPES)}")
        return self.convert_type(model_dir, gtype)

    def convert_type(self, model_dir: Path, gtype: str) -> Path:
        """GGUF of `model_dir` in llama.cpp type `gtype` (f32, bf16, q8_0, q4_k_m, q4_0, ...):
        converted directly, or quantized with llama-quantize from an f32 GGUF (bf16 when
        the checkpoint is stored in bf16: the same values, half the disk)."""
        gtype = gtype.lower()
        out = self.cache / "models" / f"{model_dir.name}-{gtype}.gguf"
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        if gtype in CONVERTER_TYPES:
            _run([sys.executable, "-m", "sparsa.bench.peers.gguf_convert", str(self.vendor),
                  str(model_dir), "--outfile", str(tmp), "--outtype", gtype])
        else:
            src = self.convert_type(model_dir, intermediate_type(model_dir))
            _run([str(self.tool("llama-quantize")), str(src), str(tmp), gtype.upper()])
        tmp.rename(out)
        return out

    # ---- runs -----------------------------------------------------------------------------

    def bench(self, gguf: Path, threads: int, n_prompt: int = 512, n_gen: int = 128,
              repetitions: int = 3) -> dict:
        """llama-bench pp/tg tok/s (means over repetitions)."""
        out = _run([str(self.tool("llama-bench")), "-m", str(gguf), "-t", str(threads),
                    "-p", str(n_prompt), "-n", str(n_gen), "-r", str(repetitions),
                    "-o", "json"], capture=True)
        res = {}
        for row in json.loads(out):
            key = f"pp{row['n_prompt']}" if row["n_gen"] == 0 else f"tg{row['n_gen']}"
            res[key] = row["avg_ts"]
            if row.get("build_commit"):
                self.build_info = f"build {row.get('build_number')} ({row['build_commit']})"
        return res

    def version(self) -> str:
        """llama-cpp-python's version and, once llama-bench ran, its llama.cpp build."""
        return f"{VERSION} (llama-cpp-python)" + (f", {self.build_info}"
                                                  if self.build_info else "")

    def batched_bench(self, gguf: Path, threads: int, batches: list[int], n_prompt: int = 128,
                      n_gen: int = 128) -> dict[int, float]:
        """llama-batched-bench S_TG (generated tokens / decode time) for each batch size."""
        ctx = max(batches) * (n_prompt + n_gen) + 64
        out = _run([str(self.tool("llama-batched-bench")), "-m", str(gguf), "-t", str(threads),
                    "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(n_prompt),
                    "-ntg", str(n_gen), "-npl", ",".join(map(str, batches)),
                    "--output-format", "jsonl"], capture=True)
        res = {}
        for line in out.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                res[int(row["pl"])] = float(row["speed_tg"])
        return res

    @contextmanager
    def server(self, gguf: Path, threads: int, parallel: int, ctx_per_slot: int,
               extra: list[str] | None = None) -> Iterator[str]:
        """llama-server on a free loopback port with `parallel` slots (continuous batching);
        yields its base URL once /health answers, stops it on exit."""
        port = free_port()
        cmd = [str(self.tool("llama-server")), "-m", str(gguf), "-t", str(threads),
               "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel),
               "-c", str(parallel * ctx_per_slot), "-cb", "-b", "2048", "-ub", "512",
               *(extra or [])]
        with serving_process(cmd, port, stderr=subprocess.DEVNULL) as base:
            yield base

    def offline(self, gguf: Path, threads: int, prompts: list[list[int]],
                max_tokens: list[int], parallel: int = 32) -> dict:
        """All requests through llama-server with `parallel` slots (continuous batching);
        output tok/s = generated tokens / wall time."""
        ctx_per_slot = max(len(p) for p in prompts) + max(max_tokens) + 8
        with self.server(gguf, threads, parallel, ctx_per_slot) as base:

            def one(i: int) -> int:
                body = {"prompt": prompts[i], "n_predict": max_tokens[i], "temperature": 0,
                        "ignore_eos": True, "cache_prompt": False}
                req = urllib.request.Request(f"{base}/completion", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=3600) as r:
                    return int(json.loads(r.read())["tokens_predicted"])

            t = time.perf_counter()
            with ThreadPoolExecutor(parallel) as pool:
                n_out = sum(pool.map(one, range(len(prompts))))
            wall = time.perf_counter() - t
        n_in = sum(len(p) for p in prompts)
        return {"output_tok_s": n_out / wall, "total_tok_s": (n_out + n_in) / wall,
                "wall_s": wall, "output_tokens": n_out}


def intermediate_type(model_dir: Path) -> str:
    """The unquantized GGUF type llama-quantize starts from: bf16 for a bf16 checkpoint."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "f32"
    dt = cfg.get("torch_dtype") or cfg.get("dtype")
    return "bf16" if dt == "bfloat16" else "f32"


def _run(cmd: list[str], env: dict | None = None, capture: bool = False) -> str:
    log.info("running %s", " ".join(cmd))
    r = subprocess.run(cmd, env=env, capture_output=capture, text=True)
    if r.returncode != 0:
        tail = (r.stderr or "")[-2000:] if capture else ""
        raise RuntimeError(f"command failed ({r.returncode}): {' '.join(cmd[:3])} ...\n{tail}")
    return r.stdout if capture else ""


@contextmanager
def serving_process(cmd: list[str], port: int, timeout: float = 300, name: str = "llama-server",
                    stderr: Any = None) -> Iterator[str]:
    """Run an HTTP server process, yield its base URL once /health answers, stop it after."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, timeout=timeout, name=name)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 300,
                  name: str = "llama-server") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{name} did not become healthy in {timeout:.0f} s")
