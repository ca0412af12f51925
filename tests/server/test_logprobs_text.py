"""Logprob token strings, bytes and text offsets, as OpenAI returns them.

Two real tokenizer families built here with `tokenizers`: a llama-style SentencePiece BPE
with <0xNN> byte fallback (whose decoder strips the first token's leading space) and a
GPT-2 byte-level BPE. Each token must give its exact bytes, the token strings must join
back into the returned text, and text_offset must index into that text, also when the
response is streamed in chunks with text held back for stop strings.
"""

from __future__ import annotations

import pytest

from sparsa.outputs import CompletionOutput
from sparsa.server.formatting import (
    DeltaTracker,
    TokenText,
    chat_logprobs,
    completion_logprobs,
)
from sparsa.tokenizer import IncrementalDetokenizer
from tests.server.conftest import MODEL, SPECIALS
from tests.test_tokenizer_stream import build_sp_tokenizer

GPT2_CORPUS = ["Once upon a time, there was a little girl named Lily. She loved the caf\u00e9.",
               "The price was 5\u20ac and she said \u2713 na\u00efve r\u00e9sum\u00e9 \U0001f600",
               "def f(x):\n    return x  # done"] * 3
ASCII_TEXT = "a time, there was a little girl named Lily."
# Characters the vocabularies do not hold whole: byte tokens (SentencePiece) or byte-level
# tokens that split a character (GPT-2), i.e. tokens that are not whole UTF-8.
MIXED_TEXT = "the caf\u00e9 costs 5\u20ac \u2713 \U0001f600 ok"


