"""`AsyncLLM`: requests from several coroutines stream concurrently and match `LLM`."""

from __future__ import annotations

import asyncio
import itertools

from sparsa import LLM, SamplingParams
from sparsa.server.async_llm import AsyncLLM


def test_async_generate_streams_and_matches_the_offline_engine(model_dir):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    offline = LLM(str(model_dir), dtype="float32", kv_cache_memory="8MiB")
    want = {p: offline.generate([p], params)[0].outputs[0].token_ids
            for p in ("Once", "Hello there")}

    async def one(llm, prompt, rid):
        outs = [o async for o in llm.generate(prompt, params, rid)]
        # cumulative outputs; a consumer slower than the engine sees several steps at once
        counts = [len(o.outputs[0].token_ids) for o in outs]
        assert outs[-1].finished and counts[-1] == 12 and len(outs) > 1
        assert all(a < b for a, b in itertools.pairwise(counts))
        return outs[-1].outputs[0].token_ids

    async def main():
        async with AsyncLLM(str(model_dir), dtype="float32", kv_cache_memory="8MiB") as llm:
            got = await asyncio.gather(one(llm, "Once", "a"), one(llm, "Hello there", "b"))
            async for _ in llm.generate("Once", params, "c"):
                break  # leaving early aborts it
            for _ in range(200):
                if not llm.engine.has_unfinished_requests():
                    break
                await asyncio.sleep(0.01)
            assert not llm.engine.has_unfinished_requests()
        return got

    got = asyncio.run(main())
    assert got == [want["Once"], want["Hello there"]]
