"""Batched token sampler.

Processing order (as in vLLM): repetition/presence/frequency penalties, the
min_tokens stop mask, then greedy rows take the argmax while the other rows are
divided by their temperature, filtered by top-k, top-p and min-p, and sampled.

Reproducibility: a row with a ``torch.Generator`` draws all of its randomness
from that generator alone, and every batched operation it goes through is
row-wise, so its tokens do not depend on the other rows of the batch or on its
position. Generators must live on the same device as the logits.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from sparsa import kernels
from sparsa.sampling_params import SamplingParams


@dataclass
class SamplerOutput:
    token_ids: list[int]
    """One sampled token per row."""
    logprobs: list[float | None]
    """Log-probability of the chosen token under the raw model distribution
    (log_softmax of the unmodified logits), like vLLM's default; None for rows whose
    ``params.logprobs`` is None (a full-vocabulary logsumexp costs ~130 us a row here)."""
    top_logprobs: list[list[tuple[int, float]] | None]
    """Per row: the ``params.logprobs`` most likely (token id, logprob) pairs of the
    raw distribution, best first; an empty list for ``logprobs=0`` and None when
    ``params.logprobs`` is None."""


def _flat_indices(
    lists: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs for every token of every list, as two long tensors."""
    lengths = torch.tensor([len(x) for x in lists], dtype=torch.long)
    cols = torch.tensor(list(chain.from_iterable(lists)), dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(lists)), lengths)
    return rows.to(device, non_blocking=True), cols.to(device, non_blocking=True)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
            and x.stride(1) == 1 and x.shape[1] > 0):
        ext = kernels.load()
        if ext is not None:
            # torch's threaded reduction takes ~18 us for one 32k row here; this ~3 us
            return ext.argmax_rows(x)
    return x.argmax(dim=-1)


