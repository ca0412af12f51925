"""Token trees: the shape checks and walks (pure Python), n-gram trees, and tree attention
in the decode kernels (native and SDPA) against a dense reference, bit-identical to plain
decoding once the accepted path's K/V sit in consecutive slots."""

from __future__ import annotations

import pytest
import torch

from sparsa import kernels
from sparsa.config.speculative import SpeculativeConfig
from sparsa.kernels import ops
from sparsa.layers import attention
from sparsa.layers.attention import AttentionMetadata, KVCache, paged_attention
from sparsa.spec import tree
from sparsa.spec.ngram import lookup_tree

needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason=f"native kernels: {kernels.unavailable_reason()}")

SHAPE = [(0,), (1,), (0, 0), (1, 0), (0, 1), (0, 0, 0)]


def test_shape_helpers():
    parents = tree.shape_parents(SHAPE)
    assert parents == [-1, -1, 0, 1, 0, 2]
    assert tree.depths(parents) == [1, 1, 2, 2, 2, 3]
    assert tree.visible_bits(parents) == [0b1, 0b10, 0b101, 0b1010, 0b10001, 0b100101]
    assert tree.path_to(parents, 5) == [0, 2, 5]
    assert tree.path_to(parents, -1) == []
    assert not tree.is_chain(parents) and tree.is_chain([-1, 0, 1])


@pytest.mark.parametrize("bad", [[[0, 0]], [[0], [0]], [[]], [[-1]], [[True]], [["a"]],
                                 [[0]] * 0, [[i] for i in range(64)]])
def test_shape_errors(bad):
    with pytest.raises(ValueError, match="token_tree"):
        tree.check_tree_shape(bad)


def test_walk_follows_the_targets_tokens():
    toks = [10, 11, 12, 13, 14, 15]
    parents = tree.shape_parents(SHAPE)
    # row 0 after the root, row 1 + i after node i
    assert tree.walk(toks, parents, [11, 0, 13, 0, 99, 0, 0]) == [1, 3]
    assert tree.walk(toks, parents, [10, 12, 0, 15, 0, 0, 0]) == [0, 2, 5]
    assert tree.walk(toks, parents, [10, 14, 0, 0, 0, 0, 0]) == [0, 4]
    assert tree.walk(toks, parents, [99] * 7) == []


def test_prune_keeps_parents_and_drops_repeated_siblings():
    toks, parents = [5, 5, 6, 7, 8], [-1, -1, 0, 1, 2]
    assert tree.prune(toks, parents, 10) == ([5, 6, 8], [-1, 0, 1])
    assert tree.prune([1, 2, 3], [-1, -1, 0], 2) == ([1, 2], [-1, -1])


def test_ngram_tree_branches_on_different_continuations():
    # "7 8" was followed by 1 2 (latest) and by 3 4 (earlier), and now ends the text
    toks = [7, 8, 3, 4, 0, 7, 8, 1, 2, 0, 7, 8]
    got, parents = lookup_tree(toks, SHAPE, 2, 3)
    # the longest match first ("0 7 8", continued by 1 2 0), then "7 8" (3 4 0); the
    # shape has no (1, 0, 0), so the second branch stops at depth 2
    assert got == [1, 3, 2, 4, 0] and parents == [-1, -1, 0, 1, 2]
    assert lookup_tree([1, 2, 3], SHAPE, 2, 3) == ([], [])


def test_config_takes_a_tree():
    c = SpeculativeConfig(method="ngram", token_tree=[list(p) for p in SHAPE])
    assert c.num_speculative_tokens == len(SHAPE)
    assert SpeculativeConfig(method="ngram", token_tree=[[0], [1]],
                             num_speculative_tokens=1).num_speculative_tokens == 1
    for bad in (dict(method="self", token_tree=[[0]]),
                dict(method="ngram", token_tree=[[0]], num_speculative_tokens=2),
                dict(method="ngram", token_tree="0")):
        with pytest.raises(ValueError, match="token_tree"):
            SpeculativeConfig(**bad)


