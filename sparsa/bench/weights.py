"""The benchmarks' weights: dummy checkpoints written once so every engine loads the same
tensors, the bandwidth torch reads, and the bytes one decoded token reads."""

from __future__ import annotations

import time
from pathlib import Path

import torch


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s that torch reads with the current threads (a streaming sum over 1 GiB)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def _tensors(module) -> list:
    return [t for t in list(module.parameters()) + list(module.buffers())
            if t is not None and not t.is_meta]


def bytes_per_token(model) -> int:
    """Weights read to decode one token: every parameter and buffer except the embedding
    table, with routed experts counted at their top_k / num_experts share (full precision or
    quantized alike; offloaded experts, streamed from disk or held in the expert cache, at
    top_k times the cache's bytes per expert). Tensors only kept for other devices (e.g.
    fp32 copies of tables) are counted too, which errs on the side of a higher roofline."""
    total = 0
    counted: set[int] = set()
    for mod in model.modules():
        top_k = getattr(mod, "top_k", None)
        experts = getattr(mod, "experts", None)
        n_exp = getattr(experts, "num_experts", None)
        # offloaded experts live on disk / in the expert cache, not as tensors (their
        # module's tensors are the next block's, counted with it): a step still reads
        # top_k of them, at the cache's bytes per expert
        per_expert = getattr(getattr(experts, "cache", None), "expert_bytes", None)
        if top_k and per_expert:
            total += per_expert * top_k
        elif top_k and n_exp:
            for t in _tensors(experts):
                if id(t) not in counted:
                    counted.add(id(t))
                    total += t.numel() * t.element_size() * top_k // n_exp
    embed = getattr(model.model.embed_tokens, "weight", None)  # None: rows of the head
    # the table is read per token only when it is the output projection itself; a quantized
    # head of a tied model is its own tensor (counted below), the fp32 table then a lookup
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    tied = head is embed
    for t in _tensors(model):
        if id(t) in counted or (t is embed and not tied):
            continue
        counted.add(id(t))
        total += t.numel() * t.element_size()
    return total


def ensure_checkpoint(name: str, cache: Path, seed: int = 0, dtype: str = "float32") -> Path:
    """A dummy-weight HF checkpoint of a built-in config, written once (streamed, tensor by
    tensor: `write_dummy_checkpoint`) so both engines load exactly the same weights; fp32 by
    default, the weights the bench compares (a bf16 one would give Sparsa its bf16 form)."""
    from sparsa.loader.dummy_writer import write_dummy_checkpoint

    out = cache / f"{name}-seed{seed}"
    if not (out / "config.json").exists():
        write_dummy_checkpoint(name, out, dtype=dtype, seed=seed)
    _add_tokenizer(out)
    return out


def _add_tokenizer(model_dir: Path) -> None:
    """Give a vocab-32000 dummy checkpoint the shared 32k BPE tokenizer (llama.cpp's GGUF
    converter needs one; text prompts then work too). Without ../shared it stays without."""
    from sparsa.tokenizer import shared_dir

    src = shared_dir() / "tokenizers" / "bpe32k"
    if (model_dir / "tokenizer.json").exists() or not (src / "tokenizer.json").exists():
        return
    import shutil

    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (src / f).exists():
            shutil.copyfile(src / f, model_dir / f)
