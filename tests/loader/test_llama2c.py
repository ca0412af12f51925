"""llama2.c import: checkpoint parsing, tokenizer equivalence, and end-to-end quality via HF."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsa.loader.llama2c import (
    convert_llama2c_to_hf,
    find_llama2c_tokenizer,
    is_llama2c_checkpoint,
    read_llama2c_checkpoint,
    read_llama2c_tokenizer,
    resolve_llama2c,
)

_REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("SPARSA_SHARED", _REPO / ".." / "shared"))
STORIES_BIN = SHARED / "models" / "stories260K" / "stories260K.bin"
TOK512 = SHARED / "models" / "stories260K" / "tok512.bin"
XS_BIN = SHARED / "models" / "llama2xs" / "model.bin"
REF_TOKENIZER = SHARED / "models" / "tinymoe-stories" / "tokenizer.json"
CORPUS = SHARED / "corpora" / "tinystories_val.txt"

# Quoted in shared/README.md: stories260K's greedy continuation of BOS.
GOLDEN = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park"
)

pytestmark = pytest.mark.skipif(
    not all(p.is_file() for p in (STORIES_BIN, TOK512, XS_BIN, REF_TOKENIZER, CORPUS)),
    reason=f"shared llama2.c models/corpora not found under {SHARED} (set SPARSA_SHARED)",
)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Never write the user's ~/.cache from tests.
    return tmp_path_factory.mktemp("sparsa-cache")


@pytest.fixture(scope="module")
def stories_dir(cache_root: Path) -> Path:
    return resolve_llama2c(STORIES_BIN, cache_dir=cache_root)


@pytest.fixture(scope="module")
def stories_model(stories_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    return model.eval()


def _blocks() -> list[str]:
    text = CORPUS.read_text(encoding="utf-8")
    return [b.strip() for b in text.split("\n\n") if b.strip()]


def _greedy(model, n: int) -> list[int]:
    ids = torch.tensor([[1]])
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None
        )
    return out[0].tolist()


# ----------------------------------------------------------------------------- checkpoint


def test_header_and_tensor_names() -> None:
    config, sd = read_llama2c_checkpoint(STORIES_BIN)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (
        config["hidden_size"],
        config["intermediate_size"],
        config["num_hidden_layers"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["vocab_size"],
        config["max_position_embeddings"],
    ) == (64, 172, 5, 8, 4, 512, 512)
    assert config["tie_word_embeddings"] is True
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert sd["model.layers.4.self_attn.k_proj.weight"].shape == (32, 64)
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (64, 172)
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]
    assert all(t.dtype == torch.float32 for t in sd.values())
    assert is_llama2c_checkpoint(STORIES_BIN)
    assert not is_llama2c_checkpoint(TOK512)
    assert not is_llama2c_checkpoint(REF_TOKENIZER)


def _reference_llama2c_logits(path: Path, tokens: list[int]) -> torch.Tensor:
    """Independent transcription of run.c's forward pass (interleaved-pair RoPE, raw layout)."""
    raw = np.fromfile(path, dtype="<i4", count=7)
    dim, hidden, n_layers, n_heads, n_kv, vocab, _seq = (int(x) for x in raw)
    w = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=28))
    head, kv_dim = dim // n_heads, n_kv * (dim // n_heads)
    pos = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal pos
        n = math.prod(shape)
        t = w[pos : pos + n].reshape(shape)
        pos += n
        return t

    emb = take(abs(vocab), dim)
    rms_att = take(n_layers, dim)
    wq, wk = take(n_layers, dim, dim), take(n_layers, kv_dim, dim)
    wv, wo = take(n_layers, kv_dim, dim), take(n_layers, dim, dim)
    rms_ffn = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    rms_final = take(dim)

    def rmsnorm(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g

    def rope(x: torch.Tensor) -> torch.Tensor:  # x: (T, heads, head)
        t = torch.arange(x.shape[0], dtype=torch.float32)[:, None]
        freq = 10000.0 ** (-torch.arange(0, head, 2, dtype=torch.float32) / head)
        ang = t * freq  # (T, head/2)
        cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)

    n = len(tokens)
    x = emb[torch.tensor(tokens)]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for layer in range(n_layers):
        h = rmsnorm(x, rms_att[layer])
        q = rope((h @ wq[layer].T).view(n, n_heads, head))
        k = rope((h @ wk[layer].T).view(n, n_kv, head))
        v = (h @ wv[layer].T).view(n, n_kv, head)
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head) + mask
        o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(n, dim)
        x = x + o @ wo[layer].T
        h = rmsnorm(x, rms_ffn[layer])
        x = x + (torch.nn.functional.silu(h @ w1[layer].T) * (h @ w3[layer].T)) @ w2[layer].T
    return rmsnorm(x, rms_final) @ emb.T


