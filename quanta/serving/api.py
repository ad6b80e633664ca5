"""The HTTP shapes: request bodies, the OpenAI error format, embedding responses.

Every error leaves the gateway as OpenAI clients expect it:

    {"error": {"message": "...", "type": "invalid_request_error",
               "code": "empty_input", "param": "input"}}
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.responses import Response

__all__ = [
    "APIError",
    "EmbeddingRequest",
    "InputsRequest",
    "SearchRequest",
    "JSONResponse",
    "embedding_response",
    "error_body",
    "error_response",
]

# OpenAI's error types by HTTP status: the client libraries map on these.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


class JSONResponse(Response):
    """A JSON response encoded by orjson, which writes numpy arrays directly."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=_to_list, option=orjson.OPT_SERIALIZE_NUMPY)


def _to_list(value: Any) -> Any:
    # what orjson cannot write natively: torch tensors, numpy scalars, odd layouts
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class APIError(Exception):
    """Raised in a route to answer with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def error_response(
    status: int, message: str, code: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status, headers=headers)


class EmbeddingRequest(BaseModel):
    """The body of POST /v1/embeddings, as in OpenAI's API."""

    model_config = ConfigDict(extra="ignore")

    input: StrictStr | list[StrictStr] = Field(
        description="A text, or a list of texts, to embed. Texts are cut to 256 tokens."
    )
    model: StrictStr = Field(description="The model to use: all-MiniLM-L6-v2.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: lists of numbers; base64: little-endian float32 bytes."
    )
    dimensions: StrictInt | None = Field(
        None,
        description="Keep the first N dimensions of each embedding and rescale to unit length.",
    )
    user: StrictStr | None = Field(None, description="Ignored; accepted for compatibility.")


class SearchRequest(BaseModel):
    """The body of POST /v1/search."""

    model_config = ConfigDict(extra="ignore")

    query: StrictStr | list[StrictStr] = Field(
        description="A text, or a list of texts, to find the nearest texts of the collection for."
    )
    k: StrictInt | None = Field(
        None, description="Results per query, 1 to the collection size; 10 (or all) by default."
    )


class InputsRequest(BaseModel):
    """The body of a generic endpoint: a batch of JSON inputs."""

    inputs: list[Any] = Field(description="The inputs, one output is returned for each.")


def embedding_response(
    vectors: list[np.ndarray],
    *,
    model: str,
    prompt_tokens: int,
    encoding_format: str,
    dimensions: int | None,
) -> JSONResponse:
    """Build the OpenAI embeddings response for one row vector per input."""
    data = []
    for index, vector in enumerate(vectors):
        if dimensions is not None:
            # A shortened embedding is rescaled to unit length, as OpenAI does.
            vector = vector[:dimensions]
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        vector = np.ascontiguousarray(vector, dtype="<f4")
        embedding = base64.b64encode(vector).decode() if encoding_format == "base64" else vector
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return JSONResponse({"object": "list", "data": data, "model": model, "usage": usage})
