"""Shaping engine outputs as OpenAI JSON: logprobs, usage, streamed deltas."""

from __future__ import annotations

import codecs
import json
import re
from typing import Any

from sparsa.outputs import CompletionOutput, RequestOutput

# How many token ids TokenText remembers: above real vocabularies (256k), so a server
# never recomputes a token, while a model emitting ids past its vocabulary stays bounded.
_CACHE_MAX = 1 << 18
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_chars() -> dict[str, int]:
    """GPT-2 byte-level BPE writes each byte as one printable character: printable
    Latin-1 bytes stand for themselves, the other bytes (controls, space, ...) take the
    code points from 256 on, in byte order. This is the inverse map, character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
            *range(ord("\xae"), ord("\xff") + 1)]
    kept = set(keep)
    out = {chr(b): b for b in keep}
    n = 0
    for b in range(256):
        if b not in kept:
            out[chr(256 + n)] = b
            n += 1
    return out


def _decoder_types(fast: Any) -> set[str]:
    """The types of a tokenizers decoder, looking inside Sequence decoders."""
    dec = getattr(fast, "decoder", None)
    if dec is None:
        return set()
    try:
        tree = json.loads(dec.__getstate__())
    except Exception:  # a custom (Python) decoder has no JSON form
        return set()
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                found.add(node["type"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def token_string(raw: bytes) -> str:
    """OpenAI's token string: the bytes as UTF-8, or "bytes:\\xe2\\x80" for a token that
    is not whole UTF-8 (part of a multi-byte character)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class TokenText:
    """Token id -> the token's exact bytes and OpenAI token string, memoized (logprobs ask
    for the same tokens over and over).

    Decoding a token alone is wrong for logprobs: SentencePiece's decoder strips the
    leading space of the first token ("\u2581time" -> "time"), and a byte token that is
    part of a character decodes to U+FFFD. So byte-fallback tokens (<0xNN>) give their
    byte, byte-level BPE tokens their bytes through the GPT-2 character map, special and
    added tokens their literal text, and other tokens their text after an anchor token
    (decode([anchor, id]) minus decode([anchor])), which keeps the leading space."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}
        # The bytes a token adds to the returned text (none for a special token, which
        # the default skip_special_tokens leaves out); read with map() for offsets.
        self._width: dict[int, bytes] = {}
        self._ready = False
        # What _setup learns of the tokenizer.
        self._fast: Any = None
        self._byte_fallback = False
        self._byte_level: dict[str, int] | None = None
        self._added: dict[int, tuple[str, bool]] = {}
        self._special: set[int] = set()
        self._anchor: int | None = None

    def _setup(self) -> None:
        # Lazily: reading the decoder and the added tokens costs a little, and a server
        # that never serves logprobs never needs them.
        tok = self.tokenizer
        self._fast = getattr(tok, "_tokenizer", None)
        types = _decoder_types(self._fast) if self._fast is not None else set()
        model = getattr(self._fast, "model", None)
        # A slow (sentencepiece) tokenizer hides its decoder; <0xNN> is its byte spelling.
        self._byte_fallback = ("ByteFallback" in types or self._fast is None
                               or bool(getattr(model, "byte_fallback", False)))
        self._byte_level = _byte_level_chars() if "ByteLevel" in types else None
        try:
            added = dict(getattr(tok, "added_tokens_decoder", None) or {})
        except Exception:  # a tokenizer class without the transformers API
            added = {}
        self._added = {i: (str(getattr(t, "content", t)), bool(getattr(t, "special", True)))
                       for i, t in added.items()}
        self._special = set(getattr(tok, "all_special_ids", None) or ())
        try:
            ids = (self._fast.encode("a", add_special_tokens=False).ids
                   if self._fast is not None else tok.encode("a", add_special_tokens=False))
            self._anchor = ids[-1] if ids else None
        except Exception:
            self._anchor = None
        self._ready = True

    def _decode(self, ids: list[int]) -> str:
        # The engine streams text with the tokenizers backend (no clean-up of spaces), so
        # token text comes from the same decode.
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=False)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _piece(self, tid: int) -> str | None:
        if self._fast is not None:
            return self._fast.id_to_token(tid)
        try:
            p = self.tokenizer.convert_ids_to_tokens(tid)
        except Exception:
            return None
        return p if isinstance(p, str) else None

    def _compute(self, tid: int) -> tuple[bytes, bool]:
        """(exact bytes, is special) of one token."""
        if tid in self._added:
            content, special = self._added[tid]
            return content.encode(), special or tid in self._special
        if tid in self._special:
            return self._decode([tid]).encode(), True
        piece = self._piece(tid)
        if piece is not None:
            m = _BYTE_TOKEN.fullmatch(piece) if self._byte_fallback else None
            if m is not None:
                return bytes([int(m.group(1), 16)]), False
            if self._byte_level is not None:
                try:
                    return bytes(self._byte_level[c] for c in piece), False
                except KeyError:  # not written in the byte alphabet: decode it instead
                    pass
        if self._anchor is not None:
            base = self._decode([self._anchor])
            full = self._decode([self._anchor, tid])
            if full.startswith(base):
                return full[len(base):].encode(), False
        return self._decode([tid]).encode(), False

    def _entry(self, tid: int) -> tuple[str, bytes]:
        e = self._cache.get(tid)
        if e is not None:
            return e
        if self.tokenizer is None:
            s = f"token_id:{tid}"
            raw, special = s.encode(), False
        else:
            if not self._ready:
                self._setup()
            raw, special = self._compute(tid)
            s = token_string(raw)
        e = (s, raw)
        if len(self._cache) < _CACHE_MAX:
            self._cache[tid] = e
            self._width[tid] = b"" if special else raw
        return e

    def __call__(self, tid: int) -> str:
        return self._entry(tid)[0]

    def token_bytes(self, tid: int) -> bytes:
        """The token's exact bytes (a byte token's one byte, not U+FFFD)."""
        return self._entry(tid)[1]

    def text_bytes(self, tid: int) -> bytes:
        """The bytes the token adds to the returned text: none for a special token."""
        self._entry(tid)
        w = self._width.get(tid)
        if w is None:  # cache full: recompute what the cache would have held
            if self.tokenizer is None:
                return self._entry(tid)[1]
            raw, special = self._compute(tid)
            return b"" if special else raw
        return w

    def _joined(self, ids: list[int]) -> bytes:
        try:  # all cached: a C-level join, since streaming redoes this for every chunk
            return b"".join(map(self._width.__getitem__, ids))
        except KeyError:
            return b"".join(self.text_bytes(t) for t in ids)

    def offsets(self, ids: list[int], start: int, end: int, text: str) -> list[int]:
        """Character index in `text` (the choice's full text) where each of ids[start:end]
        starts. Counted from the first token: the caller's count of characters sent runs
        behind the tokens when text is held back for stop strings. A token that ends
        inside a character leaves the next token at the index where that character
        begins; an invalid byte counts as one character (byte fallback writes one U+FFFD
        per byte)."""
        dec = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        chars = len(dec.decode(self._joined(ids[:start])))
        shift = 0
        first = next((w for w in map(self.text_bytes, ids[:8]) if w), b"")
        if first.startswith(b" ") and not text.startswith(" "):
            shift = 1  # the decoder stripped the leading space (nothing seeded the text)
        out = []
        for tid in ids[start:end]:
            out.append(max(0, chars - shift))
            chars += len(dec.decode(self.text_bytes(tid)))
        return out


def _top(entry: dict[int, float], chosen: int, k: int) -> list[tuple[int, float]]:
    """The engine's entry holds the chosen token plus the top-k; recover the top-k."""
    items = sorted(entry.items(), key=lambda kv: -kv[1])
    if len(items) > k:  # the chosen token was outside the top-k
        items = [kv for kv in items if kv[0] != chosen][:k]
    return items


def completion_logprobs(out: CompletionOutput, start: int, end: int, k: int, tt: TokenText,
                        text_offset: int) -> dict[str, Any]:
    """Legacy completions format for tokens [start, end) of one choice.

    text_offset (what the caller has sent of the text) is only the fallback without a
    tokenizer: offsets are otherwise counted from the tokens' bytes (TokenText.offsets)."""
    tokens, lps, tops = [], [], []
    for i in range(start, end):
        tid = out.token_ids[i]
        entry = out.logprobs[i] if out.logprobs else {tid: 0.0}
        tokens.append(tt(tid))
        if entry is None:  # a prompt's first token: nothing before it predicts it
            lps.append(None)
            tops.append(None)
            continue
        lps.append(entry.get(tid))
        tops.append({tt(t): lp for t, lp in _top(entry, tid, k)} if k else None)
    if tt.tokenizer is None:  # no text to index: the strings' lengths, as always
        offsets, off = [], text_offset
        for s in tokens:
            offsets.append(off)
            off += len(s)
    else:
        offsets = tt.offsets(out.token_ids, start, end, out.text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": offsets}


def echo_logprobs(out: RequestOutput, prompt_text: str, c: CompletionOutput | None, k: int,
                  tt: TokenText) -> dict[str, Any]:
    """Legacy logprobs of the prompt (echo) followed by the tokens of completion `c` (None:
    the prompt alone), offsets counted in the echoed text: what lm-evaluation-harness
    reads to score a continuation."""
    ids, lps = list(out.prompt_token_ids), list(out.prompt_logprobs or [])
    text = prompt_text
    if c is not None:
        ids += c.token_ids
        lps += c.logprobs or [{t: 0.0} for t in c.token_ids]
        text += c.text
    joined = CompletionOutput(0, text, ids, logprobs=lps)
    return completion_logprobs(joined, 0, len(ids), k, tt, 0)


def shift_offsets(lp: dict[str, Any] | None, chars: int) -> dict[str, Any] | None:
    """Streamed logprobs after an echoed prompt: offsets count the prompt's characters."""
    if lp is not None and chars:
        lp["text_offset"] = [o + chars for o in lp["text_offset"]]
    return lp


def vllm_prompt_logprobs(out: RequestOutput, tt: TokenText) -> list[Any] | None:
    """vLLM's `prompt_logprobs` of a choice: per prompt position None (the first) or
    {token id: {logprob, rank, decoded_token}} with the prompt's token and the top-k."""
    if out.prompt_logprobs is None:
        return None
    ranks = out.prompt_logprob_ranks or [None] * len(out.prompt_logprobs)
    result: list[Any] = []
    for tid, entry, rank in zip(out.prompt_token_ids, out.prompt_logprobs, ranks):
        if entry is None:
            result.append(None)
            continue
        order = sorted(entry.items(), key=lambda kv: -kv[1])
        result.append({str(t): {"logprob": lp, "rank": rank if t == tid else i + 1,
                                "decoded_token": tt(t)}
                       for i, (t, lp) in enumerate(order)})
    return result


def chat_logprobs(out: CompletionOutput, start: int, end: int, k: int,
                  tt: TokenText) -> dict[str, Any]:
    content = []
    for i in range(start, end):
        tid = out.token_ids[i]
        entry = out.logprobs[i] if out.logprobs else {tid: 0.0}
        content.append({
            "token": tt(tid), "logprob": entry.get(tid), "bytes": list(tt.token_bytes(tid)),
            "top_logprobs": [{"token": tt(t), "logprob": lp, "bytes": list(tt.token_bytes(t))}
                             for t, lp in _top(entry, tid, k)],
        })
    return {"content": content}


def usage(outputs: list[RequestOutput]) -> dict[str, Any]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(int(o.metrics.get("num_cached_tokens", 0)) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def sse(data: dict[str, Any] | str) -> str:
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {body}\n\n"


class DeltaTracker:
    """What of one choice has been streamed. Text that could still turn out to be the
    start of a stop string is held back: the engine cuts a stop string off the text once
    it is complete, and what was already sent cannot be taken back."""

    def __init__(self, holdback: int):
        self.holdback = holdback
        self.echoed = 0  # characters of an echoed prompt sent before the completion
        self.sent_chars = 0
        self.sent_tokens = 0
        self.done = False

    def advance(self, out: CompletionOutput) -> tuple[str, int, int, bool]:
        """(new text, first new token, end token, finished now) for this output."""
        text = out.text
        finished = out.finish_reason is not None
        end = len(text) if finished else max(self.sent_chars, len(text) - self.holdback)
        delta = text[self.sent_chars:end]
        self.sent_chars = max(self.sent_chars, end)
        t0, t1 = self.sent_tokens, len(out.token_ids)
        if delta or finished:
            self.sent_tokens = t1
        else:
            t1 = t0  # tokens go out with the text they belong to
        newly_done = finished and not self.done
        self.done = self.done or finished
        return delta, t0, t1, newly_done
