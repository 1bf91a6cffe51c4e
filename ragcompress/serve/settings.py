"""What a running service is allowed to do: limits, the queue, the key. One frozen value."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# The variable `ragcompress serve` reads the key from when --api-key is not given (the CLI
# spells it again so that its --help does not import the service; tests/test_serve.py checks both).
API_KEY_ENV = "RAGCOMPRESS_API_KEY"

# The names this machine is reached by from itself: what a Host header may say by default.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(host: str) -> str:
    """A host as a Host header's name is compared: lower case, without IPv6 brackets."""
    return host.strip().lower().removeprefix("[").removesuffix("]")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    name = host_name(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeSettings:
    """Settings of one service (``ragcompress serve`` flags; :func:`ragcompress.serve.create_app`).

    api_key:            when set, every endpoint but ``/health`` needs ``Authorization: Bearer KEY``
    queue_size:         requests that may wait while one is generated; one more answers 429
    model_id:           the model name ``/v1/models`` lists and responses carry (any requested
                        ``model`` is accepted: there is one model per service)
    preset:             the preset the engine's options came from (reported back, nothing else)
    top_k:              passages retrieved when a request names neither ``passage_ids`` nor ``top_k``
    max_top_k:          the largest ``top_k`` (and number of ``passage_ids``) a request may ask for
    max_tokens:         the largest ``max_tokens`` a request may ask for
    max_question_chars: the longest question (the last user message), in characters
    max_body_bytes:     the largest request body; a larger one answers 413 before it is parsed
    max_messages:       the most chat messages one request may carry
    max_batch:          chat requests whose forward passes may be batched together
                        (``runtime.batch``); 1 answers one request at a time (unbatched)
    batch_window_s:     under concurrent load, how long the generation thread waits for a batch
                        to fill before it starts one (``serve.worker``)
    allowed_hosts:      the names a request's ``Host`` header may give (any port); another is
                        refused 400. A web page whose name an attacker re-points at 127.0.0.1 (DNS
                        rebinding) sends its own name there, so it cannot read a local service's
                        answers. ``None`` accepts any name: for a service on a public address,
                        behind its key
    body_timeout_s:     how long a request's body may take to arrive once its headers have; a
                        slower one is answered 408: a client that stops sending mid-body
                        otherwise holds its connection, and a graceful shutdown, for ever
    shutdown_timeout_s: how long a graceful shutdown (SIGTERM) waits for the requests in flight
                        and queued (``serve.server.run``); those still unanswered then are told
                        so (503 ``shutting_down``) and the process exits
    """

    api_key: str | None = None
    queue_size: int = 64
    model_id: str = "ragcompress"
    preset: str | None = None
    top_k: int = 3
    max_top_k: int = 16
    max_tokens: int = 1024
    max_question_chars: int = 4000
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_batch: int = 8
    batch_window_s: float = 0.005
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS
    body_timeout_s: float = 30.0
    shutdown_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for name in (
            "queue_size",
            "top_k",
            "max_top_k",
            "max_tokens",
            "max_question_chars",
            "max_body_bytes",
            "max_messages",
            "max_batch",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.top_k > self.max_top_k:
            raise ValueError(f"top_k {self.top_k} exceeds max_top_k {self.max_top_k}")
        if not 0.0 <= self.batch_window_s <= 1.0:
            raise ValueError(f"batch_window_s must be in [0, 1] seconds, got {self.batch_window_s!r}")
        for name in ("body_timeout_s", "shutdown_timeout_s"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        if self.allowed_hosts is not None and (
            not isinstance(self.allowed_hosts, tuple)
            or not all(isinstance(host, str) and host_name(host) for host in self.allowed_hosts)
        ):
            raise ValueError(f"allowed_hosts must be a tuple of host names or None, got {self.allowed_hosts!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty; give a key or none")
