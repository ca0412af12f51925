"""Expert-routing traces: the CSV format, a dense in-memory form, and a recorder.

The format is the one of the real DeepSeek-V2-Lite traces in ``../shared/traces``: a CSV file
(optionally gzip'd) with one row per (prompt, layer, token)::

    prompt,layer,pos,token,experts
    1003,1,1,They,22 43 46 56 62 8

``prompt`` is a request id, ``layer`` the MoE layer number, ``pos`` the 0-based token position
inside the request, ``token`` the token's text (Sparsa's own traces may write the token id as
text instead), ``experts`` the routed expert ids, space separated. Row order does not matter:
:func:`load_trace` sorts into batch-1 decode order (each prompt's tokens in order, each token
through the layers in increasing order), which is the order the simulator replays.

In memory a :class:`Trace` is dense: ``experts[n, j, :]`` are the experts of token ``n`` (in
replay order) at the ``j``-th layer of ``layers``. Dense arrays are what makes the replay and
the predictors vectorizable; a trace with missing (token, layer) rows or fewer than ``k``
experts in a row pads with -1.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

__all__ = ["COLUMNS", "Trace", "TraceRecorder", "load_trace", "make_trace", "save_trace"]

COLUMNS = ("prompt", "layer", "pos", "token", "experts")


@dataclass
class Trace:
    """A routing trace in replay order.

    Attributes:
        prompts: (N,) request id of each token (the CSV's ``prompt`` values, as strings).
        pos: (N,) int position of each token inside its request.
        tokens: (N,) str token text (or token id written as text).
        token_ids: (N,) int, ``tokens`` mapped to a dense integer vocabulary ``vocab``.
        layers: the layer numbers present, increasing; column j of ``experts`` is layers[j].
        experts: (N, L, k) int16 expert ids, -1 where absent.
        num_experts: experts per layer (max id + 1 unless given).
        vocab: token text -> token id used in ``token_ids``.
    """

    prompts: np.ndarray
    pos: np.ndarray
    tokens: np.ndarray
    token_ids: np.ndarray
    layers: list[int]
    experts: np.ndarray
    num_experts: int
    vocab: dict[str, int]

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    def prompt_starts(self) -> np.ndarray:
        """Index of the first token of each prompt (prompts are contiguous in replay order)."""
        change = np.ones(self.num_tokens, dtype=bool)
        change[1:] = self.prompts[1:] != self.prompts[:-1]
        return np.flatnonzero(change)

    def multi_hot(self) -> np.ndarray:
        """(N, L, E) bool: token n used expert e at layer j."""
        n, nl, _ = self.experts.shape
        out = np.zeros((n, nl, self.num_experts + 1), dtype=bool)
        # -1 pads land in the extra last column, which is dropped
        np.put_along_axis(out, self.experts.astype(np.int64) % (self.num_experts + 1), True,
                          axis=2)
        return out[:, :, : self.num_experts]

    def subset(self, prompt_ids: Iterable[str]) -> Trace:
        """The tokens of the given prompts (in this trace's order)."""
        keep = np.isin(self.prompts, np.asarray(list(prompt_ids), dtype=self.prompts.dtype))
        return Trace(self.prompts[keep], self.pos[keep], self.tokens[keep],
                     self.token_ids[keep], list(self.layers), self.experts[keep],
                     self.num_experts, self.vocab)


def make_trace(experts: np.ndarray, prompts: Sequence[str | int] | None = None,
               tokens: Sequence[str | int] | None = None, num_experts: int | None = None,
               layers: Sequence[int] | None = None) -> Trace:
    """A Trace from a dense (N, L, k) expert array already in replay order (tests, engines).

    ``prompts`` (N,) request ids (default: one prompt), ``tokens`` (N,) token texts or ids
    (default: the ids 0..N-1 as text), ``layers`` the layer numbers (default 1..L).
    """
    ex = np.asarray(experts, dtype=np.int16)
    if ex.ndim != 3:
        raise ValueError("experts must be (tokens, layers, k)")
    n = ex.shape[0]
    pr = np.asarray([str(p) for p in (prompts if prompts is not None else ["0"] * n)])
    toks = np.asarray([str(t) for t in (tokens if tokens is not None else range(n))],
                      dtype=object)
    change = np.ones(n, dtype=bool)
    change[1:] = pr[1:] != pr[:-1]
    seg = np.cumsum(change) - 1
    pos = np.arange(n) - np.flatnonzero(change)[seg]
    vocab: dict[str, int] = {}
    tids = np.asarray([vocab.setdefault(t, len(vocab)) for t in toks], dtype=np.int64)
    e = int(ex.max()) + 1 if num_experts is None else int(num_experts)
    return Trace(pr, pos, toks, tids, list(layers or range(1, ex.shape[1] + 1)), ex, e, vocab)


def _open_text(path: Path, mode: str) -> TextIO:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, mode + "b"), encoding="utf-8", newline="")
    return open(path, mode, encoding="utf-8", newline="")


