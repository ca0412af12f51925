"""`sparsa bench greedy MODEL.gguf`: greedy tokens of Sparsa and llama.cpp on the same GGUF
file and prompts, side by side: the tokenizations, how many generated tokens agree, and
where they part.

Both run the file as it is (Sparsa: its own form unless -q says otherwise; llama.cpp through
its Python bindings, the build `sparsa bench --vs llama.cpp` uses). Greedy decoding parts
at the first near tie the two engines' arithmetic breaks differently (llama.cpp quantizes
activations to 8 bits per 32, as Sparsa's kernels do, with other rounding), so agreement is
reported per prompt, not demanded.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a little girl who",
    "def fibonacci(n):",
    "The three primary colors are",
)


@dataclass
class GreedyRow:
    prompt: str
    same_prompt_tokens: bool
    agree: int  # generated tokens equal before the first difference
    generated: int
    sparsa: str
    llamacpp: str


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(model: Path, prompts: list[str], max_tokens: int, threads: int,
            quantization: str | None = None) -> list[GreedyRow]:
    import llama_cpp
    from tqdm import tqdm

    from sparsa import LLM, SamplingParams

    ref = llama_cpp.Llama(model_path=str(model), n_ctx=1024, n_threads=threads,
                          verbose=False)
    ours = LLM(str(model), dtype="float32", quantization=quantization, num_threads=threads,
               kv_cache_memory="256MiB")
    tok = ours.get_tokenizer()
    rows = []
    for prompt in tqdm(prompts, desc="Greedy prompts", unit=" prompts", disable=None,
                       leave=False):
        ids = tok.encode(prompt)
        theirs_prompt = ref.tokenize(prompt.encode(), add_bos=bool(ids) and ids[0] ==
                                     tok.bos_token_id, special=False)
        ref.reset()
        theirs: list[int] = []
        for t in ref.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            theirs.append(int(t))
            if len(theirs) == max_tokens:
                break
        mine = ours.generate([ids], SamplingParams(temperature=0, max_tokens=max_tokens,
                                                   ignore_eos=True))[0].outputs[0].token_ids
        rows.append(GreedyRow(prompt, list(theirs_prompt) == list(ids),
                              common_prefix(list(mine), theirs), len(mine),
                              tok.decode(list(mine)), tok.decode(theirs)))
    return rows


def main(argv: list[str] | None = None) -> int:
    from sparsa.bench.peers.llamacpp import LlamaCpp, default_cache
    from sparsa.config import physical_cores
    from sparsa.config.settings import add_model_argument, model_from_args
    from sparsa.loader.gguf_file import find_gguf

    ap = argparse.ArgumentParser(prog="sparsa bench greedy", description=__doc__.split("\n")[0])
    add_model_argument(ap, help="a GGUF file (or a folder holding one)")
    ap.add_argument("--prompt", action="append", default=None,
                    help="a prompt (repeatable; default: a few built-in ones)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("-q", "--quantization", default=None,
                    choices=["none", "int8", "int4", "bf16"],
                    help="Sparsa's weight form (default: the file's own)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the rows to this file")
    args = ap.parse_args(argv)
    model_from_args(args)
    path = find_gguf(Path(args.model).expanduser())
    if path is None:
        ap.error(f"{args.model} is not a GGUF file (llama.cpp runs GGUF files only)")
    if args.max_tokens < 1:
        ap.error("--max-tokens must be >= 1")
    LlamaCpp(default_cache()).ensure_installed()
    rows = compare(path, args.prompt or list(PROMPTS), args.max_tokens,
                   args.threads or physical_cores(), args.quantization)
    form = args.quantization or "the file's own"
    print(f"greedy, {path.name}, Sparsa form: {form}, "
          f"{args.max_tokens} tokens")
    print("| prompt | same prompt tokens | tokens agreeing | Sparsa | llama.cpp |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.prompt!r} | {r.same_prompt_tokens} | {r.agree}/{r.generated} | "
              f"{r.sparsa!r} | {r.llamacpp!r} |")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