def test_hf_forward_matches_llama2c_reference(stories_model) -> None:
    # Catches a wrong q/k row permutation directly, not only through text quality.
    tokens = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]
    ref = _reference_llama2c_logits(STORIES_BIN, tokens)
    with torch.no_grad():
        got = stories_model(torch.tensor([tokens])).logits[0]
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


def test_converted_directory_contents(stories_dir: Path) -> None:
    from safetensors import safe_open

    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (stories_dir / name).is_file(), name
    config = json.loads((stories_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["rope_theta"] == 10000.0
    gen = json.loads((stories_dir / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 1 and 2 in gen["eos_token_id"]
    tok_cfg = json.loads((stories_dir / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["unk_token"]) == (
        "<s>",
        "</s>",
        "<unk>",
    )
    assert tok_cfg["add_bos_token"] is True
    with safe_open(str(stories_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # Tied classifier: HF re-ties lm_head on load, so it is not stored twice.
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert len(keys) == 2 + 9 * 5


def test_resolve_reuses_cache(stories_dir: Path, cache_root: Path) -> None:
    stamp = (stories_dir / "model.safetensors").stat().st_mtime_ns
    again = resolve_llama2c(STORIES_BIN, cache_dir=cache_root)
    assert again == stories_dir
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert stories_dir.name.startswith("stories260K-stories260K-")
    # No half-written temporary directories are left behind.
    assert sorted(p.name for p in stories_dir.parent.iterdir() if p.name.startswith(".")) == []


def test_resolve_uses_sparsa_cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSA_CACHE", str(tmp_path))
    out = resolve_llama2c(STORIES_BIN, tokenizer=TOK512)
    assert out.parent == tmp_path / "llama2c"


# ----------------------------------------------------------------------------- model quality


def test_golden_greedy_generation(stories_dir: Path, stories_model) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_dir)
    ids = _greedy(stories_model, 40)
    text = tok.decode(ids, skip_special_tokens=True)
    assert text.startswith(GOLDEN), text


def test_perplexity_first_tenth(stories_dir: Path, stories_model) -> None:
    # Same method as shared/README.md's 4.2: each blank-line block scored on its own as
    # BOS + tokens, every token after BOS predicted; here on the first ~2000 tokens.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_dir)
    blocks = _blocks()
    nll, count = 0.0, 0
    with torch.no_grad():
        for block in blocks[: len(blocks) // 10]:
            ids = torch.tensor([tok(block).input_ids])
            assert ids[0, 0].item() == 1
            logits = stories_model(ids).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
            if count >= 2000:
                break
    ppl = math.exp(nll / count)
    print(f"stories260K perplexity {ppl:.3f} over {count} tokens")
    assert count >= 2000
    assert 3.5 <= ppl <= 5.0, ppl


def test_llama2xs_converts_and_generates(cache_root: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, _ = read_llama2c_checkpoint(XS_BIN)
    assert (config["hidden_size"], config["intermediate_size"]) == (64, 192)
    assert config["max_position_embeddings"] == 256
    # It ships without a tokenizer; the sibling stories260K/tok512.bin is the right one.
    assert find_llama2c_tokenizer(XS_BIN, 512).resolve() == TOK512.resolve()
    out = resolve_llama2c(XS_BIN, cache_dir=cache_root)
    assert out.name.startswith("llama2xs-model-")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = _greedy(model, 40)
    text = tok.decode(ids, skip_special_tokens=True)
    words = text.replace(".", " ").replace(",", " ").split()
    assert text.startswith("Once upon a time"), text
    assert len(words) >= 20 and all(w.isalpha() for w in words), text
    assert not any(0 <= i < 259 and i != 1 for i in ids[1:]), ids  # no byte-fallback garbage


# ----------------------------------------------------------------------------- tokenizer


def _sample_lines() -> list[str]:
    lines = [ln for ln in CORPUS.read_text(encoding="utf-8").splitlines() if ln.strip()]
    # The head of the file plus an even spread that reaches the mis-encoded tail.
    return lines[:200] + lines[200 :: max(1, len(lines) // 150)]


def test_tokenizer_matches_reference_tokenizer_json() -> None:
    from tokenizers import Tokenizer

    mine = read_llama2c_tokenizer(TOK512, 512)
    ref = Tokenizer.from_file(str(REF_TOKENIZER))
    assert mine.get_vocab() == ref.get_vocab()
    lines = _sample_lines()
    assert len(lines) >= 300
    extra = ["", " ", "  two  spaces", "tab\tand\nnewline", "caf\u00e9 \u4e2d\u6587 \U0001f600"]
    for text in lines + extra:
        a, b = mine.encode(text).ids, ref.encode(text).ids
        assert a == b, text
        assert a[0] == 1
        assert mine.decode(a) == text == ref.decode(b)


def test_saved_tokenizer_round_trip(stories_dir: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_dir)
    ref = Tokenizer.from_file(str(REF_TOKENIZER))
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    for text in _sample_lines()[:300]:
        ids = tok(text).input_ids
        assert ids == ref.encode(text).ids
        assert ids[0] == 1
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("hi", add_special_tokens=False).input_ids[0] != 1


def test_tokenizer_vocab_size_mismatch() -> None:
    with pytest.raises(ValueError, match="512 tokens but the model expects 32000"):
        read_llama2c_tokenizer(TOK512, 32000)


# ----------------------------------------------------------------------------- bad files


def test_truncated_checkpoint_raises(tmp_path: Path) -> None:
    bad = tmp_path / "truncated.bin"
    data = STORIES_BIN.read_bytes()
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"file size .* does not match.*truncated"):
        read_llama2c_checkpoint(bad)
    assert not is_llama2c_checkpoint(bad)
    with pytest.raises(ValueError, match="truncated"):
        convert_llama2c_to_hf(bad, TOK512, tmp_path / "out")

    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(data[:10])
    with pytest.raises(ValueError, match="too small"):
        read_llama2c_checkpoint(tiny)


def test_padded_and_garbage_headers_raise(tmp_path: Path) -> None:
    data = STORIES_BIN.read_bytes()
    padded = tmp_path / "padded.bin"
    padded.write_bytes(data + b"\0" * 8)
    with pytest.raises(ValueError, match="trailing data"):
        read_llama2c_checkpoint(padded)

    garbage = tmp_path / "garbage.bin"
    header = np.array([64, 172, 5, 7, 4, 512, 512], dtype="<i4").tobytes()  # 64 % 7 != 0
    garbage.write_bytes(header + data[28:])
    with pytest.raises(ValueError, match="nonsensical header"):
        read_llama2c_checkpoint(garbage)

    negative = tmp_path / "negative.bin"
    negative.write_bytes(np.array([-1, 0, 0, 0, 0, 0, 0], dtype="<i4").tobytes() + data[28:])
    with pytest.raises(ValueError, match="nonsensical header"):
        read_llama2c_checkpoint(negative)


def test_missing_tokenizer_is_reported(tmp_path: Path) -> None:
    lone = tmp_path / "alone" / "model.bin"
    lone.parent.mkdir()
    shutil.copyfile(STORIES_BIN, lone)
    with pytest.raises(FileNotFoundError, match="pass the tokenizer path explicitly"):
        resolve_llama2c(lone, cache_dir=tmp_path / "cache")
    out = resolve_llama2c(lone, tokenizer=TOK512, cache_dir=tmp_path / "cache")
    assert (out / "tokenizer.json").is_file()
