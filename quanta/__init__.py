"""quanta: run AI models cheaply and serve them at scale."""

from quanta.client import Client
from quanta.errors import QuantaError
from quanta.service import Service, endpoint

__all__ = ["Client", "QuantaError", "Service", "endpoint", "optimize"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `quanta.optimize` needs torch; the gateway and the client import quanta
    # without it, so the package is imported on first use only
    if name == "optimize":
        import importlib

        return importlib.import_module("quanta.optimize")
    raise AttributeError(f"module 'quanta' has no attribute {name!r}")
