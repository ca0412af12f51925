"""`sparsa serve MODEL`: the OpenAI-compatible server on uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsa.config import EngineConfig, config_from_args
from sparsa.server.settings import LOOPBACK_HOSTS, AdmissionConfig

log = logging.getLogger(__name__)
# where the server's defaults differ from the offline engine's
SERVE_DEFAULTS = {"enable_prefix_caching": True}


def _pos_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Server options (shared by `sparsa serve` and the prefix-cache benchmark)."""
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default loopback only; 0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("SPARSA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: "
                        "$SPARSA_API_KEY, else no auth)")
    p.add_argument("--served-model-name", default=None,
                   help="model id clients send (default: MODEL's name: the directory or "
                        "file name of a local path, else MODEL as given; MODEL itself is "
                        "also accepted)")
    p.add_argument("--chat-template", default=None,
                   help="Jinja chat template, or a file holding one, for models without one")
    p.add_argument("--max-waiting", type=_pos_int, default=256,
                   help="sequences (prompts x n) allowed to wait for the engine; beyond: 503")
    p.add_argument("--max-seqs-per-request", type=_pos_int, default=256,
                   help="most sequences (prompts x n) one request may make; beyond: 400")
    p.add_argument("--max-tokens-in-flight", type=_pos_int, default=None,
                   help="cap on admitted n*(prompt+max_tokens); beyond: 429 "
                        "(default: 4x the KV cache capacity)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take in all (0 = no limit)")
    p.add_argument("--max-body-bytes", type=_pos_int, default=4 << 20,
                   help="largest request body (413 beyond)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client may take to send a request body (408 beyond; "
                        "0 = no limit)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0,
                   help="seconds an idle keep-alive connection is held open")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header values accepted ('*' any, '*.example.org' "
                        "a domain; default: loopback names when bound to loopback, else any)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])


def add_parser(sub: Any, add_common: Callable, add_model_options: Callable) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                       description="Serve MODEL over the OpenAI API (/v1/completions, "
                                   "/v1/chat/completions, /v1/models) with /health, "
                                   "/metrics and a chat page at /.")
    add_common(p)
    p.add_argument("model", metavar="MODEL",
                   help="HF model directory, llama2.c .bin file, or built-in config name")
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

    engine = LLMEngine(engine_config(args))
    if args.chat_template:
        if engine.tokenizer is None:
            raise ValueError("--chat-template needs a model with a tokenizer")
        t = Path(args.chat_template)
        engine.tokenizer.chat_template = t.read_text() if t.is_file() else args.chat_template
    name = args.served_model_name or default_model_name(args.model)
    settings = ServerSettings(
        model_name=name, api_key=args.api_key or None, max_body_bytes=args.max_body_bytes,
        admission=AdmissionConfig(max_waiting=args.max_waiting,
                                  max_tokens_in_flight=args.max_tokens_in_flight,
                                  request_timeout=args.request_timeout or None,
                                  max_seqs_per_request=args.max_seqs_per_request),
        extra_model_names=[args.model] if name != args.model else [],
        body_timeout=args.body_timeout or None,
        allowed_hosts=allowed_hosts(args.allowed_hosts, args.host),
    )
    return build_app(engine, settings), engine


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

    app, engine = build_from_args(args)
    if args.host not in LOOPBACK_HOSTS and not args.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach it can use it",
                    args.host)
    print(f"sparsa: serving {app.state.settings.model_name} "
          f"(context {engine.max_model_len}, {engine.block_manager.num_blocks} KV blocks, "
          f"prefix caching {'on' if engine.config.cache.enable_prefix_caching else 'off'}) "
          f"on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5, timeout_keep_alive=args.keep_alive_timeout)
    return 0
