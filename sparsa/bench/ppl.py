"""Perplexity of a model on a text file: the quality check for lossy options (quantization).

The text is cut into documents: "blocks" mode (the default) splits it on blank lines and
scores each block on its own (BOS + tokens, every token after BOS predicted: the method
behind the reference figures in ../shared/models/tinymoe-stories/README.md); "stream" mode
scores the whole text as one document. A document longer than the context is cut into windows
that overlap by one token. `text_slice` picks a fraction of the blocks (or of the characters in
stream mode), e.g. "0.9:1" for the held-out last 10%. Perplexity = exp(total NLL / predicted
tokens).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F


@dataclass
class PerplexityResult:
    model: str
    quantization: str
    text: str
    tokens: int  # predicted tokens
    windows: int
    context_len: int
    nll: float  # mean negative log-likelihood (nats per token)
    perplexity: float
    seconds: float
    weight_bytes: int
    offload: dict | None = None  # the offload report when experts were offloaded
    # MoE layers' mean routed experts per token (dynamic routing changes it), the weight
    # bytes a batch-1 decode token reads (dense weights + its experts), decode speed
    # (batch 1, greedy) and the process's resident memory after the run
    experts_per_token: float | None = None
    bytes_per_token: float | None = None
    decode_tok_s: float | None = None
    rss_bytes: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def parse_slice(spec: str) -> tuple[float, float]:
    """'0.9:1' -> (0.9, 1.0): fractions of the text's characters."""
    try:
        lo_s, hi_s = spec.split(":")
        lo = float(lo_s) if lo_s else 0.0
        hi = float(hi_s) if hi_s else 1.0
    except ValueError:
        raise ValueError(f"slice must look like '0.9:1' (fractions); got {spec!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"slice bounds must satisfy 0 <= lo < hi <= 1; got {spec!r}")
    return lo, hi


def read_documents(path: str | Path, text_slice: str = "0:1", mode: str = "blocks") -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {p}")
    if mode not in ("blocks", "stream"):
        raise ValueError(f"mode must be 'blocks' or 'stream'; got {mode!r}")
    text = p.read_text(encoding="utf-8", errors="replace")
    lo, hi = parse_slice(text_slice)
    if mode == "stream":
        return [text[int(lo * len(text)) : int(hi * len(text))]]
    blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
    return blocks[int(lo * len(blocks)) : int(hi * len(blocks))]


@torch.inference_mode()
def evaluate_perplexity(llm, documents: list[str], *, context_len: int | None = None,
                        max_windows: int | None = None, label: str = "",
                        protocol: str = "all") -> PerplexityResult:
    """Perplexity of `llm` (a `sparsa.LLM`) over `documents`, each scored on its own.

    protocol "all": windows of `context_len` overlapping by one token, every token but the
    first predicted. "llamacpp": llama-perplexity's: the tokens cut into chunks of
    `context_len`, each starting with BOS, and only each chunk's second half scored (the
    first half is context), so its figure and this one can be compared."""
    from sparsa.engine.scoring import prompt_logits
    from sparsa.layers.quantization import module_bytes

    engine = llm.engine
    tok = engine.tokenizer
    if tok is None:
        raise ValueError("perplexity needs a tokenizer; this model has none")
    bos = getattr(tok, "bos_token_id", None)
    L = min(context_len or engine.max_model_len, engine.max_model_len)
    if L < 2:
        raise ValueError(f"context_len must be >= 2; got {L}")
    total_nll, total_tokens, windows = 0.0, 0, 0
    t0 = time.perf_counter()
    if protocol not in ("all", "llamacpp"):
        raise ValueError(f"protocol must be 'all' or 'llamacpp'; got {protocol!r}")
    encoded = [([bos] if bos is not None else []) + tok.encode(doc, add_special_tokens=False)
               for doc in documents]
    bar = _window_bar(encoded, L, protocol, max_windows, label)
    for ids in encoded:
        if protocol == "llamacpp":
            first = L // 2
            for c in range(len(ids) // L):
                window = ids[c * L:(c + 1) * L]
                if bos is not None:
                    window[0] = bos
                logits = prompt_logits(engine, window).float()
                target = torch.tensor(window[first + 1:], dtype=torch.long,
                                      device=logits.device)
                total_nll += float(F.cross_entropy(logits[first:-1], target, reduction="sum"))
                total_tokens += len(target)
                windows += 1
                bar.update(1)
                if max_windows is not None and windows >= max_windows:
                    break
            continue
        # Windows overlap by one token so that every token but the first is predicted.
        for start in range(0, len(ids) - 1, L - 1):
            window = ids[start : start + L]
            if len(window) < 2:
                break
            logits = prompt_logits(engine, window).float()
            target = torch.tensor(window[1:], dtype=torch.long, device=logits.device)
            total_nll += float(F.cross_entropy(logits[:-1], target, reduction="sum"))
            total_tokens += len(window) - 1
            windows += 1
            bar.update(1)
            if max_windows is not None and windows >= max_windows:
                break
        if max_windows is not None and windows >= max_windows:
            break
    bar.close()
    if total_tokens == 0:
        raise ValueError("nothing to score: the text has fewer than 2 tokens")
    seconds = time.perf_counter() - t0
    mean = total_nll / total_tokens
    mc = engine.config.model
    return PerplexityResult(
        model=mc.model, quantization=label or (mc.quantization or "none"), text="",
        tokens=total_tokens, windows=windows, context_len=L, nll=mean, perplexity=math.exp(mean),
        seconds=seconds, weight_bytes=module_bytes(engine.runner.model),
        offload=state.report() if (state := getattr(engine.runner.model, "offload", None))
        else None,
    )


def _window_bar(encoded: list[list[int]], L: int, protocol: str, max_windows: int | None,
                label: str):
    """A progress bar over the windows `evaluate_perplexity` will score (on a terminal)."""
    from tqdm import tqdm

    total = sum(len(ids) // L if protocol == "llamacpp" else len(range(0, len(ids) - 1, L - 1))
                for ids in encoded)
    return tqdm(total=total if max_windows is None else min(total, max_windows),
                desc=f"Perplexity {label}".strip(), unit=" windows", disable=None, leave=False)


def compare_methods(model: str, text_path: str, methods: list[str], *,
                    text_slice: str = "0:1", mode: str = "blocks",
                    context_len: int | None = None,
                    max_windows: int | None = None, group_size: int = 64,
                    num_threads: int | None = None,
                    settings: dict | None = None,
                    protocol: str = "all", decode_tokens: int = 0,
                    calibration: str | None = None) -> list[PerplexityResult]:
    """Load `model` once per method (sparsa/bench/methods.py: a weight form and lossy
    settings such as dynamic routing) and score the same text with each. "auto" leaves the
    weight form unset (a GGUF file's own form; a bf16 checkpoint's bf16). `settings`:
    engine settings every load shares (the method's own override them). With
    `decode_tokens`, also times that many greedy batch-1 tokens after the text's start.
    `calibration`: the text prune=/merge= methods record routing on."""
    from sparsa.bench.methods import parse_method
    from sparsa.llm import LLM

    # every method checked first
    parsed = [parse_method(m, group_size, calibration) for m in methods]
    documents = read_documents(text_path, text_slice, mode)
    results = []
    for label, own in parsed:
        llm = LLM(model, **{**(settings or {}), **own, "num_threads": num_threads,
                            "max_num_batched_tokens": max(2048, context_len or 0)})
        r = evaluate_perplexity(llm, documents, context_len=context_len, max_windows=max_windows,
                                label=label, protocol=protocol)
        r.text = f"{text_path}[{text_slice}, {mode}]"
        _decode_figures(llm, r, documents[0], decode_tokens)
        results.append(r)
        del llm
    return results


def _decode_figures(llm, r: PerplexityResult, document: str, decode_tokens: int) -> None:
    """Experts per token, bytes per decode token, decode tok/s and RSS into `r`."""
    from sparsa.layers.dynamic_routing import expert_nbytes
    from sparsa.sampling_params import SamplingParams

    engine = llm.engine
    model = engine.runner.model
    blocks = [m for m in model.modules() if hasattr(m, "routing_policy")]
    routed = engine.stats().get("dynamic_routing")
    if blocks:
        per_block = [expert_nbytes(b.experts, b.num_routed_experts) for b in blocks]
        k = routed["experts_per_token"] if routed else \
            sum(b.top_k for b in blocks) / len(blocks)
        experts = sum(e * b.num_routed_experts for e, b in zip(per_block, blocks))
        r.experts_per_token = k
        r.bytes_per_token = r.weight_bytes - experts + k * sum(per_block)
    else:
        r.bytes_per_token = r.weight_bytes
    if decode_tokens > 0:
        prompt = engine.tokenizer.encode(document, add_special_tokens=True)[:32]
        params = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4))  # warm up
        t0 = time.perf_counter()
        out = llm.generate([prompt], params)[0].outputs[0]
        r.decode_tok_s = len(out.token_ids) / (time.perf_counter() - t0)
    try:
        import psutil

        r.rss_bytes = int(psutil.Process().memory_info().rss)
    except ImportError:
        pass


