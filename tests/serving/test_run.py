"""`quanta run` serves any Service class, each endpoint as its own route."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest

import quanta
from quanta.client import APIError
from tests.helpers import TOY_APP, Server


@pytest.fixture(scope="module")
def toy_server():
    with Server("run", f"{TOY_APP}:Toy", "--workers", "1", "--api-key", "s3cret") as server:
        yield server


@pytest.fixture(scope="module")
def client(toy_server):
    with quanta.Client(toy_server.url, api_key="s3cret") as client:
        yield client


def test_both_endpoints_answer_with_one_output_per_input(client):
    assert client.call("/double", [1, 2.5, "ab"]) == [2, 5.0, "abab"]
    assert client.call("/stats", [[1, 2, 3], [], [4.5]]) == [[3, 6], [0, 0], [1, 4.5]]


def test_request_larger_than_a_batch_is_split_and_reassembled_in_order(client, toy_server):
    # /double takes 8 per batch: 100 inputs need at least 13 batches
    assert client.call("/double", list(range(100))) == [2 * i for i in range(100)]
    metrics = httpx.get(f"{toy_server.url}/metrics").text
    count = next(
        line
        for line in metrics.splitlines()
        if line.startswith('quanta_batch_size_count{endpoint="/double"}')
    )
    assert float(count.split()[-1]) >= 13


def test_batches_group_inputs_of_similar_size_and_close_at_max_batch_size(client):
    # one request: 4 short words and 8 long ones, sizes in different buckets
    words = ["ab"] * 4 + ["x" * 100] * 8
    batches = client.call("/batch-sizes", words)

    for word, batch in zip(words, batches, strict=True):
        assert all((size > 16) == (len(word) > 16) for size in batch), batches
    # 8 long words with max_batch_size 6 need two batches: one full, one with the rest
    assert sorted({len(b) for b in batches[4:]}) == [2, 6]
    assert batches[0] == [2, 2, 2, 2]


def test_endpoint_exception_gives_500_and_the_worker_keeps_serving(client):
    with pytest.raises(APIError) as raised:
        client.call("/double", [None])
    assert raised.value.status == 500 and "TypeError" in str(raised.value)
    assert client.call("/double", [21]) == [42]


def test_api_key_is_required_on_v1_routes_only(toy_server):
    anonymous = httpx.post(f"{toy_server.url}/double", json={"inputs": [1]})
    wrong = openai.OpenAI(base_url=f"{toy_server.url}/v1", api_key="wrong", max_retries=0)

    assert httpx.get(f"{toy_server.url}/v1/models").status_code == 401
    assert httpx.get(f"{toy_server.url}/v1/models").json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=f"{toy_server.url}/v1", api_key="s3cret")
    assert [m.id for m in right.models.list()] == ["toy"]
    # generic routes and health stay open, as documented
    assert anonymous.status_code == 200
    assert httpx.get(f"{toy_server.url}/healthz").status_code == 200


def test_bad_inputs_body_gets_json_errors(toy_server):
    url = f"{toy_server.url}/double"
    assert httpx.post(url, json={"inputs": []}).status_code == 400
    not_a_list = httpx.post(url, json={"inputs": 3})
    assert not_a_list.status_code == 422
    assert not_a_list.json()["error"]["param"] == "inputs"


def _quanta(*args: str) -> subprocess.CompletedProcess:
    """Run the `quanta` command to its end, as a user would."""
    command = [sys.executable, "-m", "quanta.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_missing_service_class_fails_fast_with_a_clear_message():
    result = _quanta("run", f"{TOY_APP}:Nope", "--port", "0")
    assert result.returncode == 2
    assert "has no class 'Nope'" in result.stderr


def test_unknown_option_fails_fast_naming_the_signature():
    result = _quanta("run", f"{TOY_APP}:Toy", "--option", "nope=1")
    assert result.returncode == 2
    assert "{'nope': 1} do not fit Toy(*, delay" in result.stderr


def test_missing_model_directory_fails_fast_with_a_clear_message(tmp_path):
    result = _quanta("serve", "--model", str(tmp_path / "none"))
    assert result.returncode == 2
    assert "neither a built-in model" in result.stderr and "none" in result.stderr
