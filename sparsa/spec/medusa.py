"""Medusa heads: small residual blocks on the target's final hidden state, one per future
position, that share the target's LM head (Medusa-1). Head i reads h_t, the state whose LM
head gave the last token x_{t+1}, and guesses x_{t+1+i}; the guesses are the proposals.
Trained by `sparsa train-draft` on the target's own answers; stored as
`medusa_heads.safetensors` beside `medusa_config.json`."""

from __future__ import annotations

from collections.abc import Collection
from collections.abc import Sequence as Seq
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparsa.core.sequence import Sequence
from sparsa.spec.base import Proposer
from sparsa.spec.head_files import check_head_fits, load_head_weights, read_head_config, save_head

CONFIG = "medusa_config.json"
WEIGHTS = "medusa_heads.safetensors"


class MedusaHeads(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden_size, hidden_size)
                                    for _ in range(num_heads))
        for layer in self.layers:  # start as the LM head itself (a residual of zero)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        """[n_heads, B, H]: each head's features, for the LM head."""
        layers = list(self.layers)[: heads or len(self.layers)]
        return torch.stack([h + F.silu(layer(h)) for layer in layers])

    def save(self, out: str | Path, base_model: str, vocab_size: int) -> Path:
        return save_head(self, out, WEIGHTS, CONFIG, {
            "num_heads": len(self.layers), "hidden_size": self.layers[0].in_features,
            "vocab_size": vocab_size, "base_model": base_model})

    @classmethod
    def load(cls, path: str | Path, hidden_size: int, vocab_size: int) -> MedusaHeads:
        cfg = read_head_config(path, WEIGHTS, CONFIG, "Medusa heads",
                               "train them with `sparsa train-draft`")
        try:
            n, h, v = int(cfg["num_heads"]), int(cfg["hidden_size"]), int(cfg["vocab_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{Path(path) / CONFIG} is not a Medusa config: {e}") from None
        check_head_fits("Medusa heads", path, h, v, hidden_size, vocab_size)
        heads = cls(h, n)
        load_head_weights(heads, Path(path) / WEIGHTS)
        return heads.eval()


class MedusaProposer(Proposer):
    """Proposals from the heads on each sequence's last hidden state (the engine hands
    it over after every step), through the target's own LM head, greedy."""

    def __init__(self, path: str, model: nn.Module, hidden_size: int, vocab_size: int,
                 dtype: torch.dtype):
        self.heads = MedusaHeads.load(path, hidden_size, vocab_size).to(dtype)
        self.model = model
        self.hidden: dict[int, torch.Tensor] = {}

    @property
    def num_heads(self) -> int:
        return len(self.heads.layers)

    def note_hidden(self, seq_id: int, h: torch.Tensor, first_pos: int) -> None:
        self.hidden[seq_id] = h[-1]  # the heads read the latest state only

    def retain(self, seq_ids: Collection[int]) -> None:
        for sid in [s for s in self.hidden if s not in seq_ids]:
            del self.hidden[sid]

    @torch.inference_mode()
    def propose(self, seqs: Seq[Sequence], max_tokens: Seq[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in seqs]
        rows = [i for i, s in enumerate(seqs) if s.seq_id in self.hidden]
        if not rows:
            return out
        k = min(max(max_tokens[i] for i in rows), self.num_heads)
        h = torch.stack([self.hidden[seqs[i].seq_id] for i in rows])
        feats = self.heads(h, k)  # [k, B, H]
        toks = self.model.compute_logits(feats.reshape(-1, h.shape[-1])).argmax(-1)
        toks = toks.view(k, len(rows)).t().tolist()
        for r, i in enumerate(rows):
            out[i] = toks[r][: max_tokens[i]]
        return out

    @torch.inference_mode()
    def propose_tree(self, seqs: Seq[Sequence], shape: Seq[tuple[int, ...]]
                     ) -> list[tuple[list[int], list[int]]]:
        """Medusa's tree: the node at rank path (r1, .., rd) is head d's r_d-th best token
        (heads guess each position on their own, so a node's token is its depth's)."""
        out: list[tuple[list[int], list[int]]] = [([], []) for _ in seqs]
        rows = [i for i, s in enumerate(seqs) if s.seq_id in self.hidden]
        if not rows:
            return out
        shape = [p for p in shape if len(p) <= self.num_heads]
        depth = max(len(p) for p in shape)
        width = max(p[-1] for p in shape) + 1
        h = torch.stack([self.hidden[seqs[i].seq_id] for i in rows])
        feats = self.heads(h, depth)  # [depth, B, H]
        logits = self.model.compute_logits(feats.reshape(-1, h.shape[-1]))
        top = logits.topk(width, dim=-1).indices.view(depth, len(rows), width).tolist()
        index = {p: n for n, p in enumerate(shape)}
        parents = [index[p[:-1]] if len(p) > 1 else -1 for p in shape]
        for r, i in enumerate(rows):
            out[i] = ([top[len(p) - 1][r][p[-1]] for p in shape], list(parents))
        return out
