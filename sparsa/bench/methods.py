"""What `sparsa eval-ppl --methods` compares: each method is a combination of engine
settings, written as terms joined by "+": a weight form (auto, none, int8, int8-exact,
int4, bf16, bf16-prefill) and dynamic-routing terms (top_p=0.8, skip=0.3, k=1, min_k=1,
layer_k=2/1/1/2, no-renorm; top_p and skip take one value per MoE layer as 0.4/0.3/...)
and kv=int8 (the KV cache in int8).
"int4+top_p=0.8" is int4 weights with top-p routing. prune=F and merge=F remove that
fraction of each MoE layer's experts (expert_pruning / expert_merging, calibrated on the
`calibration` text); prune.KEY=V and merge.KEY=V set their other keys (merge.router=anchor)."""

from __future__ import annotations

from typing import Any

WEIGHT_FORMS = ("auto", "none", "int8", "int8-exact", "int4", "bf16", "bf16-prefill")
# expert pruning / merging terms and the setting each fills
COMPRESS_TERMS = {"prune": "expert_pruning", "merge": "expert_merging"}
ROUTING_TERMS = {"top_p": ("top_p", float), "skip": ("skip_threshold", float),
                 "k": ("max_k", int), "min_k": ("min_k", int)}


def parse_method(spec: str, group_size: int = 64, calibration: str | None = None
                 ) -> tuple[str, dict[str, Any]]:
    """(label, engine settings) of one method; a bad term is an error naming it."""
    terms = [t.strip() for t in spec.split("+") if t.strip()]
    if not terms:
        raise ValueError(f"empty method {spec!r}")
    form = None
    routing: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    compress: dict[str, dict[str, Any]] = {}
    for term in terms:
        if term in WEIGHT_FORMS:
            if form is not None:
                raise ValueError(f"method {spec!r} names two weight forms")
            form = term
        elif term == "no-renorm":
            routing["renormalize"] = False
        elif term == "kv=int8":
            extra["kv_cache_dtype"] = "int8"
        elif term.partition("=")[0].partition(".")[0] in COMPRESS_TERMS:
            _compress_term(term, compress, calibration)
        elif "=" in term:
            key, _, value = term.partition("=")
            try:
                if key == "layer_k":
                    routing["layer_top_k"] = [int(v) for v in value.split("/")]
                elif key in ROUTING_TERMS:
                    name, kind = ROUTING_TERMS[key]
                    vals = [kind(v) for v in value.split("/")]
                    if len(vals) > 1 and kind is int:
                        raise ValueError(key)
                    routing[name] = vals if len(vals) > 1 else vals[0]
                else:
                    raise KeyError(key)
            except (KeyError, ValueError):
                raise ValueError(f"method term {term!r} is not one of: "
                                 f"{', '.join(k + '=' for k in (*ROUTING_TERMS, 'layer_k'))}"
                                 " with a number (layer_k=2/1/...)") from None
        else:
            raise ValueError(f"method term {term!r} is not a weight form "
                             f"({', '.join(WEIGHT_FORMS)}) or a setting (top_p=, skip=, k=, "
                             "min_k=, layer_k=, no-renorm, kv=int8, prune=, merge=)")
    form = form or "none"
    exact = form == "int8-exact"
    bf16_prefill = form == "bf16-prefill"
    q = "int8" if exact else "bf16" if bf16_prefill else form
    settings: dict[str, Any] = {
        "quantization": None if q == "auto" else q, "quantization_group_size": group_size,
        "int8_activations": "none" if exact else "dynamic",
        "bf16_prefill": bf16_prefill if q == "bf16" else None}
    if routing:
        settings["dynamic_routing"] = routing
    settings.update(extra)
    for method, d in compress.items():
        if "fraction" not in d and "count" not in d:
            raise ValueError(f"method {spec!r} sets {method}.* keys without {method}=F")
        settings[COMPRESS_TERMS[method]] = d
    label = "+".join(f"int4-g{group_size}" if t == "int4" else t for t in terms)
    return label, settings


def _compress_term(term: str, out: dict[str, dict[str, Any]], calibration: str | None) -> None:
    """prune=F / merge=F (a fraction of each layer's experts) or prune.KEY=V / merge.KEY=V
    into out[method], the expert_pruning / expert_merging dict."""
    key, _, value = term.partition("=")
    method, _, sub = key.partition(".")
    if calibration is None:
        raise ValueError(f"method term {term!r} needs a calibration text (eval-ppl "
                         "--calibration FILE, disjoint from the scored text)")
    if not value:
        raise ValueError(f"method term {term!r} has no value")
    d = out.setdefault(method, {"calibration": calibration})
    if not sub:
        try:
            d["fraction"] = float(value)
        except ValueError:
            raise ValueError(f"method term {term!r}: {method}= takes a fraction of each "
                             "layer's experts, e.g. 0.25") from None
        return
    v: Any = value
    if value in ("true", "false"):
        v = value == "true"
    else:
        for kind in (int, float):
            try:
                v = kind(value)
                break
            except ValueError:
                pass
    d[sub] = v
