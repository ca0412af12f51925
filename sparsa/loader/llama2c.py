"""Import llama2.c checkpoints by converting them to a Hugging Face Llama directory.

llama2.c's legacy "v0" export is a raw fp32 dump with a 7-int header and no tensor names, and its
tokenizer is a flat list of (score, bytes) pairs. Rather than teach every part of the engine about
that format, we convert once into a standard HF directory (config.json, model.safetensors,
tokenizer.json, ...) and let the regular HF loading path handle the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

__all__ = [
    "convert_llama2c_to_hf",
    "find_llama2c_tokenizer",
    "is_llama2c_checkpoint",
    "read_llama2c_checkpoint",
    "read_llama2c_tokenizer",
    "resolve_llama2c",
]

_HEADER = struct.Struct("<7i")
# llama2.c's versioned exports (v1 fp32, v2 int8) start with this magic instead of the v0 header.
_VERSIONED_MAGIC = 0x616B3432
# Bumping this invalidates previously converted cache directories (e.g. after a converter fix).
_CONVERTER_VERSION = 1
# Generous bounds that only exist to reject garbage headers before we compute absurd sizes.
_MAX_DIM = 1 << 16
_MAX_LAYERS = 1 << 10
_MAX_VOCAB = 1 << 22
_MAX_SEQ = 1 << 22

_SPACE = "\u2581"  # sentencepiece's visible space
_UNK, _BOS, _EOS = "<unk>", "<s>", "</s>"
_N_SPECIAL = 3
_N_BYTES = 256


# --------------------------------------------------------------------------------------------
# checkpoint
# --------------------------------------------------------------------------------------------


def _read_header(path: Path) -> tuple[int, int, int, int, int, int, int]:
    size = path.stat().st_size
    if size < _HEADER.size:
        raise ValueError(
            f"{path}: {size} bytes is too small for a llama2.c checkpoint "
            f"(header alone is {_HEADER.size} bytes)"
        )
    with path.open("rb") as f:
        fields = _HEADER.unpack(f.read(_HEADER.size))
    if fields[0] == _VERSIONED_MAGIC:
        raise ValueError(
            f"{path}: this is a versioned llama2.c export (magic 'ak42', version {fields[1]}); "
            "only the legacy v0 fp32 format is supported (export with --version 0)"
        )
    return fields  # type: ignore[return-value]


def _layout(
    dim: int, hidden: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab: int, seq_len: int
) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of a v0 file, in file order, with their row-major shapes."""
    head = dim // n_heads
    kv_dim = n_kv_heads * head
    shared = vocab > 0
    vocab = abs(vocab)
    out: list[tuple[str, tuple[int, ...]]] = [
        ("token_embedding_table", (vocab, dim)),
        ("rms_att_weight", (n_layers, dim)),
        # llama2.c writes nn.Linear weights as they are, i.e. (out_features, in_features).
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("rms_ffn_weight", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("rms_final_weight", (dim,)),
        ("freq_cis_real", (seq_len, head // 2)),
        ("freq_cis_imag", (seq_len, head // 2)),
    ]
    if not shared:
        out.append(("wcls", (vocab, dim)))
    return out


def _validate_header(path: Path, fields: tuple[int, ...]) -> None:
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = fields
    problems = []
    if not 0 < dim <= _MAX_DIM:
        problems.append(f"dim={dim}")
    if not 0 < hidden <= 64 * _MAX_DIM:
        problems.append(f"hidden_dim={hidden}")
    if not 0 < n_layers <= _MAX_LAYERS:
        problems.append(f"n_layers={n_layers}")
    if not 0 < n_heads <= dim:
        problems.append(f"n_heads={n_heads}")
    elif dim % n_heads or (dim // n_heads) % 2:
        problems.append(f"dim={dim} not divisible into {n_heads} heads of even size")
    if not 0 < n_kv_heads <= max(n_heads, 0):
        problems.append(f"n_kv_heads={n_kv_heads}")
    elif n_heads % n_kv_heads:
        problems.append(f"n_heads={n_heads} not a multiple of n_kv_heads={n_kv_heads}")
    if not 0 < abs(vocab) <= _MAX_VOCAB:
        problems.append(f"vocab_size={vocab}")
    if not 0 < seq_len <= _MAX_SEQ:
        problems.append(f"seq_len={seq_len}")
    if problems:
        raise ValueError(
            f"{path}: not a llama2.c v0 checkpoint, nonsensical header ({', '.join(problems)})"
        )


def _checked_layout(path: Path) -> tuple[tuple[int, ...], list[tuple[str, tuple[int, ...]]]]:
    fields = _read_header(path)
    _validate_header(path, fields)
    layout = _layout(*fields)
    expected = _HEADER.size + 4 * sum(int(np.prod(shape)) for _, shape in layout)
    actual = path.stat().st_size
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing data"
        raise ValueError(
            f"{path}: file size {actual} does not match the {expected} bytes implied by its header "
            f"(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = {fields}); "
            f"the file is {what} or corrupt"
        )
    return fields, layout


def is_llama2c_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a file whose header and size are those of a llama2.c v0 checkpoint."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        _checked_layout(p)
    except (ValueError, OSError):
        return False
    return True


def _meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from interleaved-pair RoPE to HF's rotate_half layout.

    llama2.c (like Meta's reference) rotates adjacent pairs (2i, 2i+1) of each head; HF Llama
    rotates (i, i + head/2). Permuting the output rows once makes the two formulations agree
    without touching the attention code.
    """
    out_features, in_features = w.shape
    head = out_features // n_heads
    return (
        w.reshape(n_heads, head // 2, 2, in_features)
        .transpose(1, 2)
        .reshape(out_features, in_features)
        .contiguous()
    )


def read_llama2c_checkpoint(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a llama2.c v0 fp32 checkpoint.

    Returns an HF ``LlamaConfig``-style dict and a state dict with HF Llama tensor names.
    ``lm_head.weight`` is always present; when the classifier is shared it is the same tensor as
    ``model.embed_tokens.weight`` (and ``tie_word_embeddings`` is true).
    Raises ``ValueError`` for files that are truncated, padded or have a nonsensical header.
    """
    p = Path(path)
    fields, layout = _checked_layout(p)
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = fields
    shared = vocab > 0
    vocab = abs(vocab)

    flat = np.memmap(p, dtype="<f4", mode="r", offset=_HEADER.size)
    raw: dict[str, torch.Tensor] = {}
    pos = 0
    for name, shape in layout:
        n = int(np.prod(shape))
        # Copy out of the memmap: the tensors outlive the mapping and must be writable.
        raw[name] = torch.from_numpy(np.array(flat[pos : pos + n]).reshape(shape))
        pos += n
    del flat

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": raw["token_embedding_table"]}
    for i in range(n_layers):
        pre = f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"] = raw["rms_att_weight"][i].clone()
        sd[pre + "self_attn.q_proj.weight"] = _meta_to_hf_rows(raw["wq"][i], n_heads)
        sd[pre + "self_attn.k_proj.weight"] = _meta_to_hf_rows(raw["wk"][i], n_kv_heads)
        sd[pre + "self_attn.v_proj.weight"] = raw["wv"][i].clone()
        sd[pre + "self_attn.o_proj.weight"] = raw["wo"][i].clone()
        sd[pre + "post_attention_layernorm.weight"] = raw["rms_ffn_weight"][i].clone()
        sd[pre + "mlp.gate_proj.weight"] = raw["w1"][i].clone()
        sd[pre + "mlp.down_proj.weight"] = raw["w2"][i].clone()
        sd[pre + "mlp.up_proj.weight"] = raw["w3"][i].clone()
    sd["model.norm.weight"] = raw["rms_final_weight"]
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] if shared else raw["wcls"]

    # run.c ignores the stored freq_cis tables and hardcodes theta=10000, so that is the
    # behaviour the checkpoints were validated against.
    rope_theta = 10000.0
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": dim // n_heads,
        "vocab_size": vocab,
        "max_position_embeddings": seq_len,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": shared,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    return config, sd


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


def _read_llama2c_vocab(tok_path: Path, vocab_size: int) -> list[tuple[float, bytes]]:
    data = tok_path.read_bytes()
    if len(data) < 4:
        raise ValueError(f"{tok_path}: too small for a llama2.c tokenizer file")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if max_len <= 0:
        raise ValueError(f"{tok_path}: invalid max_token_length {max_len}")
    entries: list[tuple[float, bytes]] = []
    off = 4
    while off < len(data):
        if off + 8 > len(data):
            raise ValueError(f"{tok_path}: truncated entry header for token {len(entries)}")
        score, n = struct.unpack_from("<fi", data, off)
        off += 8
        if n < 0 or n > max_len or off + n > len(data):
            raise ValueError(f"{tok_path}: corrupt length {n} for token {len(entries)}")
        entries.append((score, data[off : off + n]))
        off += n
    if len(entries) != vocab_size:
        raise ValueError(
            f"{tok_path}: tokenizer has {len(entries)} tokens but the model expects {vocab_size}"
        )
    return entries


def _piece(i: int, raw: bytes) -> str:
    if i < _N_SPECIAL:
        # llama2.c's exporter writes BOS/EOS as "\n<s>\n" / "\n</s>\n" for pretty printing.
        return raw.decode("utf-8").strip()
    # The exporter also turned '▁' back into ' '; HF/sentencepiece vocabularies keep '▁'.
    return raw.decode("utf-8").replace(" ", _SPACE)


def _bpe_merges(pieces: list[str], scores: list[float], first_normal: int) -> list[tuple[str, str]]:
    """Merges that reproduce sentencepiece BPE: pair ranks follow the merged piece's score.

    sentencepiece repeatedly merges the adjacent pair whose concatenation has the highest score;
    HF BPE merges the pair with the lowest rank. Ranking every (left, right) split of each piece
    by that piece's score makes the two agree. Splits of the same piece can never compete with
    each other, so their relative order is arbitrary; shorter left parts go first, as in the
    reference tokenizer.json. Special and byte-fallback tokens never take part in merges.
    """
    ids = {p: i for i, p in enumerate(pieces) if i >= first_normal}
    ranked: list[tuple[float, int, int, tuple[str, str]]] = []
    for piece, i in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, cut, (left, right)))
    ranked.sort()
    return [m for *_, m in ranked]


def read_llama2c_tokenizer(tok_path: str | os.PathLike[str], vocab_size: int) -> Tokenizer:
    """Build an HF ``tokenizers.Tokenizer`` equivalent to a llama2.c (sentencepiece BPE) vocab.

    Encoding prepends '▁' and maps spaces to '▁' (Llama's legacy sentencepiece behaviour), uses
    byte fallback for characters outside the vocabulary, and adds ``<s>`` in front like Llama.
    """
    p = Path(tok_path)
    entries = _read_llama2c_vocab(p, vocab_size)
    pieces = [_piece(i, raw) for i, (_, raw) in enumerate(entries)]
    scores = [s for s, _ in entries]
    expected_head = [_UNK, _BOS, _EOS] + [f"<0x{b:02X}>" for b in range(_N_BYTES)]
    if vocab_size < len(expected_head) or pieces[: len(expected_head)] != expected_head:
        raise ValueError(
            f"{p}: expected <unk>, <s>, </s> and 256 byte-fallback tokens <0x00>..<0xFF> at ids "
            f"0..{len(expected_head) - 1}, as in sentencepiece BPE vocabularies with byte_fallback"
        )
    if len(set(pieces)) != len(pieces):
        raise ValueError(f"{p}: duplicate pieces in vocabulary")
    first_normal = len(expected_head)

    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = _bpe_merges(pieces, scores, first_normal)
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=_UNK,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in (_UNK, _BOS, _EOS)]
    )
    # No pre-tokenizer on purpose: sentencepiece merges across spaces are impossible anyway
    # (no vocab piece has '▁' after its first char) and run.c treats the text as one sequence.
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            # Drop the dummy-prefix space that the normalizer added.
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{_BOS}:0 $A:0",
        pair=f"{_BOS}:0 $A:0 {_BOS}:1 $B:1",
        special_tokens=[(_BOS, 1)],
    )
    return tok


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------


def convert_llama2c_to_hf(
    bin_path: str | os.PathLike[str],
    tok_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
) -> Path:
    """Write a Hugging Face Llama directory for a llama2.c checkpoint and tokenizer."""
    from safetensors.torch import save_file
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    config, sd = read_llama2c_checkpoint(bin_path)
    tokenizer = read_llama2c_tokenizer(tok_path, config["vocab_size"])
    out.mkdir(parents=True, exist_ok=True)

    if config["tie_word_embeddings"]:
        # safetensors refuses aliased tensors, and HF ties lm_head to the embedding on load.
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    save_file(
        {k: v.contiguous() for k, v in sd.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # run.c ends generation when the model emits BOS: these models were trained on BOS-separated
    # stories and close a story with 1 rather than EOS, so stop on both.
    generation = {"bos_token_id": 1, "eos_token_id": [2, 1]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=_BOS,
        eos_token=_EOS,
        unk_token=_UNK,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=config["max_position_embeddings"],
    )
    fast.save_pretrained(str(out))
    # save_pretrained does not record these; writing them makes AutoTokenizer rebuild the same
    # Llama-style "<s> $A" post-processor on load instead of relying on the stored one.
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg.update(add_bos_token=True, add_eos_token=False)
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    return out


def find_llama2c_tokenizer(bin_path: str | os.PathLike[str], vocab_size: int) -> Path:
    """Locate the llama2.c tokenizer that belongs to ``bin_path``.

    llama2.c names custom vocabularies ``tok<N>.bin`` and the default Llama 2 one
    ``tokenizer.bin``; retrains often ship without one and reuse a sibling model's, so sibling
    directories are searched for a ``tok<N>.bin`` with the model's vocab size too.
    """
    p = Path(bin_path).resolve()
    here = p.parent
    candidates = [here / f"tok{vocab_size}.bin", here / "tokenizer.bin"]
    if here.parent != here:
        siblings = sorted(d for d in here.parent.iterdir() if d.is_dir() and d != here)
        candidates += [d / f"tok{vocab_size}.bin" for d in siblings]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"no llama2.c tokenizer found for {p} (looked for tok{vocab_size}.bin / tokenizer.bin next "
        f"to it and tok{vocab_size}.bin in sibling directories); pass the tokenizer path explicitly"
    )


def _cache_root() -> Path:
    env = os.environ.get("SPARSA_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "sparsa"
    return root / "llama2c"


def _fingerprint(*paths: Path) -> str:
    h = hashlib.sha256(f"v{_CONVERTER_VERSION}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _is_converted(d: Path) -> bool:
    return all((d / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def resolve_llama2c(
    path: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Return an HF model directory for a llama2.c ``.bin``, converting it once into a cache.

    The cache key covers the size and mtime of the checkpoint and tokenizer, so replacing either
    file triggers a fresh conversion. ``cache_dir`` overrides ``$SPARSA_CACHE`` /
    ``~/.cache/sparsa``.
    """
    bin_path = Path(path)
    fields, _ = _checked_layout(bin_path)
    vocab_size = abs(fields[5])
    if tokenizer is not None:
        tok_path = Path(tokenizer)
    else:
        tok_path = find_llama2c_tokenizer(bin_path, vocab_size)
    if not tok_path.is_file():
        raise FileNotFoundError(f"llama2.c tokenizer {tok_path} does not exist")

    root = Path(cache_dir) / "llama2c" if cache_dir is not None else _cache_root()
    resolved = bin_path.resolve()
    # "model.bin" alone says nothing, so the directory name goes into the cache entry's name too.
    name = f"{resolved.parent.name}-{resolved.stem}".strip("-") or "model"
    target = root / f"{name}-{_fingerprint(bin_path, tok_path)}"
    if _is_converted(target):
        return target

    root.mkdir(parents=True, exist_ok=True)
    # Convert into a private directory and rename it into place, so a concurrent or interrupted
    # conversion never leaves a half-written directory that looks finished.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        convert_llama2c_to_hf(bin_path, tok_path, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_converted(target):
                # A stale, incomplete directory from an older crash: replace it.
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