def _tree_case(window=None, seed=0):
    """One sequence of 21 cached tokens (the last at slot 20 is the root) plus the SHAPE
    tree's nodes in slots 21.., and one plain sequence beside it."""
    g = torch.Generator().manual_seed(seed)
    bs, hq, hkv, d, nb = 4, 4, 2, 16, 24
    kc, vc = torch.randn(nb, bs, hkv, d, generator=g), torch.randn(nb, bs, hkv, d, generator=g)
    parents = tree.shape_parents(SHAPE)
    n = len(SHAPE)
    root = 20
    table = list(range(nb // 2))
    other = list(range(nb // 2, nb))
    rows = 1 + n + 1
    q = torch.randn(rows, hq, d, generator=g)
    tables = torch.tensor([table] * (1 + n) + [other], dtype=torch.long)
    lens = torch.tensor([root + 1 + j for j in range(1 + n)] + [9], dtype=torch.long)
    tr = torch.tensor([(1 << 62, 0)] + [(root + 1, b) for b in tree.visible_bits(parents)]
                      + [(1 << 62, 0)], dtype=torch.long)
    return dict(q=q, kc=kc, vc=vc, tables=tables, lens=lens, tree=tr, bs=bs, root=root,
                parents=parents, window=window)


def _dense(c):
    """Each row over exactly the positions it may see, in float64."""
    q, kc, vc, bs = c["q"], c["kc"], c["vc"], c["bs"]
    hq, hkv = q.shape[1], kc.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    for s in range(q.shape[0]):
        n, (start, bits) = int(c["lens"][s]), c["tree"][s].tolist()
        pos = [p for p in range(n) if p < start or (bits >> (p - start)) & 1]
        if c["window"]:
            pos = pos[-c["window"]:]
        slots = torch.tensor([c["tables"][s][p // bs] * bs + p % bs for p in pos])
        k = kc.reshape(-1, hkv, kc.shape[-1])[slots].double()
        v = vc.reshape(-1, hkv, vc.shape[-1])[slots].double()
        for h in range(hq):
            sc = k[:, h // (hq // hkv)] @ q[s, h].double() / 4
            out[s, h] = torch.softmax(sc, 0) @ v[:, h // (hq // hkv)]
    return out


def _meta(c):
    return AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long),
                             num_decodes=c["q"].shape[0], decode_block_tables=c["tables"],
                             decode_context_lens=c["lens"],
                             decode_max_len=int(c["lens"].max()), decode_tree=c["tree"])


@needs_kernels
@pytest.mark.parametrize("window", [None, 12])
def test_native_tree_attention_matches_dense(window):
    c = _tree_case(window)
    got = ops.paged_decode_attention(c["q"], c["kc"], c["vc"], c["tables"], c["lens"], 0.25,
                                     window, c["tree"])
    torch.testing.assert_close(got.double(), _dense(c), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 12])
def test_sdpa_tree_attention_matches_dense(window, monkeypatch):
    monkeypatch.setattr(attention, "native_decode", lambda *a: False)
    c = _tree_case(window)
    meta = _meta(c)
    empty = torch.zeros(0, *c["kc"].shape[2:])
    meta.slot_mapping = torch.zeros(0, dtype=torch.long)
    qs = c["q"]
    got = paged_attention(qs, empty, empty, KVCache(c["kc"], c["vc"]), meta, 0.25, window)
    torch.testing.assert_close(got.double(), _dense(c), atol=1e-5, rtol=1e-5)


@needs_kernels
def test_accepted_path_attends_bit_identically_after_moving():
    """A node on the path [0, 2, 5] gives, in the tree pass, exactly what a plain decode
    row gives once the path's K/V are moved to consecutive slots."""
    c = _tree_case()
    got = ops.paged_decode_attention(c["q"], c["kc"], c["vc"], c["tables"], c["lens"], 0.25,
                                     None, c["tree"])
    path, root, bs = [0, 2, 5], c["root"], c["bs"]
    kc, vc = c["kc"].clone(), c["vc"].clone()
    table = c["tables"][0]
    for d, n in enumerate(path):
        src, dst = root + 1 + n, root + 1 + d
        for pool in (kc, vc):
            pool[table[dst // bs], dst % bs] = pool[table[src // bs], src % bs]
    for d, n in enumerate(path):
        row = 1 + n
        plain = ops.paged_decode_attention(c["q"][row:row + 1], kc, vc, c["tables"][:1],
                                           torch.tensor([root + 2 + d]), 0.25, None)
        assert torch.equal(plain[0], got[row])
