"""Tokenizer loading and incremental detokenization (transformers/tokenizers)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

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
        p = Path(path)
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


class IncrementalDetokenizer:
    """Streams text for one sequence with tokenizers' DecodeStream, so multi-token
    characters (byte-fallback, UTF-8 pieces) come out whole and in order."""

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.text = ""
        self._fast = getattr(tokenizer, "_tokenizer", None)
        # Seeding the stream with the prompt's tail lets the first generated token keep its
        # leading space (" time" after "Once upon a"), as vLLM's detokenizer does.
        try:
            self._stream = DecodeStream(ids=list(prompt_ids[-8:]),
                                        skip_special_tokens=skip_special_tokens)
        except TypeError:  # older tokenizers without prefix support
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._skip = skip_special_tokens
        self._ids: list[int] = []

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._fast is not None:
            piece = self._stream.step(self._fast, token_id)
            piece = piece or ""
        else:
            new = self.tokenizer.decode(self._ids, skip_special_tokens=self._skip)
            piece = new[len(self.text):]
        self.text += piece
        return piece
