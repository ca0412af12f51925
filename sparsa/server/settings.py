"""What the HTTP layer is told at start-up (the engine's settings live in sparsa.config)."""

from __future__ import annotations

from dataclasses import dataclass, field


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


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


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
