"""What the HTTP layer is told at start-up (the engine's settings live in sparsa.config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sparsa.config.base import setting


@dataclass
class AdmissionConfig:
    """Every limit counts sequences (a request makes prompts x n of them), since each one
    is queued, scheduled and holds KV blocks on its own."""

    max_waiting: int = 256  # sequences admitted but not yet running in the engine
    max_tokens_in_flight: int | None = None  # sum of n*(prompt + max_tokens); None = auto
    request_timeout: float | None = 600.0  # seconds from arrival to the last token
    max_seqs_per_request: int = 256  # prompts x n of one request

    def __post_init__(self) -> None:
        for name in ("max_waiting", "max_seqs_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens_in_flight is not None and self.max_tokens_in_flight < 1:
            raise ValueError(f"max_tokens_in_flight must be >= 1, got "
                             f"{self.max_tokens_in_flight}")


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass
class ServeOptions:
    """`sparsa serve`'s own options, one flag each (the engine's are sparsa.config's)."""

    host: str = setting("127.0.0.1", "bind address (loopback only; 0.0.0.0 exposes the "
                                     "server)")
    port: int = setting(8000, "TCP port")
    api_key: str | None = setting(None, "require 'Authorization: Bearer KEY' on /v1 (unset: "
                                        "$SPARSA_API_KEY, else no auth)")
    served_model_name: str | None = setting(
        None, "model id clients send (unset: MODEL's name: the directory or file name of a "
              "local path, else MODEL as given; MODEL itself is also accepted)")
    chat_template: str | None = setting(
        None, "Jinja chat template, or a file holding one, for models without one")
    max_waiting: int = setting(256, "sequences (prompts x n) allowed to wait for the engine; "
                                    "beyond: 503")
    max_seqs_per_request: int = setting(256, "most sequences (prompts x n) one request may "
                                             "make; beyond: 400")
    max_tokens_in_flight: int | None = setting(
        None, "cap on admitted n*(prompt+max_tokens); beyond: 429 (unset: 4x the KV cache "
              "capacity)")
    request_timeout: float = setting(600.0, "seconds a request may take in all (0 = no "
                                            "limit)")
    max_body_bytes: int = setting(4 << 20, "largest request body (413 beyond)")
    body_timeout: float = setting(30.0, "seconds a client may take to send a request body "
                                        "(408 beyond; 0 = no limit)")
    keep_alive_timeout: float = setting(5.0, "seconds an idle keep-alive connection is held "
                                             "open")
    allowed_hosts: str | None = setting(
        None, "comma-separated Host header values accepted ('*' any, '*.example.org' a "
              "domain; unset: loopback names when bound to loopback, else any)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = setting(
        "info", "the HTTP server's log level")
    tool_call_parser: str = setting(
        "hermes", "how tool calls are read from the model's output under tool_choice auto "
                  "(sparsa.server.tool_parser.TOOL_PARSERS)")

    def __post_init__(self) -> None:
        for name in ("port", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout", "body_timeout", "keep_alive_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.admission()  # the admission limits validate themselves
        from sparsa.server.tool_parser import get_tool_parser

        get_tool_parser(self.tool_call_parser)  # an unknown name fails at start-up

    def admission(self) -> AdmissionConfig:
        """The admission limits these options set (request_timeout 0: no limit)."""
        return AdmissionConfig(max_waiting=self.max_waiting,
                               max_tokens_in_flight=self.max_tokens_in_flight,
                               request_timeout=self.request_timeout or None,
                               max_seqs_per_request=self.max_seqs_per_request)


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    extra_model_names: list[str] = field(default_factory=list)
    # seconds a client may take to send its whole request body (408 beyond; None: no limit)
    body_timeout: float | None = 30.0
    # Host header values accepted ("*" any): a browser page on another site can reach a
    # loopback server through DNS rebinding, and the Host header is what tells them apart.
    allowed_hosts: list[str] = field(default_factory=lambda: ["*"])
    tool_call_parser: str = "hermes"  # a key of sparsa.server.tool_parser.TOOL_PARSERS

    def host_allowed(self, host_header: str) -> bool:
        if "*" in self.allowed_hosts:
            return True
        host = host_header.strip().lower()
        if host.startswith("["):  # [::1]:8000
            host = host[1:].split("]", 1)[0]
        elif host.count(":") == 1:
            host = host.split(":", 1)[0]
        return any(host == h.lower() or (h.startswith("*.") and host.endswith(h[1:].lower()))
                   for h in self.allowed_hosts)
