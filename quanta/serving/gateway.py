"""The gateway: the HTTP front of a server, one process, no model inside.

It validates each request and answers bad input itself, hands the inputs to
the batcher of their endpoint, and waits (at most `request_timeout_s`) for
the outputs. The gateway imports the Service class only to read its endpoints
and run its sizers; `setup()` and the model live in the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from quanta.errors import BatchFailedError, ServiceError, ServingError, shorten
from quanta.service import EndpointSpec, Service, endpoints, instantiate, load_service
from quanta.serving.api import (
    APIError,
    EmbeddingRequest,
    InputsRequest,
    JSONResponse,
    embedding_response,
    error_response,
)
from quanta.serving.batcher import Batcher, QueueFullError
from quanta.serving.config import ServerConfig
from quanta.serving.metrics import Metrics
from quanta.serving.middleware import APIKeyMiddleware, BodyLimitMiddleware, MetricsMiddleware
from quanta.serving.pool import WorkerPool
from quanta.serving.search import add_search_route, check_search_service

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

# What each field takes, for messages about bodies that break the schema.
_EXPECTED = {
    "input": "expected a string or a list of strings",
    "model": "expected the model's name as a string",
    "inputs": "expected a list of inputs",
    "query": "expected a string or a list of strings",
    "k": "expected an integer",
}

# Sizing this many inputs or more runs in a thread, off the event loop.
_SIZE_IN_THREAD = 64


class Gateway:
    """The state behind the routes: the service, its endpoints, pool and batchers."""

    def __init__(self, config: ServerConfig):
        self.config = config
        cls = load_service(config.service)
        self.service: Service = instantiate(cls, config.options)
        self.model_names = {n for n in (cls.name, *cls.aliases) if n} or {cls.__name__}
        self.model_id = cls.name or cls.__name__
        overrides = {"max_batch_size": config.max_batch_size, "max_wait_ms": config.max_wait_ms}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        self.specs = {
            name: dataclasses.replace(spec, **overrides) for name, spec in endpoints(cls).items()
        }
        for spec in self.specs.values():
            if spec.api == "openai.embeddings" and not isinstance(cls.dimensions, int):
                raise ServiceError(f"{cls.__name__} serves embeddings but sets no `dimensions`")
            if spec.api == "search":
                check_search_service(self.service, self.specs)
        self.metrics = Metrics()
        self.pool: WorkerPool | None = None
        self.batchers: dict[str, Batcher] = {}
        # A search endpoint has one batcher per shard of its collection.
        self.shard_batchers: dict[str, list[Batcher]] = {}

    async def start(self) -> None:
        self.pool = WorkerPool(self.config, self.metrics)
        await self.pool.start()
        for name, spec in self.specs.items():
            if spec.api == "search":
                shards = max(1, min(self.config.worker_count, len(self.service.collection)))
                self.shard_batchers[name] = [self._batcher(spec) for _ in range(shards)]
            else:
                self.batchers[name] = self._batcher(spec)

    def _batcher(self, spec: EndpointSpec) -> Batcher:
        batcher = Batcher(spec, self.pool, self.metrics, max_queue=self.config.max_queue)
        batcher.start()
        return batcher

    async def stop(self) -> None:
        shard_batchers = [b for group in self.shard_batchers.values() for b in group]
        for batcher in [*self.batchers.values(), *shard_batchers]:
            await batcher.stop()
        if self.pool is not None:
            await self.pool.stop()

    async def sizes(self, spec: EndpointSpec, values: list) -> list[int] | None:
        if spec.sizer is None:
            return None
        sizer = getattr(self.service, spec.sizer)
        if len(values) >= _SIZE_IN_THREAD:
            sizes = await asyncio.to_thread(sizer, values)
        else:
            sizes = sizer(values)
        if len(sizes) != len(values):
            raise ServiceError(
                f"sizer {spec.sizer} gave {len(sizes)} sizes for {len(values)} inputs"
            )
        return sizes

    async def collect(
        self,
        spec: EndpointSpec,
        values: list,
        sizes: list[int] | None,
        batcher: Batcher | None = None,
    ) -> list:
        """Queue the inputs (on the endpoint's batcher by default) and wait for their outputs."""
        batcher = batcher or self.batchers[spec.name]
        try:
            futures = batcher.submit(values, sizes)
        except QueueFullError as exc:
            raise APIError(503, str(exc), code="queue_full") from exc
        timeout = self.config.request_timeout_s
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), timeout)
        except TimeoutError:
            message = f"no answer within the request timeout of {timeout:g} s; retry later"
            raise APIError(503, message, code="timeout") from None
        except BatchFailedError as exc:
            raise APIError(500, str(exc), code="endpoint_failed") from exc
        except ServingError as exc:
            raise APIError(503, f"{exc}; retry the request", code="worker_lost") from exc
        finally:
            for future in futures:
                future.cancel()

    def check_texts(self, given: str | list[str], field: str, *, blank: bool = True) -> list[str]:
        """The texts of a body field that is a string or a list of them, checked.

        Raises:
            APIError: no texts, too many, or an empty one (or, unless `blank`,
                one of only whitespace).
        """
        texts = [given] if isinstance(given, str) else given
        self.check_count(len(texts), field)
        for i, text in enumerate(texts):
            if not (text if blank else text.strip()):
                where = field if isinstance(given, str) else f"{field}[{i}]"
                raise APIError(
                    400,
                    f"{where} is an empty string; every text needs a character",
                    code="empty_input",
                    param=field,
                )
        return texts

    def check_count(self, count: int, field: str) -> None:
        if count == 0:
            raise APIError(
                400,
                f"{field} is an empty list; send at least one item",
                code="empty_input",
                param=field,
            )
        if count > self.config.max_inputs:
            message = (
                f"{field} has {count} items, more than the limit of "
                f"{self.config.max_inputs}; split the request or raise --max-inputs"
            )
            raise APIError(413, message, code="too_many_inputs", param=field)


