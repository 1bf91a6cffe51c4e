"""``serve``: the OpenAI-compatible answering service (docs/serve.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from ragcompress.cli.options import (
    BACKEND_OPTION,
    CALIBRATE_OPTION,
    DEVICE_OPTION,
    DTYPE_OPTION,
    FALLBACK_OPTION,
    PRESET_HELP,
    RECOMPUTE_OPTION,
    SELECTION_OPTION,
    STORE_OPTION,
    options_from_flags,
    preset_matches_store,
    quiet_libraries,
    recompute_schedule,
)
from ragcompress.errors import RagCompressError


def serve(
    store: Path = STORE_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (default: this machine only)"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="port (0: a free one, logged at start)"),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="RAGCOMPRESS_API_KEY",
        show_envvar=True,
        help="require `Authorization: Bearer KEY` on every endpoint but /health",
    ),
    allowed_host: list[str] = typer.Option(
        [],
        "--allowed-host",
        help="a name clients reach the service by (Host header; repeatable); other names are refused 400 "
        "(default: localhost, 127.0.0.1, ::1 when --host is loopback, any name otherwise; `*`: any)",
    ),
    preset: str | None = typer.Option(None, "--preset", help=PRESET_HELP),
    queue: int = typer.Option(64, "--queue", min=1, help="requests that may wait while one is answered (then 429)"),
    top_k: int = typer.Option(3, "--top-k", min=1, help="passages retrieved when a request does not say"),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", min=1, help="answer length when a request gives no max_tokens (default 32)"
    ),
    batch: int = typer.Option(
        8, "--batch", min=1, help="concurrent questions decoded together in one batch (1: one at a time)"
    ),
    body_timeout: float = typer.Option(
        30.0, "--body-timeout", min=0.001, help="seconds a request body may take to arrive (then 408)"
    ),
    shutdown_timeout: float = typer.Option(
        300.0,
        "--shutdown-timeout",
        min=0.001,
        help="seconds SIGTERM waits for requests in flight and queued; those left then get 503",
    ),
    recompute: str | None = RECOMPUTE_OPTION,
    selection: str | None = SELECTION_OPTION,
    fallback_margin: float | None = FALLBACK_OPTION,
    calibrate: bool = CALIBRATE_OPTION,
    backend: str | None = BACKEND_OPTION,
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level"),
    dtype: str | None = DTYPE_OPTION,
    device: str | None = DEVICE_OPTION,
) -> None:
    """Serve the store over HTTP: OpenAI-compatible /v1/chat/completions (docs/serve.md).

    ``--recompute``, ``--selection``, ``--fallback-margin`` and ``--backend`` set the service's
    defaults (over ``--preset``'s); a request's ``ragcompress.recompute`` / ``fallback_margin``
    override the first three. Requests on the packed backends are answered one at a time.
    SIGTERM lets in-flight requests finish (for up to ``--shutdown-timeout`` seconds), then exits 0."""
    schedule = recompute_schedule(recompute)
    quiet_libraries()
    try:
        from ragcompress.serve import ServeSettings, create_app, run
        from ragcompress.serve.server import bind
        from ragcompress.serve.settings import LOOPBACK_HOSTS, is_loopback
    except ImportError as exc:
        raise RagCompressError(f"serving needs the serve extra ({exc}): pip install 'ragcompress-kv[serve]'") from None
    from ragcompress.runtime.engine import Engine

    allowed_hosts: tuple[str, ...] | None = None  # another address: any name, as before (warned below)
    if allowed_host or is_loopback(host):  # localhost: only its own names (DNS rebinding)
        allowed_hosts = None if "*" in allowed_host else (*LOOPBACK_HOSTS, host, *allowed_host)
    try:
        settings = ServeSettings(
            api_key=api_key,
            allowed_hosts=allowed_hosts,
            queue_size=queue,
            preset=preset,
            top_k=top_k,
            max_top_k=max(16, top_k),
            max_tokens=max(1024, max_new_tokens or 0),  # the default answer length is always allowed
            max_batch=batch,
            body_timeout_s=body_timeout,
            shutdown_timeout_s=shutdown_timeout,
        )
    except ValueError as exc:
        raise RagCompressError(str(exc)) from None
    if settings.api_key is None and not is_loopback(host):
        typer.echo(
            f"warning: serving on {host} without an API key; anyone who reaches it can query the store", err=True
        )
    options = options_from_flags(
        preset, max_new_tokens, schedule, selection, backend, fallback_margin, calibrate=calibrate
    )
    sock = bind(host, port)  # a port in use fails here, before the model loads
    try:
        engine = Engine.open(store, options=options, dtype=dtype, device=device)
        try:
            preset_matches_store(engine.store.manifest, preset)
            if settings.top_k > len(engine.store):  # as `ask` says: a request reads every passage then
                typer.echo(
                    f"note: --top-k {settings.top_k}, but the store holds {len(engine.store)} passages: requests "
                    "read all of them",
                    err=True,
                )
            app = create_app(engine, settings)  # refuses defaults no request could be answered with
            run(app, host, port, log_level=log_level, sock=sock)
        finally:
            engine.close()
    finally:
        sock.close()