class Sampler:
    """Samples one token per row of a ``[B, V]`` logits tensor.

    Args:
        eos_token_ids: EOS ids masked (together with each request's
            ``stop_token_ids``) while a request has fewer than ``min_tokens``
            output tokens, unless the request sets ``ignore_eos``, in which case
            EOS does not end it and needs no mask. Can be overridden per call.
    """

    def __init__(self, eos_token_ids: Iterable[int] = ()) -> None:
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        eos_token_ids: Collection[int] | None = None,
    ) -> SamplerOutput:
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        batch, vocab = logits.shape
        if not (
            len(params)
            == len(prompt_token_ids)
            == len(output_token_ids)
            == len(generators)
            == batch
        ):
            raise ValueError(
                "params, prompt_token_ids, output_token_ids and generators must all have "
                f"one entry per logits row ({batch})"
            )
        eos = self.eos_token_ids if eos_token_ids is None else frozenset(eos_token_ids)
        device = logits.device
        raw = logits.float()

        penalty_rows = [i for i, p in enumerate(params) if p.has_penalties]
        min_tok_rows: list[int] = []
        min_tok_ids: list[list[int]] = []
        for i, p in enumerate(params):
            if p.min_tokens and len(output_token_ids[i]) < p.min_tokens:
                ids = set(p.stop_token_ids)
                if not p.ignore_eos:
                    ids |= eos
                ids = [t for t in ids if t < vocab]
                if ids:
                    min_tok_rows.append(i)
                    min_tok_ids.append(ids)

        x = raw
        if penalty_rows or min_tok_rows:
            x = raw.clone()  # the raw logits are still needed for logprobs
            if penalty_rows:
                self._apply_penalties(x, penalty_rows, params, prompt_token_ids, output_token_ids)
            if min_tok_rows:
                r, c = _flat_indices(min_tok_ids, device)
                rows = torch.tensor(min_tok_rows, dtype=torch.long, device=device)[r]
                x[rows, c] = float("-inf")

        greedy_rows = [i for i, p in enumerate(params) if p.is_greedy]
        if len(greedy_rows) == batch:
            token_ids = _argmax(x)
        else:
            random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
            token_ids = torch.empty(batch, dtype=torch.long, device=device)
            if greedy_rows:
                g_idx = torch.tensor(greedy_rows, dtype=torch.long, device=device)
                token_ids[g_idx] = x[g_idx].argmax(dim=-1)
            r_idx = torch.tensor(random_rows, dtype=torch.long, device=device)
            token_ids[r_idx] = self._sample(
                x[r_idx],
                [params[i] for i in random_rows],
                [generators[i] for i in random_rows],
            )

        # Raw-distribution logprob of the chosen token, without materializing
        # a full [B, V] log_softmax; only for the rows that asked for logprobs.
        chosen: list[float | None] = [None] * batch
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if want:
            w_idx = torch.tensor(want, dtype=torch.long, device=device)
            rw = raw[w_idx]
            lp = rw.gather(1, token_ids[w_idx][:, None]).squeeze(1) - torch.logsumexp(rw, dim=-1)
            for i, v in zip(want, lp.tolist(), strict=True):
                chosen[i] = v

        top: list[list[tuple[int, float]] | None] = [None] * batch
        lp_rows = [i for i, p in enumerate(params) if p.logprobs]
        for i, p in enumerate(params):
            if p.logprobs == 0:
                top[i] = []
        if lp_rows:
            k = min(max(params[i].logprobs for i in lp_rows), vocab)
            idx = torch.tensor(lp_rows, dtype=torch.long, device=device)
            vals, ids = torch.log_softmax(raw[idx], dim=-1).topk(k, dim=-1)
            vals_l, ids_l = vals.tolist(), ids.tolist()
            for j, i in enumerate(lp_rows):
                n = params[i].logprobs
                top[i] = list(zip(ids_l[j][:n], vals_l[j][:n], strict=True))

        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=chosen, top_logprobs=top)

    @staticmethod
    def _apply_penalties(
        x: torch.Tensor,
        rows: list[int],
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
    ) -> None:
        """Applies repetition/presence/frequency penalties to ``x[rows]`` in place."""
        device = x.device
        n, vocab = len(rows), x.shape[1]
        rep = [params[i].repetition_penalty for i in rows]
        coeffs = torch.tensor(
            [
                [rep[j], params[i].presence_penalty, params[i].frequency_penalty]
                for j, i in enumerate(rows)
            ],
            dtype=x.dtype,
        ).to(device, non_blocking=True)
        idx = torch.tensor(rows, dtype=torch.long, device=device)
        sub = x[idx]

        r, c = _flat_indices([output_token_ids[i] for i in rows], device)
        counts = torch.zeros(n, vocab, dtype=x.dtype, device=device)
        counts.index_put_((r, c), torch.ones_like(c, dtype=x.dtype), accumulate=True)
        in_output = counts > 0

        if any(p != 1.0 for p in rep):
            # Prompts can be long; only rows that use the repetition penalty pay for them.
            r, c = _flat_indices(
                [prompt_token_ids[i] if rep[j] != 1.0 else () for j, i in enumerate(rows)],
                device,
            )
            seen = in_output.clone()
            seen[r, c] = True
            penalty = coeffs[:, 0:1]
            sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)

        sub = sub - coeffs[:, 1:2] * in_output - coeffs[:, 2:3] * counts
        x[idx] = sub

    @staticmethod
    def _sample(
        x: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p and sampling for non-greedy rows."""
        device = x.device
        n, vocab = x.shape
        # k == vocab keeps everything, which lets disabled rows share the batched ops.
        ks = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
        need_top_k = any(k < vocab for k in ks)
        need_top_p = any(p.top_p < 1.0 for p in params)
        need_min_p = any(p.min_p > 0.0 for p in params)
        cfg = torch.tensor([[p.temperature, p.top_p, p.min_p] for p in params], dtype=x.dtype).to(
            device, non_blocking=True
        )
        x = x / cfg[:, 0:1]

        if need_top_k or need_top_p:
            if need_top_p:
                srt, order = x.sort(dim=-1, descending=True, stable=True)
            if need_top_k:
                k_max = max(k for k in ks if k < vocab)
                if not need_top_p:
                    srt = x.topk(k_max, dim=-1).values  # sorted descending
                k_idx = torch.tensor([min(k, k_max) - 1 for k in ks], dtype=torch.long)
                k_off = torch.tensor([k >= vocab for k in ks], dtype=torch.bool)
                # Threshold on the k-th value rather than cutting at position k, so
                # ties with the k-th token are kept identically on both paths.
                kth = srt.gather(1, k_idx.to(device, non_blocking=True)[:, None])
                kth = kth.masked_fill(k_off.to(device, non_blocking=True)[:, None], float("-inf"))
                x = x.masked_fill(x < kth, float("-inf"))
                if need_top_p:
                    srt = srt.masked_fill(srt < kth, float("-inf"))
            if need_top_p:
                probs = srt.softmax(dim=-1)
                mass_before = probs.cumsum(dim=-1) - probs
                top_p = cfg[:, 1:2]
                # Explicitly spare top_p == 1 rows: float round-off can push the
                # cumulative mass to 1.0 before the tail, which would drop tokens.
                drop_sorted = (mass_before >= top_p) & (top_p < 1.0)
                drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)
                x = x.masked_fill(drop, float("-inf"))

        probs = x.softmax(dim=-1)
        if need_min_p:
            threshold = probs.amax(dim=-1, keepdim=True) * cfg[:, 2:3]
            probs = probs.masked_fill(probs < threshold, 0.0)
            # No renormalization needed: the exponential race below is scale-invariant.

        # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks token i with
        # probability p_i. Each seeded row draws its own E row from its generator.
        q = torch.empty_like(probs)
        unseeded = [j for j, g in enumerate(generators) if g is None]
        if len(unseeded) == n:
            q.exponential_()
        else:
            for j, g in enumerate(generators):
                if g is not None:
                    q[j].exponential_(generator=g)
            if unseeded:
                u_idx = torch.tensor(unseeded, dtype=torch.long, device=device)
                q[u_idx] = torch.empty(
                    len(unseeded), vocab, dtype=probs.dtype, device=device
                ).exponential_()
        # A zero draw would turn a masked token's 0/0 into nan, which argmax picks.
        q.clamp_min_(torch.finfo(q.dtype).tiny)
        return (probs / q).argmax(dim=-1)
