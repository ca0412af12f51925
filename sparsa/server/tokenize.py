"""vLLM's /tokenize and /detokenize: what clients (lm-evaluation-harness, token counters)
use to see the server's tokenization."""

from __future__ import annotations

import asyncio
from typing import Any

from sparsa.server.errors import bad_request
from sparsa.server.protocol import DetokenizeRequest, TokenizeRequest


async def tokenize(serving: Any, req: TokenizeRequest) -> dict:
    serving.check_model(req.model)
    tok = serving._need_tokenizer()
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("send exactly one of prompt and messages", "prompt")
    if req.messages is not None:
        if not getattr(tok, "chat_template", None):
            raise bad_request("this model has no chat template; send a prompt", "messages")
        conv = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await serving.render_chat(conv, req.add_generation_prompt)
    else:
        prompt = req.prompt
        ids = await asyncio.to_thread(
            lambda: list(tok.encode(prompt, add_special_tokens=req.add_special_tokens)))
    out: dict[str, Any] = {"count": len(ids), "max_model_len": serving.max_model_len,
                           "tokens": ids}
    if req.return_token_strs:
        out["token_strs"] = tok.convert_ids_to_tokens(ids)
    return out


async def detokenize(serving: Any, req: DetokenizeRequest) -> dict:
    serving.check_model(req.model)
    tok = serving._need_tokenizer()
    bad = [t for t in req.tokens if t >= serving.vocab_size]
    if bad:
        raise bad_request(f"tokens must be in [0, {serving.vocab_size}): {bad[:5]}", "tokens")
    return {"prompt": await asyncio.to_thread(tok.decode, req.tokens)}
