"""The gateway's /v1/search route: embed the queries, ask every shard, merge.

The route serves an endpoint declared with `api="search"` (see
`quanta.service`). Its service must also serve embeddings and hold a
`collection` with `ids` and `texts`; the workers return row indices and the
gateway turns them into ids and texts, so the texts never cross the wire.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from starlette.responses import Response

from quanta.errors import ServiceError
from quanta.kernels.merge import merge_topk
from quanta.service import EndpointSpec, Service
from quanta.serving.api import APIError, JSONResponse, SearchRequest

__all__ = ["add_search_route", "check_search_service"]


def check_search_service(service: Service, specs: dict[str, EndpointSpec]) -> None:
    """Refuse a search endpoint whose service lacks what the route needs.

    Raises:
        ServiceError: no embeddings endpoint, or no `collection` of ids and texts.
    """
    name = type(service).__name__
    if not any(spec.api == "openai.embeddings" for spec in specs.values()):
        raise ServiceError(f"{name} serves search but no openai.embeddings endpoint to embed with")
    collection = getattr(service, "collection", None)
    if not (hasattr(collection, "ids") and hasattr(collection, "texts")):
        raise ServiceError(f"{name} serves search but has no `collection` with ids and texts")


def add_search_route(app: FastAPI, gateway, spec: EndpointSpec) -> None:
    embeddings = next(s for s in gateway.specs.values() if s.api == "openai.embeddings")
    collection = gateway.service.collection

    async def search(body: SearchRequest) -> Response:
        # a query of only whitespace would find arbitrary texts: refuse it too
        queries = gateway.check_texts(body.query, "query", blank=False)
        k = min(10, len(collection)) if body.k is None else body.k
        if not 1 <= k <= len(collection):
            message = (
                f"k={k} is out of range: the collection holds {len(collection)} texts, "
                f"so use 1 to {len(collection)}"
            )
            raise APIError(400, message, code="invalid_k", param="k")

        sizes = await gateway.sizes(embeddings, queries)
        vectors = await gateway.collect(embeddings, queries, sizes)
        batchers = gateway.shard_batchers[spec.name]
        items = [
            [
                {"vector": vector.tolist(), "k": k, "shard": shard, "shards": len(batchers)}
                for vector in vectors
            ]
            for shard in range(len(batchers))
        ]
        answers = await asyncio.gather(
            *(
                gateway.collect(spec, part, None, batcher)
                for part, batcher in zip(items, batchers, strict=True)
            )
        )
        data = []
        for index, query in enumerate(queries):
            parts = [(answer[index]["scores"], answer[index]["indices"]) for answer in answers]
            scores, rows = merge_topk(parts, k)
            results = [
                {"id": collection.ids[row], "text": collection.texts[row], "score": float(score)}
                for score, row in zip(scores, rows, strict=True)
            ]
            data.append(
                {"object": "search.result", "index": index, "query": query, "results": results}
            )
        return JSONResponse({"object": "list", "data": data, "model": gateway.model_id})

    app.add_api_route(
        spec.path,
        search,
        methods=["POST"],
        tags=["Search"],
        summary="The k texts of the collection nearest to each query",
    )