def _sort_key(p: str) -> tuple[int, int | str]:
    # numeric request ids sort numerically (1001 < 1002 < 10010), others as text
    return (0, int(p)) if p.lstrip("-").isdigit() else (1, p)


def _rows_fast(text: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Columns of a CSV body whose prompt ids are unquoted and rows have equal expert counts.

    The csv module needs about 15 s for the 1.76M-row training trace; regexes and numpy's
    string parser do it in about 4 s. Only the token column can be quoted (a "," token),
    and it is only unquoted for the one row per token that is kept.
    """
    heads = re.findall(r"^([^,\n\"]*),(-?\d+),(\d+),", text, re.M)
    lines = text.split("\n")
    if lines and not lines[-1]:
        lines.pop()
    if len(heads) != len(lines):
        raise ValueError("not the simple layout")
    ex_strs = [ln.rpartition(",")[2] for ln in lines]
    k = len(ex_strs[0].split())
    ex = np.fromstring(" ".join(ex_strs), dtype=np.int64, sep=" ")  # type: ignore[call-overload]
    if k == 0 or ex.size != k * len(lines):
        raise ValueError("ragged expert lists")
    nums = np.fromstring(" ".join(f"{h[1]} {h[2]}" for h in heads), dtype=np.int64,
                         sep=" ").reshape(-1, 2)  # type: ignore[call-overload]
    return [h[0] for h in heads], nums[:, 0], nums[:, 1], ex.reshape(-1, k), lines


def _token_of_line(line: str) -> str:
    tok = line.split(",", 3)[3].rpartition(",")[0]
    if tok.startswith('"'):
        tok = next(csv.reader([tok]))[0]
    return tok


def load_trace(path: str | Path, num_experts: int | None = None,
               vocab: dict[str, int] | None = None) -> Trace:
    """Read a trace CSV (``.csv`` or ``.csv.gz``) into replay order.

    ``vocab`` maps token text to ids; pass the training trace's ``vocab`` when loading a
    held-out trace so token ids agree (unseen tokens get new ids appended to a copy).
    """
    path = Path(path)
    with _open_text(path, "r") as f:
        text = f.read().replace("\r\n", "\n")
    header, _, body = text.partition("\n")
    if tuple(h.strip() for h in header.split(",")) != COLUMNS:
        raise ValueError(f"{path}: expected header {','.join(COLUMNS)}, got {header!r}")
    if not body.strip():
        raise ValueError(f"{path}: no rows")
    try:
        prompts_col, layer_col, pos_col, ex, lines = _rows_fast(body)
        token_col: list[str] | None = None
    except ValueError:
        rows = [r for r in csv.reader(io.StringIO(body)) if r]
        if any(len(r) != len(COLUMNS) for r in rows):
            raise ValueError(f"{path}: every row needs {len(COLUMNS)} fields") from None
        prompts_col = [r[0] for r in rows]
        layer_col = np.asarray([int(r[1]) for r in rows], dtype=np.int64)
        pos_col = np.asarray([int(r[2]) for r in rows], dtype=np.int64)
        token_col = [r[3] for r in rows]
        ex_lists = [r[4].split() for r in rows]
        ex = np.full((len(rows), max(len(e) for e in ex_lists)), -1, dtype=np.int64)
        for i, e in enumerate(ex_lists):
            ex[i, : len(e)] = [int(x) for x in e]
        lines = []

    layers = sorted(set(layer_col.tolist()))
    layer_idx = np.searchsorted(np.asarray(layers), layer_col)
    # dense token index: one per distinct (prompt, pos), in replay order
    uniq_prompts, prompt_inv = np.unique(np.asarray(prompts_col), return_inverse=True)
    order = sorted(range(len(uniq_prompts)), key=lambda i: _sort_key(str(uniq_prompts[i])))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    key = rank[prompt_inv.reshape(-1)] * (int(pos_col.max()) + 1) + pos_col
    uniq_keys, tok_index = np.unique(key, return_inverse=True)
    tok_index = tok_index.reshape(-1)
    n, k = len(uniq_keys), ex.shape[1]
    experts = np.full((n, len(layers), k), -1, dtype=np.int16)
    experts[tok_index, layer_idx] = ex

    first_row = np.zeros(n, dtype=np.int64)
    first_row[tok_index[::-1]] = np.arange(len(tok_index))[::-1]  # first row of each token
    prompts = np.asarray([str(prompts_col[i]) for i in first_row])
    pos = pos_col[first_row]
    if token_col is not None:
        tokens = np.asarray([token_col[i] for i in first_row], dtype=object)
    else:
        tokens = np.asarray([_token_of_line(lines[i]) for i in first_row], dtype=object)

    vocab = dict(vocab) if vocab is not None else {}
    token_ids = np.empty(n, dtype=np.int64)
    for i, t in enumerate(tokens):
        tid = vocab.get(t)
        if tid is None:
            tid = vocab[t] = len(vocab)
        token_ids[i] = tid
    e = int(ex.max()) + 1 if num_experts is None else int(num_experts)
    if ex.max() >= e or ex.min() < -1:
        raise ValueError(f"{path}: expert ids must lie in 0..{e - 1}")
    return Trace(prompts, pos, tokens, token_ids, layers, experts, e, vocab)


def save_trace(trace: Trace, path: str | Path) -> None:
    """Write ``trace`` in the CSV format (gzip'd when the name ends in .gz)."""
    path = Path(path)
    with _open_text(path, "w") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(COLUMNS)
        for n in range(trace.num_tokens):
            for j, layer in enumerate(trace.layers):
                ids = [int(x) for x in trace.experts[n, j] if x >= 0]
                if ids:
                    w.writerow([trace.prompts[n], layer, int(trace.pos[n]), trace.tokens[n],
                                " ".join(map(str, ids))])


class TraceRecorder:
    """Collects routing decisions from a running model and writes them as a trace CSV.

    The model (or a hook around its MoE layers) calls :meth:`record` once per token and MoE
    layer, in any order; :meth:`save` writes the file, which ``sparsa cache-sim`` replays like
    the shared traces::

        rec = TraceRecorder()
        rec.record(request_id="0", position=5, token_id=1234, layer=3, experts=[7, 1])
        rec.record_batch("0", positions, token_ids, layer, topk_ids)   # (T,), (T,), (T, k)
        rec.save("run.csv.gz")

    ``token`` in the file is ``token_text(token_id)`` when a decoder is given (e.g.
    ``tokenizer.convert_ids_to_tokens``), else the id itself as text. Rows are buffered in
    memory (about 60 bytes each); call :meth:`save` then :meth:`clear` for long runs.
    """

    def __init__(self, token_text: Callable[[int], str] | None = None) -> None:
        self._token_text = token_text
        self._rows: list[tuple[str, int, int, str, str]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def _text(self, token_id: int) -> str:
        if self._token_text is None:
            return str(int(token_id))
        return str(self._token_text(int(token_id)))

    def record(self, request_id: str | int, position: int, token_id: int, layer: int,
               experts: Sequence[int]) -> None:
        """One token's routed experts at one MoE layer."""
        ids = " ".join(str(int(e)) for e in experts)
        self._rows.append((str(request_id), int(layer), int(position),
                           self._text(token_id), ids))

    def record_batch(self, request_id: str | int, positions: Sequence[int],
                     token_ids: Sequence[int], layer: int, experts: object) -> None:
        """Several tokens of one request at one layer (e.g. a prefill chunk); ``experts`` is
        any (T, k) array-like (a torch tensor works: it is converted with ``tolist``)."""
        rows = experts.tolist() if hasattr(experts, "tolist") else list(experts)  # type: ignore[union-attr]
        for p, t, e in zip(positions, token_ids, rows):
            self.record(request_id, int(p), int(t), layer, e)

    def clear(self) -> None:
        self._rows.clear()

    def save(self, path: str | Path) -> None:
        path = Path(path)
        with _open_text(path, "w") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(COLUMNS)
            w.writerows(self._rows)
