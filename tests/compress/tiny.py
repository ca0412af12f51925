"""Tiny MoE checkpoints for the pruning / merging tests: random weights (transformers'
own save), a character tokenizer (calibration text is tokenized), and edits that control
the routing: experts no token is ever routed to, and experts that are exact copies."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.server.conftest import VOCAB, build_char_tokenizer
from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint

STORY = ("Once upon a time there was a little dog named Max. Max liked to run in the park "
         "and play with his red ball. One day the ball rolled into the pond.")


def tiny_moe(out: Path, arch: str = "mixtral", **overrides) -> Path:
    """A tiny random `arch` checkpoint with a character tokenizer; returns its folder."""
    cfg = {**TINY_CONFIGS[arch], "vocab_size": VOCAB, **overrides}
    build_tiny_checkpoint(arch, out, config=cfg, std=0.1)
    build_char_tokenizer(out)
    return out


def calibration_text(path: Path, stories: int = 12) -> Path:
    """Blank-line-separated variations of a short story."""
    words = STORY.split()
    blocks = [" ".join(words[i % 5:] + words[:i % 5]) for i in range(stories)]
    path.write_text("\n\n".join(blocks) + "\n")
    return path


def _edit(folder: Path, fn) -> None:
    f = folder / "model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def make_dead_experts(folder: Path, dead: list[int], dim: int = 0) -> None:
    """Mixtral: no token is ever routed to the `dead` experts. Hidden dimension `dim` of
    every token is held at a constant positive value (set by the embedding, never written
    by attention or the experts), so after RMS norm it is positive, and the dead experts'
    router rows weigh it by -20: their logits are far below every other expert's."""
    def fn(sd):
        sd["model.embed_tokens.weight"][:, dim] = 1.0
        for name, t in sd.items():
            if name.endswith("self_attn.o_proj.weight") or \
                    (".experts." in name and name.endswith("w2.weight")):
                t[dim, :] = 0.0
            if name.endswith("block_sparse_moe.gate.weight"):
                t[dead, dim] = -20.0
    _edit(folder, fn)


def make_copied_experts(folder: Path, copies: dict[int, int], seed: int = 0,
                        jitter: float = 1e-4) -> None:
    """Mixtral: expert `dst` becomes expert `src` with its intermediate neurons shuffled (the
    same function), for each dst: src in `copies`, with the router row of `src` plus a
    `jitter` small enough never to change which pair a token picks but large enough that
    the tokens of a pair are split between its two experts."""
    g = torch.Generator().manual_seed(seed)

    def fn(sd):
        layers = {n.split(".")[2] for n in sd if ".block_sparse_moe.gate." in n}
        for i in layers:
            p = f"model.layers.{i}.block_sparse_moe"
            for dst, src in copies.items():
                n = sd[f"{p}.experts.{src}.w1.weight"].shape[0]
                perm = torch.randperm(n, generator=g)
                for w in ("w1", "w3"):
                    sd[f"{p}.experts.{dst}.{w}.weight"] = \
                        sd[f"{p}.experts.{src}.{w}.weight"][perm].clone()
                sd[f"{p}.experts.{dst}.w2.weight"] = \
                    sd[f"{p}.experts.{src}.w2.weight"][:, perm].clone()
                row = sd[f"{p}.gate.weight"][src]
                sd[f"{p}.gate.weight"][dst] = row + jitter * torch.randn(row.shape, generator=g)
    _edit(folder, fn)


def hf_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def hf_greedy(folder: Path, ids: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                          pad_token_id=0)
    return out[0, len(ids):].tolist()


def shard(folder: Path) -> None:
    """Split model.safetensors into two shards with an index, as large checkpoints are."""
    import json

    sd = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(sd)
    half = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for fname, part in half.items():
        save_file({n: sd[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
