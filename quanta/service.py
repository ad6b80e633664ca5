"""The contract a model implements to be served: `Service` and `@endpoint`.

A service is a class. Its `setup()` runs once in each worker process, and
each method marked with `@endpoint` becomes an HTTP route that takes a batch:

    import quanta

    class Doubler(quanta.Service):
        def setup(self):
            self.factor = 2                       # load weights here

        @quanta.endpoint("/double", max_batch_size=32, max_wait_ms=5)
        def double(self, xs: list[float]) -> list[float]:
            return [x * self.factor for x in xs]

`quanta run app.py:Doubler` serves it: `POST /double {"inputs": [1, 2]}`
answers `{"outputs": [2, 4]}`. The gateway collects items from many requests
into one batch, so an endpoint always sees a list and must return a list (or
an array whose first axis is the batch) of the same length, in the same order.

The gateway imports the class to read its endpoints and builds one instance
without calling `setup()`, to run sizers (below). Import heavy libraries, and
load models, in `setup()`, so the gateway stays light.

A sizer is an optional method that runs in the gateway and returns the size of
each input (for text, its token count). The batcher groups inputs of similar
size, so a batch wastes little work on padding:

        @double.sizer
        def size(self, xs: list[float]) -> list[int]:
            return [1 for _ in xs]
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quanta.errors import ConfigError, ServiceError, ServiceLoadError, shorten

__all__ = [
    "API_KINDS",
    "Endpoint",
    "EndpointSpec",
    "Service",
    "endpoint",
    "endpoints",
    "instantiate",
    "load_service",
]

# How an endpoint's HTTP body maps to a batch of inputs and back.
#   json               {"inputs": [...]} -> {"outputs": [...]}
#   openai.embeddings  the OpenAI embeddings API; inputs are strings, outputs vectors
#   search             {"query": ..., "k": ...} over the service's `collection`; the
#                      gateway embeds the queries with the embeddings endpoint, then
#                      sends each shard of the collection items {vector, k, shard,
#                      shards} and merges their {scores, indices}
API_KINDS = ("json", "openai.embeddings", "search")


@dataclass(frozen=True)
class EndpointSpec:
    """What the gateway needs to know about one endpoint."""

    name: str
    path: str
    max_batch_size: int
    max_wait_ms: float
    api: str
    sizer: str | None = None


@dataclass
class Endpoint:
    """A method marked with `@endpoint`; it still calls like the method."""

    function: Callable[..., Any]
    path: str
    max_batch_size: int
    max_wait_ms: float
    api: str
    sizer_name: str | None = field(default=None)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return self.function.__get__(instance, owner)

    def sizer(self, function: Callable[[Any, list], list[int]]) -> Callable:
        """Mark `function` as this endpoint's sizer; see the module docstring."""
        self.sizer_name = function.__name__
        return function

    def spec(self) -> EndpointSpec:
        return EndpointSpec(
            self.name, self.path, self.max_batch_size, self.max_wait_ms, self.api, self.sizer_name
        )


def endpoint(
    path: str, *, max_batch_size: int = 32, max_wait_ms: float = 5.0, api: str = "json"
) -> Callable[[Callable], Endpoint]:
    """Serve the decorated method at `path`, called with batches of inputs.

    Args:
        path: the HTTP route, starting with "/".
        max_batch_size: the most inputs one call receives.
        max_wait_ms: how long the first input of a batch waits for others.
        api: how HTTP bodies map to inputs; one of `API_KINDS`.

    Raises:
        ConfigError: an argument is out of range.
    """
    if not path.startswith("/"):
        raise ConfigError(f"endpoint path {path!r} must start with '/', e.g. '/{path}'")
    if max_batch_size < 1:
        raise ConfigError(f"max_batch_size={max_batch_size} must be at least 1")
    if max_wait_ms < 0:
        raise ConfigError(f"max_wait_ms={max_wait_ms} must be zero or more")
    if api not in API_KINDS:
        raise ConfigError(f"api={api!r} is not one of {API_KINDS}")

    def mark(function: Callable) -> Endpoint:
        return Endpoint(function, path, max_batch_size, max_wait_ms, api)

    return mark


class Service:
    """Base class of everything quanta serves; see the module docstring.

    Subclasses may take keyword options in `__init__` (the CLI passes them),
    must keep `__init__` cheap, and load their model in `setup()`.
    """

    #: The model name clients ask for (the OpenAI `model` field).
    name: str = ""
    #: Other names accepted for the same model.
    aliases: tuple[str, ...] = ()
    #: The length of each vector, for services that serve `api="openai.embeddings"`.
    dimensions: int | None = None

    def setup(self) -> None:
        """Load the model; runs once in each worker before its first batch."""


def endpoints(cls: type) -> dict[str, EndpointSpec]:
    """Return the endpoints a Service class declares, by method name.

    Raises:
        ServiceError: the class is no Service, declares no endpoint, or two
            endpoints share a path.
    """
    if not (inspect.isclass(cls) and issubclass(cls, Service)):
        raise ServiceError(f"{shorten(cls)} is not a subclass of quanta.Service")
    found = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, Endpoint):
                found[name] = value.spec()
    if not found:
        raise ServiceError(f"{cls.__name__} declares no @quanta.endpoint method")
    paths = [spec.path for spec in found.values()]
    if len(set(paths)) != len(paths):
        raise ServiceError(f"{cls.__name__} declares one path twice: {sorted(paths)}")
    return found


def load_service(reference: str) -> type[Service]:
    """Import a Service class from `module:Class` or `path/to/file.py:Class`.

    Raises:
        ServiceLoadError: the module or class cannot be found or imported.
        ServiceError: the class is not a valid Service.
    """
    module_name, sep, class_name = reference.rpartition(":")
    if not sep or not module_name or not class_name:
        raise ServiceLoadError(
            f"service reference {reference!r} must look like 'app.py:MyService' or "
            "'package.module:MyService'"
        )
    try:
        module = _import(module_name)
    except ServiceLoadError:
        raise
    except Exception as exc:
        raise ServiceLoadError(f"importing {module_name!r} failed: {exc!r}") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ServiceLoadError(f"{module_name!r} has no class {class_name!r}")
    endpoints(cls)
    return cls


def instantiate(cls: type[Service], options: dict[str, Any]) -> Service:
    """Build a Service with keyword options, as the gateway and each worker do.

    Raises:
        ConfigError: the options do not fit the class's `__init__`.
    """
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as exc:
        raise ConfigError(
            f"options {shorten(options)} do not fit {cls.__name__}{inspect.signature(cls)}: "
            f"{exc}; pass each as --option key=value"
        ) from None
    return cls(**options)


def _import(name: str) -> Any:
    if not name.endswith(".py"):
        return importlib.import_module(name)
    path = Path(name).resolve()
    if not path.is_file():
        raise ServiceLoadError(f"service file {name!r} does not exist")
    # Registered under a stable name so that the gateway and every worker
    # import the same file as the same module.
    module_name = f"quanta_app_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
