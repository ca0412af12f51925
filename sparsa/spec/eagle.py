"""EAGLE draft heads (EAGLE-1, Li et al. 2024): one small decoder layer that drafts on
the target's own features. Its input at position p is fc([f_{p-1}, embed(x_p)]) (f: the
target's final hidden state, x: the token; the target's embedding, frozen), its output
f̂_p, and its guess for x_{p+1} is the argmax of the target's LM head (frozen) on f̂_p.
Drafting k tokens feeds (f̂_p, x̂_{p+1}) back as the next input.

The target's features here are its final, post-norm states (what the engine hands over),
so f̂ goes to the LM head as it is, in training and in drafting alike. The LM head is read
only on `vocab_ids`, the tokens the target actually emitted most in training (FR-Spec's
frequency-ranked draft vocabulary): a draft step then costs a few thousand dot products
instead of the whole vocabulary's, and a proposal outside them would rarely be accepted.
Trained by `sparsa train-draft --method eagle`; stored as `eagle_head.safetensors` beside
`eagle_config.json`."""

from __future__ import annotations

from collections.abc import Collection
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparsa.core.sequence import Sequence
from sparsa.spec.base import Proposer
from sparsa.spec.head_files import check_head_fits, load_head_weights, read_head_config, save_head

CONFIG = "eagle_config.json"
WEIGHTS = "eagle_head.safetensors"
_SHAPE_KEYS = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")