def _add_embeddings_route(app: FastAPI, gateway: Gateway, spec: EndpointSpec) -> None:
    dimensions = type(gateway.service).dimensions

    async def create_embeddings(body: EmbeddingRequest) -> Response:
        if body.model not in gateway.model_names:
            message = (
                f"model {body.model!r} does not exist; this server serves "
                f"{sorted(gateway.model_names)}"
            )
            raise APIError(404, message, code="model_not_found", param="model")
        texts = gateway.check_texts(body.input, "input")
        if body.dimensions is not None and not 1 <= body.dimensions <= dimensions:
            message = f"dimensions={body.dimensions} is out of range: use 1 to {dimensions}"
            raise APIError(400, message, code="invalid_dimensions", param="dimensions")

        sizes = await gateway.sizes(spec, texts)
        vectors = await gateway.collect(spec, texts, sizes)
        return embedding_response(
            vectors,
            model=body.model,
            prompt_tokens=sum(sizes or []),
            encoding_format=body.encoding_format,
            dimensions=body.dimensions,
        )

    app.add_api_route(
        spec.path,
        create_embeddings,
        methods=["POST"],
        tags=["OpenAI"],
        summary="Create embeddings (OpenAI-compatible)",
    )


def _add_inputs_route(app: FastAPI, gateway: Gateway, spec: EndpointSpec) -> None:
    async def call_endpoint(body: InputsRequest) -> Response:
        gateway.check_count(len(body.inputs), "inputs")
        sizes = await gateway.sizes(spec, body.inputs)
        outputs = await gateway.collect(spec, body.inputs, sizes)
        return JSONResponse({"outputs": outputs})

    app.add_api_route(
        spec.path,
        call_endpoint,
        methods=["POST"],
        name=spec.name,
        summary=f"{spec.name}: one output per input",
    )


def _add_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc.status, exc.message, exc.code, exc.param)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        if any(e["type"] == "json_invalid" for e in errors):
            return error_response(400, "the request body is not valid JSON", "invalid_json")
        # Report the first field at fault; a union type (input) fails once per
        # member, so its own description says more than pydantic's messages.
        error = errors[0]
        field = str(error["loc"][1]) if len(error["loc"]) > 1 else "body"
        expected = _EXPECTED.get(field, error["msg"][0].lower() + error["msg"][1:])
        message = f"invalid {field!r}: {expected} (got {shorten(error.get('input'), 60)})"
        if error["type"] == "missing":
            message = f"{field!r} is required: {_EXPECTED.get(field, 'add it to the body')}"
        return error_response(422, message, "invalid_type", field)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return error_response(exc.status_code, message, code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("request %s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")


def create_app(config: ServerConfig) -> FastAPI:
    """Build the gateway's ASGI app; its workers start with the app's lifespan.

    Raises:
        QuantaError: the service cannot be loaded or its options are invalid.
    """
    gateway = Gateway(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(
        title=f"quanta: {gateway.model_id}", lifespan=lifespan, default_response_class=JSONResponse
    )
    app.state.gateway = gateway
    _add_exception_handlers(app)
    for spec in gateway.specs.values():
        if spec.api == "openai.embeddings":
            _add_embeddings_route(app, gateway, spec)
        elif spec.api == "search":
            add_search_route(app, gateway, spec)
        else:
            _add_inputs_route(app, gateway, spec)

    @app.get("/v1/models", tags=["OpenAI"], summary="List the served models")
    async def list_models() -> Response:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "quanta"}
            for name in sorted(gateway.model_names)
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/healthz", summary="200 once a worker is ready, 503 before")
    async def health() -> Response:
        pool = gateway.pool
        ready = pool.ready_count if pool else 0
        body: dict[str, Any] = {
            "status": "ok" if ready else "starting",
            "ready_workers": ready,
            "workers": pool.describe() if pool else [],
        }
        return JSONResponse(body, 200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # Outermost first: count everything, refuse strangers before reading their body.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    routes = {spec.path for spec in gateway.specs.values()} | {"/v1/models", "/healthz", "/metrics"}
    app.add_middleware(MetricsMiddleware, metrics=gateway.metrics, routes=routes)
    return app
