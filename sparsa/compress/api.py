"""Compress a checkpoint (calibrate, plan each MoE layer, write the new folder), and the
engine's hook: with `expert_pruning` / `expert_merging` set, the engine loads a compressed
copy kept under ~/.cache/sparsa/compressed (reused while the model, the settings and the
calibration text are unchanged)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsa.compress.calibrate import calibrate
from sparsa.compress.checkpoint import SourceCheckpoint, write_checkpoint
from sparsa.compress.merge import merge_plan
from sparsa.compress.prune import least_used, prune_plan, usage_table
from sparsa.config import DeviceConfig, EngineConfig, ModelConfig
from sparsa.config.compress import CompressConfig

log = logging.getLogger(__name__)

CACHE_ENV = "SPARSA_COMPRESSED_DIR"
FORMAT = 1  # bump when the written checkpoints change, so stale cached copies are redone


def model_dir(mc: ModelConfig, setting: str) -> Path:
    """The safetensors folder `mc` names (a hub id resolved); an error naming `setting` for
    anything else (a GGUF or llama2.c file, a built-in config)."""
    from sparsa.loader.model_loader import resolve_model

    if mc.load_format == "dummy":
        raise ValueError(f"{setting} needs a checkpoint with weights, not load_format='dummy'")
    resolved = resolve_model(mc)
    if resolved.model_dir is None or resolved.gguf_file is not None or \
            not any(resolved.model_dir.glob("*.safetensors")):
        raise ValueError(f"{setting} needs an HF safetensors checkpoint folder; "
                         f"{mc.model} is not one")
    return resolved.model_dir


def compress_checkpoint(mc: ModelConfig, cfg: CompressConfig, out_dir: str | Path,
                        engine_cls: Callable[[EngineConfig], Any],
                        device: DeviceConfig | None = None) -> Path:
    """Prune or merge (cfg.method) the experts of the checkpoint `mc` names into a new HF
    checkpoint folder `out_dir`; returns it. The routing statistics come from running
    cfg.calibration through the original model on an `engine_cls` engine (LLMEngine: passed
    in, since the engine calls this module) in its own weight form, offloading included."""
    t0 = time.perf_counter()
    src_dir = model_dir(mc, cfg.setting)
    src = SourceCheckpoint(src_dir)
    try:
        removed = cfg.removed(src.num_experts, src.top_k)
        window = min(int(src.config.get("max_position_embeddings") or 1024), 1024)
        calib = calibrate(engine_cls, dataclasses.replace(mc, model=str(src_dir), revision=None),
                          cfg, src.num_experts, window, device)
        plans, layers = {}, {}
        for layer in src.layers:
            stats = calib.layers.get(layer.layer)
            if stats is None:
                raise ValueError(f"{cfg.setting}: calibration never reached MoE layer "
                                 f"{layer.layer}")
            if cfg.method == "prune":
                plan = prune_plan(stats, removed, cfg.criterion)
                layers[layer.layer] = {"removed": least_used(stats, removed, cfg.criterion)}
            else:
                plan = merge_plan(src, layer, stats, removed, cfg)
                layers[layer.layer] = {"groups": plan.groups,
                                       "weights": [[round(w, 5) for w in ws]
                                                   for ws in plan.weights]}
            layers[layer.layer]["usage"] = usage_table(stats)
            plans[layer.layer] = plan
        recipe = {"source": str(src_dir), **cfg.as_dict(),
                  "experts": {"before": src.num_experts, "after": src.num_experts - removed},
                  "calibration_tokens_run": calib.tokens, "layers": layers}
        out = write_checkpoint(src, plans, Path(out_dir), recipe)
    finally:
        src.close()
    log.info("%s: %d -> %d experts per MoE layer in %.1f s (%s)", cfg.setting,
             src.num_experts, src.num_experts - removed, time.perf_counter() - t0, out)
    return out


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "sparsa" / "compressed"


def cache_key(src_dir: Path, mc: ModelConfig, cfg: CompressConfig) -> str:
    """What the compressed copy depends on: the checkpoint's files (names, sizes, times),
    its config, the settings, the calibration text's bytes and the weight form used to
    calibrate (the overrides and offloading do not change results)."""
    h = hashlib.sha256()
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                   for f in src_dir.iterdir() if f.is_file())
    settings = {**cfg.as_dict(), "calibration": _file_digest(Path(cfg.calibration))}
    h.update(json.dumps([FORMAT, str(src_dir.resolve()), files, settings, mc.hf_overrides,
                         mc.dtype], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def compressed_model(config: EngineConfig, engine_cls: Callable[[EngineConfig], Any]
                     ) -> ModelConfig:
    """The engine's hook: `config.model` itself when neither expert pruning nor merging is
    on, else a copy of it that names the compressed checkpoint (made on first use, the
    calibration run on an `engine_cls` engine)."""
    cfg = config.compression
    mc = config.model
    if cfg is None:
        return mc
    src_dir = model_dir(mc, cfg.setting)
    amount = f"{cfg.fraction:g}" if cfg.fraction is not None else f"n{cfg.count}"
    folder = cache_root() / f"{src_dir.name}-{cfg.method}{amount}-{cache_key(src_dir, mc, cfg)}"
    if (folder / "config.json").is_file():
        log.info("%s: reusing %s", cfg.setting, folder)
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            compress_checkpoint(mc, cfg, tmp, engine_cls, config.device)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process wrote it meanwhile: theirs is the same
                if not (folder / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dataclasses.replace(mc, model=str(folder), revision=None)