def build_gpt2_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(GPT2_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")


def _gpt2_byte_map() -> dict[str, int]:
    """Byte-level character -> byte, read off tokenizers' own ByteLevel pre-tokenizer
    (characters whose UTF-8 covers every byte that UTF-8 uses), not off sparsa's map."""
    from tokenizers import pre_tokenizers

    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    out: dict[str, int] = {}
    cps = [*range(0x800), *range(0x800, 0x10000, 0x40), *range(0x10000, 0x110000, 0x1000)]
    for cp in cps:
        if 0xD800 <= cp < 0xE000:
            continue
        ((s, _),) = bl.pre_tokenize_str(chr(cp))
        out.update(zip(s, chr(cp).encode()))
    # the bytes no UTF-8 text holds (C0, C1, F5..FF) are printable Latin-1: themselves
    rest = set(pre_tokenizers.ByteLevel.alphabet()) - set(out)
    missing = set(range(256)) - set(out.values())
    assert rest == {chr(b) for b in missing}
    out.update((chr(b), b) for b in missing)
    return out


class Family:
    """One tokenizer, how a generation starts with it, and each token's exact bytes."""

    def __init__(self, name: str):
        self.name = name
        if name == "sp":
            self.tok = build_sp_tokenizer()
            self.prompt = [1, *self.encode("once upon")]
            self.byte_map = None
        else:
            self.tok = build_gpt2_tokenizer()
            self.prompt = self.encode("Once upon")
            self.byte_map = _gpt2_byte_map()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def generated(self, text: str) -> list[int]:
        """Ids a model would generate for `text` after the prompt (a leading space)."""
        return self.encode(text if self.name == "sp" else " " + text)

    def exact_bytes(self, tid: int) -> bytes:
        piece = self.tok.convert_ids_to_tokens(tid)
        if tid in self.tok.all_special_ids:
            return piece.encode()
        if self.byte_map is not None:
            return bytes(self.byte_map[c] for c in piece)
        if piece.startswith("<0x") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()


@pytest.fixture(scope="module", params=["sp", "gpt2"])
def fam(request) -> Family:
    return Family(request.param)


def _alts(tid: int, vocab: int) -> dict[int, float]:
    # the chosen token and two others as the top-k, so top_logprobs hold more tokens
    return {tid: -0.25, (tid * 7 + 3) % vocab: -1.5, (tid * 13 + 5) % vocab: -2.5}


def snapshots(fam: Family, ids: list[int], prompt: list[int] | None = None,
              finish: str = "length") -> list[CompletionOutput]:
    """The engine's output after each generated token, text streamed as the engine does."""
    det = IncrementalDetokenizer(fam.tok, fam.prompt if prompt is None else prompt, True)
    vocab = len(fam.tok)
    outs, lps = [], []
    for i, t in enumerate(ids):
        det.add(t)
        lps.append(_alts(t, vocab))
        outs.append(CompletionOutput(index=0, text=det.text, token_ids=list(ids[:i + 1]),
                                     logprobs=list(lps),
                                     finish_reason=finish if i == len(ids) - 1 else None))
    return outs


def _top2(tid: int, vocab: int) -> list[tuple[int, float]]:
    """The top-2 of an entry: the engine's entry holds the chosen token plus the top-k, so
    with three tokens in it the chosen one was outside the top-2."""
    entry = _alts(tid, vocab)
    return [(t, lp) for t, lp in entry.items() if t != tid or len(entry) <= 2]


def _escaped(raw: bytes) -> str:
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def test_completion_tokens_join_into_text(fam):
    ids = fam.generated(ASCII_TEXT)
    out = snapshots(fam, ids)[-1]
    assert out.text == " " + ASCII_TEXT
    tt = TokenText(fam.tok)
    lp = completion_logprobs(out, 0, len(ids), 2, tt, 0)
    # the first token keeps its space: SentencePiece's decoder strips it from a lone token
    assert lp["tokens"][0].startswith(" ")
    assert "".join(lp["tokens"]) == out.text
    if fam.name == "gpt2":
        assert "".join(lp["tokens"]) == fam.tok.decode(ids)
    for s, off in zip(lp["tokens"], lp["text_offset"]):
        assert out.text[off:off + len(s)] == s
    for entry, tid in zip(lp["top_logprobs"], ids):
        assert entry == {tt(t): lp for t, lp in _top2(tid, len(fam.tok))}
    assert lp["token_logprobs"] == [-0.25] * len(ids)


def test_chat_bytes_are_the_tokens_bytes(fam):
    ids = fam.generated(MIXED_TEXT)
    out = snapshots(fam, ids)[-1]
    tt = TokenText(fam.tok)
    content = chat_logprobs(out, 0, len(ids), 2, tt)["content"]
    partial = 0
    for entry, tid in zip(content, ids):
        raw = fam.exact_bytes(tid)
        assert entry["bytes"] == list(raw)
        try:
            assert entry["token"] == raw.decode("utf-8")
        except UnicodeDecodeError:
            assert entry["token"] == _escaped(raw)
            partial += 1
        tops = _top2(tid, len(fam.tok))
        assert sorted(tuple(x["bytes"]) for x in entry["top_logprobs"]) == \
            sorted(tuple(fam.exact_bytes(t)) for t, _ in tops)
    assert partial >= 2, "the text should need tokens that split characters"
    assert b"".join(bytes(e["bytes"]) for e in content) == out.text.encode()


def test_partial_characters_in_completions(fam):
    ids = fam.generated(MIXED_TEXT)
    out = snapshots(fam, ids)[-1]
    assert out.text == " " + MIXED_TEXT
    lp = completion_logprobs(out, 0, len(ids), 0, TokenText(fam.tok), 0)
    assert lp["top_logprobs"] == [None] * len(ids)
    done = b""
    for i, (s, off) in enumerate(zip(lp["tokens"], lp["text_offset"])):
        raw = fam.exact_bytes(ids[i])
        before = out.text[:off].encode()
        if s.startswith("bytes:"):
            assert s == _escaped(raw)
            # starts where its character begins: the text before it is whole characters,
            # and what this token's predecessors add is a piece of the character at off
            assert done.startswith(before)
            assert len(done) - len(before) < len(out.text[off].encode())
        else:
            assert out.text[off:off + len(s)] == s and before == done
        done += raw
    assert done == out.text.encode()
    if fam.name == "sp":  # the euro sign is three byte tokens
        i = lp["tokens"].index(_escaped(b"\xe2"))
        assert lp["tokens"][i:i + 3] == [_escaped(b"\xe2"), _escaped(b"\x82"), _escaped(b"\xac")]
        assert len(set(lp["text_offset"][i:i + 3])) == 1


@pytest.mark.parametrize("holdback", [0, 3])
@pytest.mark.parametrize("text", [ASCII_TEXT, MIXED_TEXT])
def test_streamed_offsets_match_the_whole_response(fam, holdback, text):
    """Chunks as serving.py streams them: offsets keep counting across chunks, also when
    text is held back for a stop string (the caller's sent count then runs behind)."""
    ids = fam.generated(text)
    outs = snapshots(fam, ids)
    tt = TokenText(fam.tok)
    whole = completion_logprobs(outs[-1], 0, len(ids), 1, tt, 0)
    tr = DeltaTracker(holdback)
    tokens, offsets, sent = [], [], ""
    for out in outs:
        offset = tr.sent_chars
        delta, t0, t1, _done = tr.advance(out)
        if not delta and not _done:
            continue
        sent += delta
        lp = completion_logprobs(out, t0, t1, 1, tt, offset)
        tokens += lp["tokens"]
        offsets += lp["text_offset"]
    assert sent == outs[-1].text
    assert tokens == whole["tokens"] and offsets == whole["text_offset"]
    chat = chat_logprobs(outs[-1], 0, len(ids), 1, tt)["content"]
    assert [e["token"] for e in chat] == tokens


def test_special_tokens_are_literal_and_take_no_text(fam):
    eos = fam.tok.eos_token_id
    ids = [*fam.generated(ASCII_TEXT), eos]
    out = snapshots(fam, ids, finish="stop")[-1]
    tt = TokenText(fam.tok)
    lp = completion_logprobs(out, 0, len(ids), 0, tt, 0)
    assert lp["tokens"][-1] == fam.tok.eos_token
    assert lp["text_offset"][-1] == len(out.text) == len(ASCII_TEXT) + 1
    entry = chat_logprobs(out, len(ids) - 1, len(ids), 0, tt)["content"][0]
    assert entry["bytes"] == list(fam.tok.eos_token.encode())


def test_first_token_without_a_seed_keeps_offsets_in_text():
    """With only BOS before it, the decoder strips the first token's space from the text;
    the token string keeps its exact bytes and later offsets still index the text."""
    fam = Family("sp")
    ids = fam.generated(ASCII_TEXT)
    out = snapshots(fam, ids, prompt=[1])[-1]
    assert out.text == ASCII_TEXT
    lp = completion_logprobs(out, 0, len(ids), 0, TokenText(fam.tok), 0)
    assert lp["tokens"][0] == " a" and lp["text_offset"][0] == 0
    for s, off in list(zip(lp["tokens"], lp["text_offset"]))[1:]:
        assert out.text[off:off + len(s)] == s


def test_without_tokenizer_token_ids_stay():
    tt = TokenText(None)
    out = CompletionOutput(index=0, text="", token_ids=[7, 11],
                           logprobs=[{7: -0.5}, {11: -0.1, 3: -3.0}])
    lp = completion_logprobs(out, 0, 2, 1, tt, 0)
    assert lp["tokens"] == ["token_id:7", "token_id:11"]
    assert lp["text_offset"] == [0, len("token_id:7")]
    content = chat_logprobs(out, 0, 2, 2, tt)["content"]
    assert content[0]["bytes"] == list(b"token_id:7")
    assert content[1]["top_logprobs"][0]["token"] == "token_id:11"


def test_live_stream_offsets_index_the_text(client):
    """Through the server (one character per token): streamed with a stop string, so text
    is held back, offsets still point at each token's character; same as unstreamed."""
    kw = dict(model=MODEL, prompt="Hello", logprobs=1, temperature=0, max_tokens=24,
              stop=["@@@@"], extra_body={"ignore_eos": True})
    text, tokens, offsets = "", [], []
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                offsets += c.logprobs.text_offset
    assert len(tokens) == 24
    for s, off in zip(tokens, offsets):
        if s not in SPECIALS:  # special tokens are left out of the text
            assert text[off:off + len(s)] == s
    whole = client.completions.create(**kw).choices[0]
    assert whole.text == text
    assert whole.logprobs.tokens == tokens and whole.logprobs.text_offset == offsets
