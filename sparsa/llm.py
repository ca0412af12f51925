"""`LLM`: the offline API, with vLLM's semantics for generate() and chat()."""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as Seq
from typing import Any

from sparsa.config import engine_config
from sparsa.engine.llm_engine import LLMEngine
from sparsa.outputs import RequestOutput
from sparsa.sampling_params import SamplingParams

PromptType = str | list[int] | dict


class LLM:
    """The offline engine: `generate()` and `chat()` over a loaded model.

    `LLM(model, **settings)`: model is an HF directory, a llama2.c .bin file or a built-in
    name (`load_format="dummy"` for random weights). Every setting is a keyword named as
    its command-line flag (`dtype`, `quantization`, `max_model_len`, `kv_cache_memory`,
    `expert_memory`, `offload_policy`, ...: `sparsa.config.settings()` lists them with
    their docs, `sparsa generate --help` shows them as flags). Whole sections may be passed
    as config objects or dicts of their fields: `offload=OffloadConfig(...)`,
    `cache={"block_size": 32}`. An unknown keyword raises TypeError naming the closest
    setting.
    """

    def __init__(self, model: str, **settings: Any):
        self.engine = LLMEngine(engine_config(model, **settings))

    def get_tokenizer(self):
        """The model's tokenizer (transformers), or None for a model without one."""
        return self.engine.tokenizer

    def save_expert_trace(self, path: str | None = None, clear: bool = False):
        """Write the expert-routing trace recorded so far (``trace_experts=`` must be set):
        to ``path``, or to the ``trace_experts`` path by default; returns the path written,
        or None when no MoE layer has run yet. ``clear`` drops the rows written."""
        return self.engine.save_expert_trace(path, clear=clear)

    def close(self) -> None:
        """Shut the engine down: writes the expert trace when ``trace_experts`` is set
        (also done when the LLM is garbage collected or the interpreter exits)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _normalize(prompts) -> list[PromptType]:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, dict):
            return [prompts]
        if isinstance(prompts, Seq) and prompts and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompts
        ):
            return [list(prompts)]
        if isinstance(prompts, Seq):
            return list(prompts)
        raise TypeError("prompts must be a string, a list of token ids, or a list of those")

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        priority: list[int] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for each prompt and return its finished `RequestOutput`, in order.

        `prompts`: a string, a list of token ids, a list of either, or dicts with
        "prompt" / "prompt_token_ids". `sampling_params`: one for all prompts or one per
        prompt (default: `SamplingParams()`). `priority`: per prompt, lower first (with
        scheduling_policy="priority"). All prompts run batched; an error adding any of them
        aborts those already added."""
        items = self._normalize(prompts)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(items):
                raise ValueError("sampling_params list must have one entry per prompt")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(items)
        if priority is not None and len(priority) != len(items):
            raise ValueError("priority must have one entry per prompt")
        ids = []
        try:
            for i, (p, sp) in enumerate(zip(items, params)):
                if isinstance(p, dict):
                    p = p.get("prompt_token_ids", p.get("prompt"))
                ids.append(self.engine.add_request(
                    p, sp, priority=priority[i] if priority else 0))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", unit="prompt")
        results: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [results[r] for r in ids]

    def stream(self, prompt, sampling_params: SamplingParams | None = None
               ) -> Iterator[RequestOutput]:
        """Generate for one prompt (text, token ids or a {"prompt"...} dict), yielding its
        `RequestOutput` after every step that adds tokens (text and token ids so far; the
        last has `finished`). Leaving the loop early aborts the request."""
        (item,) = self._normalize(prompt)
        if isinstance(item, dict):
            item = item.get("prompt_token_ids", item.get("prompt"))
        rid = self.engine.add_request(item, sampling_params or SamplingParams())
        done = False
        try:
            while not done and self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out
        finally:
            if not done:
                self.engine.abort_request(rid)

    def chat_prompt(self, messages: list[dict], chat_template: str | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
        """The token ids of one conversation under the tokenizer's chat template (or
        `chat_template`)."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer, so chat is unavailable")
        if not getattr(tok, "chat_template", None) and chat_template is None:
            raise ValueError("the tokenizer has no chat template; pass chat_template=")
        ids = tok.apply_chat_template(messages, chat_template=chat_template, tokenize=True,
                                      add_generation_prompt=add_generation_prompt)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template (or `chat_template`) to one conversation
        (a list of {"role", "content"} messages) or a list of them, and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt(conv, chat_template, add_generation_prompt)
                   for conv in convs]
        return self.generate(prompts, sampling_params)
