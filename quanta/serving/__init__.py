"""Serving: the HTTP gateway, the batcher, and the pool of worker processes."""

from typing import Any

from quanta.serving.config import BUILTIN_SERVICE, ServerConfig

__all__ = ["BUILTIN_SERVICE", "ServerConfig", "create_app"]


def __getattr__(name: str) -> Any:
    # Imported on first use: worker processes import this package too, and
    # they need none of the HTTP stack that the gateway brings in.
    if name == "create_app":
        from quanta.serving.gateway import create_app

        return create_app
    raise AttributeError(f"module 'quanta.serving' has no attribute {name!r}")
