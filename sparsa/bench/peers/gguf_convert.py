"""Run llama.cpp's HF -> GGUF converter on a checkpoint whose BPE tokenizer it does not know.

The converter identifies a BPE pre-tokenizer by hashing how it splits a fixed string and
refuses unknown hashes. Our dummy-weight benchmark models use a byte-level BPE with GPT-2
style pre-tokenization, so an unknown hash is mapped to "gpt-2" here instead of editing
the vendored converter.

Usage: python -m sparsa.bench.peers.gguf_convert LLAMA_CPP_DIR MODEL_DIR --outfile F --outtype T
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    llama_dir, rest = argv[0], argv[1:]
    sys.path.insert(0, llama_dir)
    from conversion import base  # the vendored converter's package

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", *rest]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main(sys.argv[1:])
