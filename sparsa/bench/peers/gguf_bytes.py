"""Bytes of a GGUF model that llama.cpp reads to decode one token, from its tensor table.

Counted as `sparsa.bench.bytes_per_token` counts Sparsa's weights: every tensor in full,
except the routed-expert tensors (``*_exps``: one tensor per layer holding all experts),
counted at ``expert_used_count / expert_count`` of their bytes, and the token embedding,
of which a step reads one row (all of it when there is no ``output.weight``: tied, the table
is the LM head). Shared experts (``*_shexp``) are always active and count in full.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _gguf_module():
    try:
        import gguf
    except ImportError:  # the vendored copy in the llama.cpp sources the peer downloads
        from sparsa.bench.peers.llamacpp import LlamaCpp, default_cache

        gguf_py = LlamaCpp(default_cache()).vendor / "gguf-py"
        if not gguf_py.is_dir():
            raise
        sys.path.insert(0, str(gguf_py))
        import gguf
    return gguf


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    v = f.contents() if hasattr(f, "contents") else f.parts[f.data[0]][0]
    return v.item() if hasattr(v, "item") else v


def gguf_bytes_per_token(path: str | Path) -> dict:
    """{"bytes_per_token", "expert_bytes" (all routed-expert tensors), "non_expert_bytes",
    "embedding_bytes", "embedding_row_bytes", "experts", "top_k", "file_bytes", "types"
    (bytes per tensor type)} of the GGUF at `path`."""
    gguf = _gguf_module()
    r = gguf.GGUFReader(str(path))
    arch = _field(r, "general.architecture")
    n_exp = _field(r, f"{arch}.expert_count") or 0
    top_k = _field(r, f"{arch}.expert_used_count") or 0
    names = {t.name for t in r.tensors}
    tied = "output.weight" not in names
    expert = non_expert = emb = emb_row = 0
    types: dict[str, int] = {}
    for t in r.tensors:
        nb = int(t.n_bytes)
        tname = t.tensor_type.name.lower()
        types[tname] = types.get(tname, 0) + nb
        if "_exps." in t.name:
            expert += nb
        elif t.name == "token_embd.weight":
            emb = nb
            rows = int(t.shape[-1])  # ggml order: ne0 = n_embd, ne1 = n_vocab
            emb_row = nb // rows
        else:
            non_expert += nb
    if expert and not (n_exp and top_k):
        raise ValueError(f"{path}: expert tensors but no {arch}.expert_count/expert_used_count")
    bpt = non_expert + (expert * top_k // n_exp if expert else 0) + (emb if tied else emb_row)
    return {"bytes_per_token": bpt, "expert_bytes": expert, "non_expert_bytes": non_expert,
            "embedding_bytes": emb, "embedding_row_bytes": emb_row, "experts": n_exp,
            "top_k": top_k, "tied_embeddings": tied, "file_bytes": Path(path).stat().st_size,
            "types": types}
