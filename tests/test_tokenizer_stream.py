"""IncrementalDetokenizer against tokenizers' DecodeStream on byte-fallback tokens.

DecodeStream raises "Invalid prefix encountered" when byte tokens turn out to be invalid
UTF-8 after some of their bytes were already returned as text (the ByteFallback decoder
then writes U+FFFD for every byte of the run, rewriting streamed text). The tests first
find such id sequences with the raw stream, with a fixed seed, then check that the
detokenizer streams them without raising, without repeating or losing text.
"""

from __future__ import annotations

import random
import re

import pytest

SPECIALS = ["<unk>", "<s>", "</s>"]
WORDS = ["once", "upon", "a", "time", "there", "was", "little", "girl", "named", "lily",
         "she", "loved", "to", "play", "the", "park", "cafe", "costs"]
SEARCH_TRIES = 20_000


def build_sp_tokenizer():
    """A llama-style SentencePiece BPE: "\u2581"-prefixed words, <0xNN> byte fallback for
    anything else, and llama's decoder (Replace, ByteFallback, Fuse, Strip)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    letters = sorted(set("".join(WORDS)) | set(",."))
    pieces: list[str] = ["\u2581", *letters]
    merges: list[tuple[str, str]] = []
    for w in WORDS:  # each word grows from its "\u2581" one letter at a time
        cur = "\u2581"
        for ch in w:
            if (cur, ch) not in merges:
                merges.append((cur, ch))
            cur += ch
            if cur not in pieces:
                pieces.append(cur)
    tokens = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + pieces
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def tok():
    return build_sp_tokenizer()


def _byte_id(tok, b: int) -> int:
    return tok.convert_tokens_to_ids(f"<0x{b:02X}>")


def _word_ids(tok) -> list[int]:
    return [tok.convert_tokens_to_ids("\u2581" + w) for w in WORDS] + \
        [tok.convert_tokens_to_ids(c) for c in "aet,"]


def _prompts(tok) -> dict[str, list[int]]:
    return {"unseeded": [], "bos": [1],
            "story": [1, *tok.encode("once upon a", add_special_tokens=False)]}


def _raw_stream(tok, prompt: list[int], ids: list[int]) -> None:
    """Feeds the ids to DecodeStream seeded as IncrementalDetokenizer seeds it."""
    from tokenizers.decoders import DecodeStream

    ds = DecodeStream(ids=prompt[-8:], skip_special_tokens=True)
    for t in ids:
        ds.step(tok._tokenizer, t)


def _raises(tok, prompt: list[int], ids: list[int]) -> bool:
    try:
        _raw_stream(tok, prompt, ids)
    except Exception as e:
        assert "Invalid prefix" in str(e)
        return True
    return False


def find_raising(tok, prompt: list[int], byte_values: range, want: int,
                 seed: int) -> list[list[int]]:
    """Random runs of byte tokens between words that make the raw DecodeStream raise.
    Each ends with a word: bytes still waiting for a character at the end can only come
    out with a flush, which neither DecodeStream nor the detokenizer has."""
    rng = random.Random(seed)
    words = _word_ids(tok)
    found: list[list[int]] = []
    for _ in range(SEARCH_TRIES):
        ids = [_byte_id(tok, rng.choice(byte_values)) if rng.random() < 0.7
               else rng.choice(words) for _ in range(rng.randint(2, 10))]
        ids.append(rng.choice(words))
        if _raises(tok, prompt, ids):
            found.append(ids)
            if len(found) == want:
                break
    return found


def _expected(tok, prompt: list[int], ids: list[int]) -> str:
    """The generated ids' text after the prompt, by one full decode."""
    head = tok.decode(prompt, skip_special_tokens=True)
    full = tok.decode(prompt + ids, skip_special_tokens=True)
    assert full.startswith(head)
    return full[len(head):]


def _byte_shape(text: str) -> str:
    """One mark per byte outside ASCII, with U+FFFD standing for one byte. The full decode
    writes U+FFFD for each byte of an invalid run, also for bytes the stream had already
    sent as a valid character; in this shape both agree when every byte and every word
    comes out exactly once and in order."""
    return "".join(c if c.isascii() else "#" if c == "\ufffd" else "#" * len(c.encode())
                   for c in text)


