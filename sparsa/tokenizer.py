"""Tokenizer loading and incremental detokenization (transformers/tokenizers)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def shared_dir() -> Path:
    """Read-only shared data: $SPARSA_SHARED or ../shared beside the checkout."""
    env = os.environ.get("SPARSA_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared"


def load_tokenizer(path: str | Path | None, vocab_size: int | None = None):
    """AutoTokenizer from a local directory. For dummy models without one, the shared 32k
    BPE tokenizer is used when the vocab is 32000; otherwise None (token ids only)."""
    from transformers import AutoTokenizer

    if path is not None:
        from sparsa.loader.hub import looks_like_hub_id, resolve_hub_id

        if not Path(path).exists() and looks_like_hub_id(str(path)):
            path = resolve_hub_id(str(path))  # tokenizer="org/name"
        p = Path(path)
        if p.is_file() and p.suffix == ".gguf":
            from sparsa.loader.gguf_file import gguf_tokenizer

            return gguf_tokenizer(p)
        if (p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(p))
        log.warning("no tokenizer files in %s: text prompts are unavailable", p)
        return None
    fallback = shared_dir() / "tokenizers" / "bpe32k"
    if vocab_size == 32000 and (fallback / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(fallback))
    return None


def eos_token_ids(model_dir: Path | None, hf_config, tokenizer) -> set[int]:
    ids: set[int] = set()

    def add(v):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(x for x in v if isinstance(x, int))

    if model_dir is not None and (model_dir / "generation_config.json").exists():
        try:
            add(json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id"))
        except (json.JSONDecodeError, AttributeError):
            log.warning("ignoring malformed generation_config.json in %s", model_dir)
    add(getattr(hf_config, "eos_token_id", None))
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return ids


# DecodeStream's error for a decode that no longer starts with text it already returned.
_INVALID_PREFIX = "Invalid prefix encountered"
# How many ids seed a (re)built stream: enough context for a leading space or a merge
# with the previous token, few enough that every step's decode stays cheap.
_SEED_IDS = 8
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class IncrementalDetokenizer:
    """Streams text for one sequence with tokenizers' DecodeStream, so multi-token
    characters (byte-fallback, UTF-8 pieces) come out whole and in order.

    DecodeStream raises "Invalid prefix encountered" when byte-fallback tokens form
    invalid UTF-8 after some of their bytes were already returned as text: the
    ByteFallback decoder turns a whole run of byte tokens into U+FFFD once any byte of
    it is invalid, so the decode rewrites text that was already streamed. Text that went
    out cannot be taken back, so `add` then emits the text of the ids the stream was
    still holding and starts a fresh stream after them (vLLM resets the stream too)."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.text = ""
        self._fast = getattr(tokenizer, "_tokenizer", None)
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        # Prompt tail (seed) plus generated ids; [:_done] is the context of emitted text,
        # [_done:] are ids the stream holds back (part of a character).
        self._all: list[int] = []
        self._done = 0
        self._seeded = True
        if self._fast is not None:
            # Seeding the stream with the prompt's tail lets the first generated token keep
            # its leading space (" time" after "Once upon a"), as vLLM's detokenizer does.
            self._stream = self._new_stream(list(prompt_ids[-_SEED_IDS:]))

    def _decode(self, ids: list[int]) -> str:
        return self._fast.decode(ids, skip_special_tokens=self._skip)

    def _new_stream(self, seed: list[int]) -> Any:
        from tokenizers.decoders import DecodeStream

        # A seed whose text ends in a partial character leaves DecodeStream without a
        # prefix, and it would then return the seed's own text with the next piece.
        while seed and self._decode(seed).endswith("\ufffd"):
            seed = seed[:-1]
        if self._seeded:
            try:
                stream = DecodeStream(ids=list(seed), skip_special_tokens=self._skip)
            except TypeError:  # older tokenizers without prefix support
                self._seeded = False
        if not self._seeded:
            seed = []
            stream = DecodeStream(skip_special_tokens=self._skip)
        self._all = list(seed)
        self._done = len(seed)
        return stream

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._fast is None:
            new = self.tokenizer.decode(self._ids, skip_special_tokens=self._skip)
            piece = new[len(self.text):]
        else:
            self._all.append(token_id)
            try:
                piece = self._stream.step(self._fast, token_id)
            except Exception as e:
                if _INVALID_PREFIX not in str(e):
                    raise
                piece = self._recover()
            else:
                if piece is None:
                    return ""
                self._done = len(self._all)
        self.text += piece
        return piece

    def _recover(self) -> str:
        """Text of the held-back ids after an invalid-prefix error, and a fresh stream.

        A decode of everything generated cannot help here: it has already replaced streamed
        characters with U+FFFD. The held-back ids are decoded after the emitted ones that
        precede them, which keeps a leading space; when that context's own text changes
        (its trailing byte tokens join the held-back ones into one invalid run), its byte
        tokens are dropped from it, and as a last resort the held-back ids go alone."""
        pending = self._all[self._done:]
        ctx = self._all[max(0, self._done - _SEED_IDS):self._done]
        trimmed = list(ctx)
        while trimmed and _BYTE_TOKEN.fullmatch(self._fast.id_to_token(trimmed[-1]) or ""):
            trimmed.pop()
        piece = None
        for c in (ctx, trimmed, []):
            base = self._decode(c)
            full = self._decode(c + pending)
            if full.startswith(base):
                piece = full[len(base):]
                break
        log.debug("detokenizer: DecodeStream lost its prefix; restarted after %d ids",
                  len(self._ids))
        self._stream = self._new_stream(self._all[-_SEED_IDS:])
        return piece or ""
