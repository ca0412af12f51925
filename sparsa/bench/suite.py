"""The workloads of `sparsa bench --vs llama.cpp`, measured the way llama.cpp's tools do.

* ppN: prompt tokens / time of one N-token prefill (llama-bench -p N), mean of 3 runs.
* tgN: N tokens decoded at batch 1 after a 1-token prompt (llama-bench -n N). `sparsa bench
  --vs` runs it as alternating single runs of each engine (sparsa/bench_pairs.py: the box's
  memory bandwidth drifts over minutes); `run_sparsa` alone reports the mean of 3 runs.
* batched decode at batch B: B requests of 128 prompt tokens, 128 new tokens each, all prompts
  prefilled in one step; generated tokens after the first / decode time (llama-batched-bench
  S_TG).
* offline: 256 requests, prompt 32..512 and output 32..256 tokens (uniform, fixed seed), all
  submitted at once; output tok/s = generated tokens / wall time (total tok/s adds prompts).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class Workload:
    pp: int = 512
    tg: int = 128
    batches: tuple[int, ...] = (1, 8, 32)
    batched_prompt: int = 128
    batched_gen: int = 128
    offline_requests: int = 256
    offline_prompt: tuple[int, int] = (32, 512)
    offline_output: tuple[int, int] = (32, 256)
    seed: int = 0


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def offline_requests(w: Workload, vocab: int) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(w.seed)
    n = w.offline_requests
    plen = torch.randint(w.offline_prompt[0], w.offline_prompt[1] + 1, (n,), generator=g)
    olen = torch.randint(w.offline_output[0], w.offline_output[1] + 1, (n,), generator=g)
    prompts = [torch.randint(3, vocab, (int(p),), generator=g).tolist() for p in plen]
    return prompts, olen.tolist()


def run_sparsa(llm, w: Workload, parts: set[str], after_each_tg=None) -> dict:
    """`llm` must allow max(batches) * batched_prompt tokens per step and as many sequences.
    `after_each_tg()` runs after each of the 3 tg repetitions: a peer's tg run there is
    interleaved with ours, so both see the same (shared, drifting) memory bandwidth."""
    from tqdm import tqdm

    from sparsa import SamplingParams

    vocab = llm.engine.hf_config.vocab_size
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate(random_prompts(1, 16, vocab, 99), greedy)  # warm-up
    res: dict = {}
    # one step per workload run (the offline one alone takes minutes on a large model);
    # updated between timed runs only
    runs = (3 if "pp" in parts else 0) + (3 if "tg" in parts else 0) + \
        (len(w.batches) if "batched" in parts else 0) + ("offline" in parts)
    bar = tqdm(total=runs, desc="Sparsa workloads", unit=" runs", disable=None, leave=False)
    if "pp" in parts:
        prompt = random_prompts(1, w.pp, vocab, 1)[0]
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        llm.generate([prompt], one)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            llm.generate([prompt], one)
            times.append(time.perf_counter() - t)
            bar.update(1)
        res[f"pp{w.pp}"] = w.pp / (sum(times) / len(times))
    if "tg" in parts:
        rates = []
        for _ in range(3):  # mean of 3, as llama-bench -r 3 reports
            rates.append(sparsa_tg_once(llm, w.tg))
            bar.update(1)
            if after_each_tg is not None:
                after_each_tg()
        res[f"tg{w.tg}"] = sum(rates) / len(rates)
    if "batched" in parts:
        for b in w.batches:
            prompts = random_prompts(b, w.batched_prompt, vocab, 2)
            outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=w.batched_gen,
                                                        ignore_eos=True))
            first = max(o.metrics["first_token_time"] for o in outs)
            last = max(o.metrics["finished_time"] for o in outs)
            res[f"decode_b{b}"] = b * (w.batched_gen - 1) / (last - first)
            bar.update(1)
    if "offline" in parts:
        prompts, olens = offline_requests(w, vocab)
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in olens]
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - t
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        n_in = sum(len(p) for p in prompts)
        res["offline_output_tok_s"] = n_out / wall
        res["offline_total_tok_s"] = (n_out + n_in) / wall
        res["offline_wall_s"] = wall
        bar.update(1)
    bar.close()
    return res


def sparsa_tg_once(llm, n: int) -> float:
    """One tgN run (llama-bench -n N -r 1): N tokens decoded after a 1-token prompt, tok/s
    over the decode time (first token to last)."""
    from sparsa import SamplingParams

    out = llm.generate([[1]], SamplingParams(temperature=0, max_tokens=n + 1,
                                             ignore_eos=True))[0]
    m = out.metrics
    return n / (m["finished_time"] - m["first_token_time"])


def run_transformers(path: str, w: Workload, threads: int, parts: set[str],
                     offline_subset: int = 32) -> dict:
    """HF transformers generate() on the same checkpoint. The offline run uses the first
    `offline_subset` requests as one left-padded batch (the whole 256-request run takes tens
    of minutes here); its tok/s counts only real (unpadded) tokens."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    vocab = model.config.vocab_size
    res: dict = {}

    def gen(ids, n, mask=None):
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0,
                              attention_mask=torch.ones_like(ids) if mask is None else mask)

    with torch.inference_mode():
        gen(torch.tensor(random_prompts(1, 16, vocab, 99)), 4)
        if "pp" in parts:
            ids = torch.tensor(random_prompts(1, w.pp, vocab, 1))
            t = time.perf_counter()
            gen(ids, 1)
            res[f"pp{w.pp}"] = w.pp / (time.perf_counter() - t)
        if "tg" in parts:
            ids = torch.tensor([[1]])
            t = time.perf_counter()
            gen(ids, 1)
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            gen(ids, w.tg + 1)
            res[f"tg{w.tg}"] = w.tg / (time.perf_counter() - t - t1)
        if "offline" in parts:
            prompts, olens = offline_requests(w, vocab)
            prompts, olens = prompts[:offline_subset], olens[:offline_subset]
            L = max(len(p) for p in prompts)
            ids = torch.zeros(len(prompts), L, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(prompts):
                ids[i, L - len(p):] = torch.tensor(p)
                mask[i, L - len(p):] = 1
            # One batch generates max(olens) for every row; only each request's own
            # output length counts as useful output.
            t = time.perf_counter()
            gen(ids, max(olens), mask)
            wall = time.perf_counter() - t
            res["offline_output_tok_s"] = sum(olens) / wall
            res["offline_total_tok_s"] = (sum(olens) + sum(len(p) for p in prompts)) / wall
            res["offline_note"] = f"first {len(prompts)} requests as one padded batch"
    return res