def _run(tok, prompt: list[int], ids: list[int], skip: bool = True):
    from sparsa.tokenizer import IncrementalDetokenizer

    det = IncrementalDetokenizer(tok, prompt, skip)
    pieces = [det.add(t) for t in ids]
    assert all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == det.text
    return det


@pytest.mark.parametrize("prompt_name", ["unseeded", "bos", "story"])
def test_detokenizer_survives_invalid_prefix(tok, prompt_name):
    prompt = _prompts(tok)[prompt_name]
    # Non-ASCII bytes only: then every ASCII character of the text comes from a word token
    # and the byte shape below pins each byte and word down.
    found = find_raising(tok, prompt, range(0x80, 0x100), want=25, seed=11)
    assert len(found) == 25, "the search no longer finds sequences that break DecodeStream"
    for ids in found:
        with pytest.raises(Exception, match="Invalid prefix"):
            _raw_stream(tok, prompt, ids)
        det = _run(tok, prompt, ids)
        expected = _expected(tok, prompt, ids)
        assert _byte_shape(det.text) == _byte_shape(expected), (ids, det.text, expected)
        # the final word came out after the recovery, with its leading space
        last = tok.convert_ids_to_tokens(ids[-1]).replace("\u2581", " ")
        assert det.text.endswith(last)


def test_detokenizer_survives_invalid_prefix_any_byte(tok):
    """With ASCII bytes too: text already streamed stays as it was (the full decode turns
    it into U+FFFD afterwards), so compare lengths: every byte gives at most one
    character, so text never comes out twice."""
    prompt = _prompts(tok)["story"]
    found = find_raising(tok, prompt, range(256), want=25, seed=12)
    assert len(found) == 25
    for ids in found:
        det = _run(tok, prompt, ids)
        expected = _expected(tok, prompt, ids)
        assert len(det.text) <= len(expected), (ids, det.text, expected)
        last = tok.convert_ids_to_tokens(ids[-1]).replace("\u2581", " ")
        assert det.text.endswith(last)


def test_stream_is_exact_after_recovery(tok):
    """Text after the error is the ids' decode in context, exactly."""
    prompt = _prompts(tok)["story"]
    tail = tok.encode("the girl loved the caf\u00e9, 5\u20ac \u2713", add_special_tokens=False)
    assert any(re.fullmatch(r"<0x..>", p) for p in tok.convert_ids_to_tokens(tail))
    for ids in find_raising(tok, prompt, range(0x80, 0x100), want=10, seed=13):
        from sparsa.tokenizer import IncrementalDetokenizer

        det = IncrementalDetokenizer(tok, prompt, True)
        for t in ids:
            det.add(t)
        before = det.text
        for t in tail:
            det.add(t)
        assert det.text[len(before):] == _expected(tok, ids[-1:], tail)
        assert det.text[len(before):] == " the girl loved the caf\u00e9, 5\u20ac \u2713"


@pytest.mark.parametrize("prompt_name", ["unseeded", "bos", "story"])
def test_valid_text_matches_full_decode(tok, prompt_name):
    """Whole characters as byte tokens between words: the stream equals the decode."""
    prompt = _prompts(tok)[prompt_name]
    rng = random.Random(5)
    words = _word_ids(tok)
    chars = ["\u00e9", "\u20ac", "\u2713", "\U0001f600", "A", " ", "\u00f1"]
    for _ in range(300):
        ids: list[int] = []
        for _ in range(rng.randint(1, 8)):
            if rng.random() < 0.5:
                ids.append(rng.choice(words))
            else:
                ids += [_byte_id(tok, b) for b in rng.choice(chars).encode()]
        assert not _raises(tok, prompt, ids)
        assert _run(tok, prompt, ids).text == _expected(tok, prompt, ids)


def test_prompt_ending_inside_a_character(tok):
    """A prompt whose last token is the first byte of a character: the stream must not
    send the prompt's own text along with the first generated piece."""
    prompt = [1, *tok.encode("once upon", add_special_tokens=False), _byte_id(tok, 0xC3)]
    det = _run(tok, prompt, tok.encode("a time", add_special_tokens=False))
    assert det.text == " a time"
