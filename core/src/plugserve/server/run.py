"""Run the OpenAI-compatible server with uvicorn.

Shutdown on SIGTERM/SIGINT: /health flips to 503 (draining) and new generation
requests get 503 at once, uvicorn stops accepting connections, in-flight
requests get ``grace_period_s`` to finish, then the remaining ones are cancelled
(which aborts them in the engine) and the engine thread is stopped.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

from .app import DEFAULT_MAX_BODY_BYTES, build_app
from .engine_client import AsyncEngineClient

logger = logging.getLogger(__name__)


def make_server(engine: Any, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                cors_origins: Iterable[str] | None = None, served_model_name: str | None = None,
                max_waiting: int | None = None, grace_period_s: float = 30.0,
                log_level: str = "info", access_log: bool = False):
    """Build (but do not start) a ``uvicorn.Server`` serving ``engine``.

    ``engine`` is an engine or a zero-argument factory returning one (loaded on
    the engine thread while /health answers 503).  Useful directly in tests:
    ``server.run()`` in a thread, poll ``server.started``, set ``should_exit``.
    """
    import uvicorn

    client = AsyncEngineClient(engine, max_waiting=max_waiting)
    app = build_app(client, api_key=api_key, max_body_bytes=max_body_bytes,
                    cors_origins=cors_origins, served_model_name=served_model_name)

    class _DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Flip readiness first so load balancers and new requests see 503
            # while uvicorn lets in-flight requests finish.
            client.begin_drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=grace_period_s, lifespan="on")
    server = _DrainingServer(config)
    server.engine_client = client  # for callers that want stats / readiness
    return server


def serve(engine: Any, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          **kwargs: Any) -> None:
    """Serve ``engine`` until SIGTERM/SIGINT; see ``make_server`` for the options."""
    make_server(engine, host, port, api_key, **kwargs).run()