def plot_methods(results: list[PerplexityResult], path: str) -> None:
    """Perplexity against bytes per decode token, and against decode tok/s (if timed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if r.bytes_per_token is not None]
    if not results:
        raise ValueError("nothing to plot: no result has bytes per token")
    timed = all(r.decode_tok_s for r in results)
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(10 if timed else 5, 3.8),
                             squeeze=False)
    panels = [("bytes_per_token", "weight MB read per decode token", 1e-6)]
    if timed:
        panels.append(("decode_tok_s", "decode tok/s (batch 1)", 1.0))
    for ax, (field, xlabel, scale) in zip(axes[0], panels):
        for r in results:
            x = getattr(r, field) * scale
            ax.scatter(x, r.perplexity)
            ax.annotate(r.quantization, (x, r.perplexity), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3)
    fig.suptitle(Path(results[0].model).name + ": quality against cost", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_offload(model: str, text_path: str, expert_memory: str,
                    variants: list[tuple[str, str]], *, text_slice: str = "0:1",
                    mode: str = "blocks", context_len: int | None = None,
                    max_windows: int | None = None, policy: str = "lru",
                    num_threads: int | None = None,
                    settings: dict | None = None) -> list[PerplexityResult]:
    """Score the same text with experts offloaded under `expert_memory`, once per
    (on_miss, low_precision) variant (`sparsa.offload.low_precision.parse_on_miss`)."""
    from sparsa.llm import LLM

    documents = read_documents(text_path, text_slice, mode)
    results = []
    for on_miss, low in variants:
        llm = LLM(model, **{
            **(settings or {}), "expert_memory": expert_memory, "offload_policy": policy,
            "offload_on_miss": on_miss, "offload_low_precision": low,
            "num_threads": num_threads, "max_num_batched_tokens": max(2048, context_len or 0)})
        label = f"offload {expert_memory}, " + ("wait" if on_miss == "wait" else
                                                f"{low} on miss")
        r = evaluate_perplexity(llm, documents, context_len=context_len, max_windows=max_windows,
                                label=label)
        r.text = f"{text_path}[{text_slice}, {mode}]"
        results.append(r)
        del llm
    return results


def format_table(results: list[PerplexityResult]) -> str:
    base = results[0].perplexity if results else float("nan")
    extra = [(name, f) for name, f in (
        ("experts/token", lambda r: f"{r.experts_per_token:.3f}"
         if r.experts_per_token is not None else "-"),
        ("MB read/token", lambda r: f"{r.bytes_per_token / 1e6:.2f}"
         if r.bytes_per_token is not None else "-"),
        ("decode tok/s", lambda r: f"{r.decode_tok_s:.1f}" if r.decode_tok_s else "-"),
        ("RSS MB", lambda r: f"{r.rss_bytes / 1e6:.0f}" if r.rss_bytes else "-"))
        if any(f(r) != "-" for r in results)]
    head = ["model", "method", "tokens", "perplexity", "vs first", "weight MB",
            *[n for n, _ in extra], "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [Path(r.model).name, r.quantization, str(r.tokens), f"{r.perplexity:.4f}",
                 f"{(r.perplexity / base - 1) * 100:+.2f}%", f"{r.weight_bytes / 1e6:.2f}",
                 *[f(r) for _, f in extra], f"{r.seconds:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for r in results:
        o = r.offload
        if o:
            lines.append(f"\n{r.quantization}: hit rate {o['hit_rate']:.3f} of {o['requests']} "
                         f"expert requests, {o['substitutions']} computed in low "
                         f"precision, budget {o['budget_bytes'] / 1e6:.2f} of "
                         f"{o['total_expert_bytes'] / 1e6:.2f} MB "
                         f"(peak {o['peak_bytes'] / 1e6:.2f})"
                         + (f", low-precision tier {o['low_precision_bytes'] / 1e6:.2f} MB"
                            if o.get("low_precision") else ""))
    return "\n".join(lines)
