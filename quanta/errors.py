"""The errors quanta raises.

Every error the library raises on purpose derives from `QuantaError`, so a
caller can catch them all in one place. Misuse by a caller also derives from
the matching built-in type, so `except ValueError` keeps working:

    QuantaError
     ├── ConfigError(ValueError)      a bad option, flag or argument
     ├── ServiceError                 a Service class that breaks the contract
     │    └── ServiceLoadError        `module:Class` or `file.py:Class` cannot be loaded
     ├── ModelError                   model files missing or unreadable
     ├── OptimizeError                a model quanta cannot optimize, or a budget no recipe meets
     ├── TransportError               a malformed or undeliverable message
     └── ServingError                 a request the server could not complete
          ├── WorkerLostError         the worker died and the batch could not be retried
          └── BatchFailedError        the endpoint raised while running the batch

A message says what was wrong, shows the offending value and says how to fix it.
"""

from __future__ import annotations

__all__ = [
    "QuantaError",
    "ConfigError",
    "ServiceError",
    "ServiceLoadError",
    "ModelError",
    "OptimizeError",
    "TransportError",
    "ServingError",
    "WorkerLostError",
    "BatchFailedError",
    "shorten",
]


def shorten(value: object, limit: int = 80) -> str:
    """Return `repr(value)` cut to `limit` characters, for use in messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class QuantaError(Exception):
    """The root of every error quanta raises on purpose."""


class ConfigError(QuantaError, ValueError):
    """An option, flag or argument has a value quanta cannot use."""


class ServiceError(QuantaError, TypeError):
    """A Service class does not follow the contract of `quanta.Service`."""


class ServiceLoadError(ServiceError):
    """A `module:Class` or `path.py:Class` reference cannot be imported."""


class ModelError(QuantaError):
    """Model files are missing, incomplete or unreadable."""


class OptimizeError(QuantaError):
    """A model cannot be optimized as asked: nothing to change, or no way to meet the budget."""


class TransportError(QuantaError):
    """A message on the wire is malformed or cannot be delivered."""


class ServingError(QuantaError):
    """The server could not complete a request."""


class WorkerLostError(ServingError):
    """The worker running a batch died, and the batch could not be retried."""


class BatchFailedError(ServingError):
    """The endpoint raised an exception while running a batch."""
