"""quanta: run AI models cheaply and serve them at scale."""

from quanta.client import Client
from quanta.errors import QuantaError
from quanta.service import Service, endpoint

__all__ = ["Client", "QuantaError", "Service", "endpoint"]
__version__ = "0.1.0"
