"""The Service contract: what @endpoint accepts and how classes are loaded."""

from __future__ import annotations

import pytest

import quanta
from quanta.errors import ConfigError, ServiceError, ServiceLoadError
from quanta.service import endpoints, load_service
from tests.helpers import TOY_APP


class Echo(quanta.Service):
    @quanta.endpoint("/echo", max_batch_size=4, max_wait_ms=1)
    def echo(self, items: list) -> list:
        return items

    @echo.sizer
    def size(self, items: list) -> list[int]:
        return [len(i) for i in items]


def test_endpoints_are_read_from_the_class_and_still_call_as_methods():
    specs = endpoints(Echo)
    assert specs["echo"].path == "/echo" and specs["echo"].max_batch_size == 4
    assert specs["echo"].sizer == "size"
    assert Echo().echo([1, 2]) == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": "echo"}, "must start with '/'"),
        ({"path": "/e", "max_batch_size": 0}, "max_batch_size=0"),
        ({"path": "/e", "max_wait_ms": -1}, "max_wait_ms=-1"),
        ({"path": "/e", "api": "grpc"}, "api='grpc'"),
    ],
)
def test_endpoint_arguments_are_checked(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        quanta.endpoint(**kwargs)


def test_classes_that_break_the_contract_are_refused():
    class Empty(quanta.Service):
        pass

    class Twice(quanta.Service):
        @quanta.endpoint("/a")
        def one(self, xs):
            return xs

        @quanta.endpoint("/a")
        def two(self, xs):
            return xs

    with pytest.raises(ServiceError, match="declares no"):
        endpoints(Empty)
    with pytest.raises(ServiceError, match="one path twice"):
        endpoints(Twice)
    with pytest.raises(ServiceError, match="not a subclass"):
        endpoints(dict)


def test_load_service_from_module_and_from_file():
    assert load_service("tests.test_service:Echo") is Echo
    assert load_service(f"{TOY_APP}:Toy").__name__ == "Toy"


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("no_colon", "must look like"),
        ("missing_file.py:X", "does not exist"),
        ("quanta.nonexistent:X", "importing 'quanta.nonexistent' failed"),
        ("tests.test_service:Nope", "has no class 'Nope'"),
    ],
)
def test_load_service_errors_name_the_reference(reference, message):
    with pytest.raises(ServiceLoadError, match=message):
        load_service(reference)
