"""`sparsa serve MODEL`: the OpenAI-compatible server on uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsa.config import EngineConfig, config_from_args
from sparsa.config.settings import (
    add_dataclass_arguments,
    add_model_argument,
    dataclass_from_args,
)
from sparsa.server.settings import LOOPBACK_HOSTS, ServeOptions

log = logging.getLogger(__name__)
# where the server's defaults differ from the offline engine's
SERVE_DEFAULTS = {"enable_prefix_caching": True}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The server's own options: one flag per ServeOptions field."""
    add_dataclass_arguments(p, ServeOptions, "server")


def add_parser(sub: Any, add_common: Callable, add_model_options: Callable) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                       description="Serve MODEL over the OpenAI API (/v1/completions, "
                                   "/v1/chat/completions, /v1/models) with /health, "
                                   "/metrics and a chat page at /.")
    add_common(p)
    add_model_argument(p)
    add_model_options(p, defaults=SERVE_DEFAULTS)
    add_arguments(p)
    p.set_defaults(func=run_serve)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The served engine's config: the settings given as flags, over the server's own
    defaults (SERVE_DEFAULTS)."""
    return config_from_args(args.model, args)


def _require_server_extra() -> None:
    from sparsa.extras import require

    for module in ("fastapi", "uvicorn", "prometheus_client"):
        require(module, "server", "sparsa serve")


def build_from_args(args: argparse.Namespace):
    """(FastAPI app, LLMEngine) for parsed `serve` arguments."""
    _require_server_extra()
    from sparsa.engine.llm_engine import LLMEngine
    from sparsa.server.app import build_app
    from sparsa.server.settings import ServerSettings

    opts = serve_options(args)
    engine = LLMEngine(engine_config(args))
    if opts.chat_template:
        if engine.tokenizer is None:
            raise ValueError("--chat-template needs a model with a tokenizer")
        t = Path(opts.chat_template)
        engine.tokenizer.chat_template = t.read_text() if t.is_file() else opts.chat_template
    name = opts.served_model_name or default_model_name(args.model)
    settings = ServerSettings(
        model_name=name, api_key=opts.api_key or None, max_body_bytes=opts.max_body_bytes,
        admission=opts.admission(),
        extra_model_names=[args.model] if name != args.model else [],
        body_timeout=opts.body_timeout or None,
        allowed_hosts=allowed_hosts(opts.allowed_hosts, opts.host),
        tool_call_parser=opts.tool_call_parser,
    )
    return build_app(engine, settings), engine


def serve_options(args: argparse.Namespace) -> ServeOptions:
    """The server's options from the flags; the API key falls back to $SPARSA_API_KEY."""
    opts = dataclass_from_args(ServeOptions, args)
    if opts.api_key is None:
        opts.api_key = os.environ.get("SPARSA_API_KEY") or None
    return opts


def default_model_name(model: str) -> str:
    """vLLM's served name is the model id; for a local path that would be the absolute
    path, so a local model is named by its directory (or file stem) instead."""
    p = Path(model)
    if p.exists():
        p = p.resolve()
        return p.stem if p.is_file() else p.name
    return model


def allowed_hosts(flag: str | None, bind: str) -> list[str]:
    if flag:
        hosts = [h.strip() for h in flag.split(",") if h.strip()]
        if not hosts:
            raise ValueError("--allowed-hosts names no host")
        return hosts
    if bind in LOOPBACK_HOSTS:
        return list(LOOPBACK_HOSTS)
    return ["*"]


def run_serve(args: argparse.Namespace) -> int:
    _require_server_extra()
    import uvicorn

    opts = serve_options(args)
    app, engine = build_from_args(args)
    if opts.host not in LOOPBACK_HOSTS and not opts.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach it can use it",
                    opts.host)
    print(f"sparsa: serving {app.state.settings.model_name} "
          f"(context {engine.max_model_len}, {engine.block_manager.num_blocks} KV blocks, "
          f"prefix caching {'on' if engine.config.cache.enable_prefix_caching else 'off'}) "
          f"on http://{opts.host}:{opts.port}", flush=True)
    uvicorn.run(app, host=opts.host, port=opts.port, log_level=opts.log_level,
                timeout_graceful_shutdown=5, timeout_keep_alive=opts.keep_alive_timeout)
    return 0
