"""Token trees (SpecInfer, Medusa): several candidates per future position, verified in
one target pass. A tree is its nodes' tokens and parents in topological order (a parent
before its children; parent -1 is the sequence's last token, the root). Pure Python: the
model runner turns a tree into positions and attention bits, the engine walks it."""

from __future__ import annotations

from collections.abc import Sequence as Seq

# the attention kernels mark a node's visible tree positions in one 64-bit word
MAX_TREE_NODES = 64


def check_tree_shape(paths: Seq[Seq[int]]) -> list[tuple[int, ...]]:
    """A tree shape as Medusa's "choices" and vLLM's speculative_token_tree give it: each
    node is the path of candidate ranks leading to it ((0,) the best first token, (0, 1) the
    second-best token after it). Every path's parent must come before it."""
    seen: set[tuple[int, ...]] = {()}
    out = []
    for p in paths:
        if (not isinstance(p, (list, tuple)) or not p
                or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in p)):
            raise ValueError(f"token_tree: each node is a non-empty list of ranks >= 0; got {p!r}")
        t = tuple(p)
        if t in seen:
            raise ValueError(f"token_tree: node {list(t)} is listed twice")
        if t[:-1] not in seen:
            raise ValueError(f"token_tree: node {list(t)} comes before its parent "
                             f"{list(t[:-1])}")
        seen.add(t)
        out.append(t)
    if not out:
        raise ValueError("token_tree: no nodes")
    if len(out) > MAX_TREE_NODES - 1:
        raise ValueError(f"token_tree: at most {MAX_TREE_NODES - 1} nodes; got {len(out)}")
    return out


def shape_parents(paths: Seq[tuple[int, ...]]) -> list[int]:
    """Parent index of each node of a checked shape (-1: the root)."""
    index = {p: i for i, p in enumerate(paths)}
    return [index[p[:-1]] if len(p) > 1 else -1 for p in paths]


def depths(parents: Seq[int]) -> list[int]:
    """Depth of each node (1: a child of the root)."""
    d: list[int] = []
    for p in parents:
        d.append(1 if p < 0 else d[p] + 1)
    return d


def visible_bits(parents: Seq[int]) -> list[int]:
    """For each node, the bits of the nodes it attends to: its ancestors and itself."""
    bits: list[int] = []
    for i, p in enumerate(parents):
        bits.append((bits[p] if p >= 0 else 0) | (1 << i))
    return bits


def path_to(parents: Seq[int], node: int) -> list[int]:
    """The nodes from the root's child down to `node` (empty for the root, -1)."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def walk(tokens: Seq[int], parents: Seq[int], sampled: Seq[int]) -> list[int]:
    """The accepted path: `sampled[0]` is the target's token after the root, `sampled[1 + i]`
    after node i. From the root, step to the child whose token equals the target's, while
    there is one (the first such child: a well-formed tree has no repeated siblings)."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        children.setdefault(p, []).append(i)
    path: list[int] = []
    node = -1
    while True:
        want = sampled[node + 1]
        nxt = next((c for c in children.get(node, ()) if tokens[c] == want), None)
        if nxt is None:
            return path
        path.append(nxt)
        node = nxt


def prune(tokens: list[int], parents: list[int], limit: int) -> tuple[list[int], list[int]]:
    """The first `limit` nodes (a topological order keeps every kept node's parent), with
    repeated siblings dropped (and their subtrees)."""
    keep: dict[int, int] = {}
    out_t: list[int] = []
    out_p: list[int] = []
    seen: set[tuple[int, int]] = set()
    for i, (t, p) in enumerate(zip(tokens, parents)):
        if len(out_t) >= limit:
            break
        if p >= 0 and p not in keep:
            continue
        np = keep[p] if p >= 0 else -1
        if (np, t) in seen:
            continue
        seen.add((np, t))
        keep[i] = len(out_t)
        out_t.append(t)
        out_p.append(np)
    return out_t, out_p


def is_chain(parents: Seq[int]) -> bool:
    return all(p == i - 1 for i, p in enumerate(parents))