class _RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (half-split form) of x [B, heads, T, D], cos/sin [B, 1, T, D/2]."""
    d = x.shape[-1]
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


class EagleHead(nn.Module):
    """The draft layer: fc on [feature, token embedding], then RMSNorm-attention-MLP (the
    target's layer type, SwiGLU, rotary, grouped K/V), then an RMSNorm (the target's
    features are post-norm). `vocab_ids` [Vd]: the tokens its LM head rows cover."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 intermediate_size: int, vocab_ids: torch.Tensor, rope_theta: float = 1e4,
                 eps: float = 1e-6):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads "
                             f"{num_kv_heads}")
        H, D = hidden_size, head_dim
        self.shape = dict(hidden_size=H, num_heads=num_heads, num_kv_heads=num_kv_heads,
                          head_dim=D, intermediate_size=intermediate_size)
        self.rope_theta, self.eps = float(rope_theta), float(eps)
        self.fc = nn.Linear(2 * H, H)
        self.attn_norm = _RMSNorm(H, eps)
        self.q_proj = nn.Linear(H, num_heads * D, bias=False)
        self.k_proj = nn.Linear(H, num_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(H, num_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(num_heads * D, H, bias=False)
        self.mlp_norm = _RMSNorm(H, eps)
        self.gate_proj = nn.Linear(H, intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, H, bias=False)
        self.norm = _RMSNorm(H, eps)
        self.register_buffer("vocab_ids", vocab_ids.long().clone())

    def forward(self, feats: torch.Tensor, emb: torch.Tensor, positions: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """feats, emb [B, T, H] at positions [B, T] -> (f̂ [B, T, H], k, v [B, kv, T, D]).
        Without `past` and `mask` it is causal over the T rows (training); with them the
        rows see past's K/V and each other as `mask` [B, T, P + T] (True: visible) says."""
        nh, nkv, D = (self.shape[k] for k in ("num_heads", "num_kv_heads", "head_dim"))
        B, T, H = feats.shape
        # the linears see 2-D rows (the int8 kernels' form when drafting)
        x = self.fc(torch.cat([feats, emb], dim=-1).reshape(B * T, 2 * H))
        h = self.attn_norm(x)
        inv = 1.0 / self.rope_theta ** (torch.arange(0, D, 2, device=x.device,
                                                     dtype=torch.float32) / D)
        ang = positions.float()[:, None, :, None] * inv  # [B, 1, T, D/2]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        q = _rotate(self.q_proj(h).view(B, T, nh, D).transpose(1, 2), cos, sin)
        k = _rotate(self.k_proj(h).view(B, T, nkv, D).transpose(1, 2), cos, sin)
        v = self.v_proj(h).view(B, T, nkv, D).transpose(1, 2)
        ka, va = (k, v) if past is None else (torch.cat([past[0], k], 2),
                                              torch.cat([past[1], v], 2))
        # grouped K/V: each K/V head serves nh / nkv query heads
        a = F.scaled_dot_product_attention(
            q, ka, va, attn_mask=None if mask is None else mask[:, None],
            is_causal=mask is None and T > 1, enable_gqa=nh != nkv)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B * T, nh * D))
        m = self.mlp_norm(x)
        x = x + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))
        return self.norm(x).view(B, T, H), k, v

    def save(self, out: str | Path, base_model: str, vocab_size: int) -> Path:
        return save_head(self, out, WEIGHTS, CONFIG, {
            **self.shape, "rope_theta": self.rope_theta, "rms_norm_eps": self.eps,
            "draft_vocab_size": len(self.vocab_ids), "vocab_size": vocab_size,
            "base_model": base_model})

    @classmethod
    def load(cls, path: str | Path, hidden_size: int, vocab_size: int) -> EagleHead:
        cfg = read_head_config(path, WEIGHTS, CONFIG, "EAGLE head",
                               "train one with `sparsa train-draft --method eagle`")
        try:
            shape = {k: int(cfg[k]) for k in _SHAPE_KEYS}
            v, nv = int(cfg["vocab_size"]), int(cfg["draft_vocab_size"])
            theta, eps = float(cfg["rope_theta"]), float(cfg["rms_norm_eps"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{Path(path) / CONFIG} is not an EAGLE config: {e}") from None
        check_head_fits("EAGLE head", path, shape["hidden_size"], v, hidden_size, vocab_size)
        head = cls(**shape, vocab_ids=torch.zeros(nv, dtype=torch.long), rope_theta=theta,
                   eps=eps)
        weights = Path(path) / WEIGHTS
        load_head_weights(head, weights)
        ids = head.vocab_ids
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"{weights} drafts token ids outside the vocabulary of "
                             f"{vocab_size}")
        return head.eval()


def lm_head_rows(model: nn.Module, hidden_size: int, ids: torch.Tensor, device, dtype
                 ) -> torch.Tensor:
    """The target LM head's rows for tokens `ids` as a dense [len(ids), H] matrix, whatever
    form the head runs in: its logits for the unit vectors (the head has no bias)."""
    with torch.inference_mode():
        eye = torch.eye(hidden_size, device=device, dtype=dtype)
        cols = model.compute_logits(eye)  # [H, V]
        return cols.index_select(1, ids.to(cols.device)).t().contiguous().to(dtype)


@dataclass
class _State:
    """One sequence's features f_base .. f_{base+n-1} and the draft layer's K/V at draft
    positions base+1 .. base+m (the one at p reads f_{p-1} and x_p)."""

    base: int
    feats: torch.Tensor  # [capacity, H]
    k: torch.Tensor  # [1, kv, capacity, D]
    v: torch.Tensor
    n: int = 0
    m: int = 0


class EagleProposer(Proposer):
    """Drafts with the EAGLE head on each sequence's target features, greedy, through the
    target's own LM head rows. Keeps per sequence the features the engine hands over (all
    positions: `wants_prompt_hidden`) and the draft layer's own K/V, computed at propose
    time for positions whose features have arrived; drafted positions are never kept (the
    target's real features replace them). quantize: on a CPU in fp32, the draft's
    matrices and LM head rows run with int8 weights (`_quantize`)."""

    wants_prompt_hidden = True

    def __init__(self, path: str, model: nn.Module, hidden_size: int, vocab_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", quantize: bool = True):
        self.head = EagleHead.load(path, hidden_size, vocab_size).to(device=device,
                                                                      dtype=dtype)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if embed is None:
            raise ValueError(f"EAGLE heads need the target's token embedding "
                             f"(model.embed_tokens); {type(model).__name__} has none")
        self.embed, self.dtype, self.device = embed, dtype, torch.device(device)
        self.vocab_ids = self.head.vocab_ids
        self.rows = lm_head_rows(model, hidden_size, self.vocab_ids, self.device, dtype)
        self._lm = lambda f: f @ self.rows.t()
        if quantize and self.device.type == "cpu" and dtype == torch.float32:
            self._quantize()
        self.states: dict[int, _State] = {}

    def _quantize(self) -> None:
        """int8 weights (per output row, exact activations) for the draft's matrices and
        LM head rows: a draft step reads a quarter of the bytes, and on a CPU a step at
        batch 1 is as fast as its weights can be read. Proposals may differ from fp32's
        in near-ties; verification keeps the output exact either way."""
        from sparsa.layers.quantization.modules import Int8Linear

        for name, mod in list(self.head.named_children()):
            if isinstance(mod, nn.Linear):
                setattr(self.head, name, Int8Linear(mod.weight.detach(), mod.bias, False))
        self._lm = Int8Linear(self.rows, None, False)

    def _new_state(self, base: int, capacity: int) -> _State:
        s = self.head.shape
        kv = torch.empty(1, s["num_kv_heads"], capacity, s["head_dim"], dtype=self.dtype,
                         device=self.device)
        feats = torch.empty(capacity, s["hidden_size"], dtype=self.dtype, device=self.device)
        return _State(base, feats, kv, kv.clone())

    @staticmethod
    def _grow(st: _State, need: int) -> None:
        cap = st.feats.shape[0]
        if need <= cap:
            return
        cap = max(need, 2 * cap)
        feats = st.feats.new_empty(cap, st.feats.shape[1])
        feats[: st.n] = st.feats[: st.n]
        k = st.k.new_empty(1, st.k.shape[1], cap, st.k.shape[3])
        v = torch.empty_like(k)
        k[:, :, : st.m], v[:, :, : st.m] = st.k[:, :, : st.m], st.v[:, :, : st.m]
        st.feats, st.k, st.v = feats, k, v

    def note_hidden(self, seq_id: int, h: torch.Tensor, first_pos: int) -> None:
        st = self.states.get(seq_id)
        if st is None or not st.base <= first_pos <= st.base + st.n:
            # first sight, or a gap (positions the proposer never saw): start over there
            st = self.states[seq_id] = self._new_state(first_pos, max(64, 2 * len(h)))
        i = first_pos - st.base
        st.n = i  # a repeated position replaces everything from it on,
        st.m = min(st.m, i)  # and the draft K/V that read those features
        self._grow(st, i + len(h))
        st.feats[i:i + len(h)] = h.to(self.dtype)
        st.n = i + len(h)

    def retain(self, seq_ids: Collection[int]) -> None:
        for sid in [s for s in self.states if s not in seq_ids]:
            del self.states[sid]

    def _logits(self, f: torch.Tensor) -> torch.Tensor:
        return self._lm(f)

    @torch.inference_mode()
    def propose(self, seqs: Seq[Sequence], max_tokens: Seq[int]) -> list[list[int]]:
        k = max(max_tokens, default=0)
        if k < 1:
            return [[] for _ in seqs]
        chain = [(0,) * d for d in range(1, k + 1)]
        return [toks[:n] for (toks, _), n in zip(self._draft(seqs, chain), max_tokens)]

    @torch.inference_mode()
    def propose_tree(self, seqs: Seq[Sequence], shape: Seq[tuple[int, ...]]
                     ) -> list[tuple[list[int], list[int]]]:
        """EAGLE's tree: the node at rank path (r1, .., rd) is the r_d-th best token the
        draft gives after drafting along its parent's path (tree attention inside the
        draft: a node sees the committed positions, its ancestors and itself)."""
        return self._draft(seqs, [tuple(p) for p in shape])

    def _catch_up(self, seq: Sequence) -> torch.Tensor | None:
        """Computes the draft K/V up to the sequence's last token (position L-1, input
        f_{L-2} and x_{L-1}); returns its f̂ [H], or None when features are missing."""
        st = self.states.get(seq.seq_id)
        last = seq.num_tokens - 1
        if st is None or st.base + st.n < last or last <= st.base:
            return None
        lo, hi = st.m, last - st.base  # draft indices to compute: j -> position base+1+j
        if lo >= hi:  # nothing new (cannot happen between steps; recompute the last one)
            lo = st.m = hi - 1
        ids = torch.tensor([seq.token_at(st.base + 1 + j) for j in range(lo, hi)],
                           device=self.device)
        pos = torch.arange(st.base + 1 + lo, st.base + 1 + hi, device=self.device)
        n = hi - lo
        mask = torch.ones(n, lo + n, dtype=torch.bool, device=self.device).tril(lo)
        out, k, v = self.head(st.feats[lo:hi][None], self.embed(ids)[None].to(self.dtype),
                              pos[None], (st.k[:, :, :lo], st.v[:, :, :lo]), mask[None])
        self._grow(st, hi)
        st.k[:, :, lo:hi], st.v[:, :, lo:hi] = k, v
        st.m = hi
        return out[0, -1]

    def _draft(self, seqs: Seq[Sequence], shape: list[tuple[int, ...]]
               ) -> list[tuple[list[int], list[int]]]:
        out: list[tuple[list[int], list[int]]] = [([], []) for _ in seqs]
        roots = {i: f for i, s in enumerate(seqs) if (f := self._catch_up(s)) is not None}
        if not roots:
            return out
        index = {p: n for n, p in enumerate(shape)}
        parents = [index[p[:-1]] if len(p) > 1 else -1 for p in shape]
        width = max(p[-1] for p in shape) + 1
        depth = max(len(p) for p in shape)
        live = list(roots)
        # per live sequence: node tokens, each expanded node's f̂ and draft K/V
        toks: dict[int, list[int]] = {i: [0] * len(shape) for i in live}
        feat: dict[int, dict[int, torch.Tensor]] = {i: {-1: roots[i]} for i in live}
        spec_k: dict[int, list[torch.Tensor]] = {i: [] for i in live}
        spec_v: dict[int, list[torch.Tensor]] = {i: [] for i in live}
        spec_node: dict[int, list[int]] = {i: [] for i in live}
        has_child = {parents[n] for n in range(len(shape))}
        for d in range(1, depth + 1):
            # the tokens of depth d: the top ranks after each parent's f̂, all sequences'
            # rows through the LM head rows at once
            expanded = sorted({parents[n] for n, p in enumerate(shape) if len(p) == d})
            rows = [(i, e) for i in live for e in expanded]
            f = torch.stack([feat[i][e] for i, e in rows])
            top = self.vocab_ids[self._logits(f).topk(min(width, len(self.vocab_ids)),
                                                      dim=-1).indices].tolist()
            at = {r: t for r, t in zip(rows, top)}
            for n, p in enumerate(shape):
                if len(p) == d:
                    for i in live:
                        toks[i][n] = at[(i, parents[n])][p[-1]]
            if d == depth:
                break
            # the draft layer on depth d's nodes that have children, one pass a sequence
            grow = [n for n, p in enumerate(shape) if len(p) == d and n in has_child]
            for i in live:
                self._expand(seqs[i], grow, parents, toks[i], feat[i], spec_k[i],
                             spec_v[i], spec_node[i], d)
        for i in live:
            out[i] = (toks[i], list(parents))
        return out

    def _expand(self, seq: Sequence, nodes: list[int], parents: list[int], toks: list[int],
                feat: dict[int, torch.Tensor], spec_k: list[torch.Tensor],
                spec_v: list[torch.Tensor], spec_node: list[int], d: int) -> None:
        """Runs the draft layer on `nodes` (depth d) of one sequence: input (the parent's
        f̂, the node's token) at position L-1+d, seeing the committed K/V, the K/V of the
        node's expanded ancestors and its own."""
        st = self.states[seq.seq_id]
        c = st.m
        ids = torch.tensor([toks[n] for n in nodes], device=self.device)
        f = torch.stack([feat[parents[n]] for n in nodes])
        pos = torch.full((len(nodes),), seq.num_tokens - 1 + d, device=self.device)
        prev = len(spec_node)
        mask = torch.zeros(len(nodes), c + prev + len(nodes), dtype=torch.bool,
                           device=self.device)
        mask[:, :c] = True
        for r, n in enumerate(nodes):
            a = parents[n]
            while a >= 0:
                mask[r, c + spec_node.index(a)] = True
                a = parents[a]
            mask[r, c + prev + r] = True
        past_k = torch.cat([st.k[:, :, :c], *spec_k], 2)
        past_v = torch.cat([st.v[:, :, :c], *spec_v], 2)
        out, k, v = self.head(f[None], self.embed(ids)[None].to(self.dtype), pos[None],
                              (past_k, past_v), mask[None])
        spec_k.append(k)
        spec_v.append(v)
        spec_node.extend(nodes)
        for r, n in enumerate(nodes):
            feat[n] = out[0, r]
