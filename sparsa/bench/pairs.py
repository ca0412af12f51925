"""tgN as alternating single runs: Sparsa, then each peer once, then Sparsa again, ...

The memory bandwidth of a shared box drifts over minutes, so an engine measured in one
block and its peer in the next can differ by the drift alone. Here each round runs one tgN
of every engine back to back, and the comparison is the median of the per-round ratios
(with its min-max), which cancels a drift slower than one round. The read-bandwidth probe
runs before the first round, between rounds and after the last.

When both engines' weights cannot be in RAM at once, `sequential_tg` is the fallback: all of
Sparsa's runs, then (its model freed) each peer's; its ratio is of medians, and the result
says so.
"""

from __future__ import annotations

from collections.abc import Callable

from sparsa.bench.env import spread

TgRun = Callable[[], float]  # one tgN run, returns tok/s


def alternate_tg(sparsa: TgRun, peers: dict[str, TgRun], rounds: int,
                 probe: Callable[[str], object] | None = None) -> dict:
    """`rounds` rounds of one `sparsa()` run followed by one run of each peer, in order.
    `probe(label)` (the read-bandwidth probe) runs before the first round, between rounds and
    after the last. Returns {"mode": "alternating", "order": [engine per run, in run order],
    "runs": {engine: [tok/s per round]}} plus `summarize`'s fields."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    order: list[str] = []
    runs: dict[str, list[float]] = {"sparsa": [], **{p: [] for p in peers}}
    if probe is not None:
        probe("before")
    for i in range(rounds):
        runs["sparsa"].append(sparsa())
        order.append("sparsa")
        for name, run in peers.items():
            runs[name].append(run())
            order.append(name)
        if probe is not None:
            probe("after" if i == rounds - 1 else f"after round {i + 1}")
    return {"mode": "alternating", "order": order, "runs": runs, **summarize(runs)}


def sequential_tg(sparsa: TgRun, free_sparsa: Callable[[], None], peers: dict[str, TgRun],
                  runs_each: int, probe: Callable[[str], object] | None = None) -> dict:
    """`runs_each` runs of Sparsa, then `free_sparsa()`, then `runs_each` runs of each peer,
    probing before, between the engines and after. Ratios are of medians (no pairs)."""
    if runs_each < 1:
        raise ValueError(f"runs_each must be >= 1, got {runs_each}")
    order: list[str] = []
    runs: dict[str, list[float]] = {"sparsa": [], **{p: [] for p in peers}}
    if probe is not None:
        probe("before")
    for name, run in [("sparsa", sparsa), *peers.items()]:
        for _ in range(runs_each):
            runs[name].append(run())
            order.append(name)
        if name == "sparsa":
            free_sparsa()
        if probe is not None:
            probe(f"after {name}")
    return {"mode": "sequential", "order": order, "runs": runs,
            **summarize(runs, paired=False)}


def summarize(runs: dict[str, list[float]], paired: bool = True) -> dict:
    """{"tok_s": {engine: spread}, "ratio": {peer: spread of sparsa/peer}}. Paired: the
    per-round ratios sparsa[i] / peer[i] (their median is the reported ratio); unpaired: the
    one ratio of the medians."""
    tok_s = {e: spread(v) for e, v in runs.items() if v}
    ratio = {}
    s = runs["sparsa"]
    for peer, v in runs.items():
        if peer == "sparsa" or not v:
            continue
        if paired:
            if len(v) != len(s):
                raise ValueError(f"{peer}: {len(v)} runs against Sparsa's {len(s)}")
            ratio[peer] = spread([a / b for a, b in zip(s, v)])
        else:
            m = tok_s["sparsa"]["median"] / tok_s[peer]["median"]
            ratio[peer] = {"median": m, "min": m, "max": m, "n": 1}
    return {"tok_s": tok_s, "ratio": ratio}
