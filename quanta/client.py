"""A small synchronous client for a quanta server.

>>> import quanta
>>> client = quanta.Client("http://127.0.0.1:8000")
>>> client.embed(["hello world"]).shape            # doctest: +SKIP
(1, 384)
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from quanta.errors import ServingError

__all__ = ["Client", "APIError"]


class APIError(ServingError):
    """The server answered with an error; `status` and `code` say which."""

    def __init__(self, status: int, message: str, code: str | None):
        super().__init__(f"HTTP {status} ({code}): {message}")
        self.status, self.code = status, code


class Client:
    """Talks to one quanta server over HTTP, keeping its connection open.

    Args:
        base_url: the server, e.g. "http://127.0.0.1:8000".
        api_key: sent as a bearer token if the server requires one.
        timeout: seconds to wait for each response.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
    ):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, body: dict) -> Any:
        response = self._http.post(path, json=body)
        if response.status_code != 200:
            try:
                error = response.json()["error"]
                raise APIError(response.status_code, error["message"], error.get("code"))
            except (ValueError, KeyError, TypeError):
                raise APIError(response.status_code, response.text[:200], None) from None
        return response.json()

    def embed(
        self,
        texts: str | Sequence[str],
        *,
        model: str = "all-MiniLM-L6-v2",
        dimensions: int | None = None,
    ) -> np.ndarray:
        """Embed texts; returns a float32 array with one row per text.

        Raises:
            APIError: the server refused the request (the message says why).
        """
        batch = [texts] if isinstance(texts, str) else list(texts)
        body: dict[str, Any] = {"model": model, "input": batch, "encoding_format": "base64"}
        if dimensions is not None:
            body["dimensions"] = dimensions
        data = self._post("/v1/embeddings", body)["data"]
        rows = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data]
        return np.stack(rows)

    def call(self, path: str, inputs: Sequence[Any]) -> list:
        """Call a generic endpoint of a `quanta run` server with a batch of inputs."""
        return self._post(path, {"inputs": list(inputs)})["outputs"]

    def health(self) -> dict:
        """The server's /healthz body (its status code is in the `status` field)."""
        return self._http.get("/healthz").json()
