"""Every kind of bad input gets its status and an OpenAI-shaped JSON error."""

from __future__ import annotations

import httpx
import openai
import pytest

MODEL = "all-MiniLM-L6-v2"


def _post(server, body=None, content=None):
    headers = {"content-type": "application/json"}
    return httpx.post(f"{server.url}/v1/embeddings", json=body, content=content, headers=headers)


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"model": MODEL, "input": []}, 400, "empty_input", "input"),
        ({"model": MODEL, "input": ""}, 400, "empty_input", "input"),
        ({"model": MODEL, "input": ["ok", ""]}, 400, "empty_input", "input"),
        ({"model": MODEL, "input": 5}, 422, "invalid_type", "input"),
        ({"model": MODEL, "input": [1, 2]}, 422, "invalid_type", "input"),
        ({"model": MODEL, "input": [["nested"]]}, 422, "invalid_type", "input"),
        ({"model": MODEL}, 422, "invalid_type", "input"),
        ({"input": "hi"}, 422, "invalid_type", "model"),
        (
            {"model": MODEL, "input": "hi", "encoding_format": "hex"},
            422,
            "invalid_type",
            "encoding_format",
        ),
        ({"model": MODEL, "input": "hi", "dimensions": "many"}, 422, "invalid_type", "dimensions"),
        ({"model": MODEL, "input": "hi", "dimensions": 0}, 400, "invalid_dimensions", "dimensions"),
        (
            {"model": MODEL, "input": "hi", "dimensions": 385},
            400,
            "invalid_dimensions",
            "dimensions",
        ),
        ({"model": "gpt-4", "input": "hi"}, 404, "model_not_found", "model"),
        ({"model": MODEL, "input": ["x"] * 301}, 413, "too_many_inputs", "input"),
    ],
)
def test_bad_body_gets_status_and_json_error(minilm_server, body, status, code, param):
    response = _post(minilm_server, body)

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert param in error["message"]


def test_body_over_the_limit_gets_413(minilm_server):
    response = _post(minilm_server, {"model": MODEL, "input": ["word " * 300_000]})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


def test_invalid_json_gets_400(minilm_server):
    response = _post(minilm_server, content=b'{"model": "all-MiniLM')
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_unknown_route_and_method_get_json_errors(minilm_server):
    missing = httpx.get(f"{minilm_server.url}/v1/nothing")
    wrong_method = httpx.get(f"{minilm_server.url}/v1/embeddings")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405


def test_openai_client_raises_its_own_errors(minilm_server):
    client = openai.OpenAI(base_url=f"{minilm_server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.embeddings.create(model=MODEL, input=[])
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.embeddings.create(model="gpt-4", input="hi")


def test_server_still_serves_after_bad_input(minilm_server):
    _post(minilm_server, content=b"\xff\xfe garbage")
    response = _post(minilm_server, {"model": MODEL, "input": "still here"})
    assert response.status_code == 200
