"""OpenAI-compatible HTTP server for plugserve.

Names are resolved lazily so ``import plugserve.server`` (and ``import
plugserve``) does not pull in FastAPI/uvicorn until a server is actually built.
"""
from __future__ import annotations

_EXPORTS = {
    "build_app": ".app",
    "APIError": ".app",
    "AsyncEngineClient": ".engine_client",
    "serve": ".run",
    "make_server": ".run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
