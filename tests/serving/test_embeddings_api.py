"""POST /v1/embeddings against a real `quanta serve`, compared with sentence-transformers."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

import quanta
from quanta.bench.corpus import sentences as stdlib_sentences

MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def sentences():
    return stdlib_sentences(96)


@pytest.fixture(scope="module")
def reference(reference_model, sentences):
    return reference_model.encode(sentences, normalize_embeddings=True, batch_size=32)


def test_openai_client_embeddings_match_sentence_transformers(minilm_server, sentences, reference):
    client = openai.OpenAI(base_url=f"{minilm_server.url}/v1", api_key="unused")
    response = client.embeddings.create(model=MODEL, input=sentences)

    got = np.array([d.embedding for d in response.data], dtype=np.float32)
    assert [d.index for d in response.data] == list(range(len(sentences)))
    assert got.shape == (len(sentences), 384)
    cosine = (got * reference).sum(axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() >= 0.999, f"worst sentence: {sentences[int(cosine.argmin())]!r}"
    assert response.model == MODEL
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(sentences)


def test_quanta_client_embeddings_match_sentence_transformers(minilm_server, sentences, reference):
    with quanta.Client(minilm_server.url) as client:
        got = client.embed(sentences)
        single = client.embed("hello world")

    assert got.dtype == np.float32 and got.shape == (len(sentences), 384)
    assert ((got * reference).sum(axis=1) >= 0.999).all()
    assert single.shape == (1, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)


def test_float_and_base64_formats_agree(minilm_server):
    body = {"model": MODEL, "input": ["good morning"]}
    as_float = httpx.post(f"{minilm_server.url}/v1/embeddings", json=body).json()
    as_b64 = httpx.post(
        f"{minilm_server.url}/v1/embeddings", json={**body, "encoding_format": "base64"}
    ).json()

    vector = np.frombuffer(base64.b64decode(as_b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, as_float["data"][0]["embedding"], rtol=1e-6)
    assert as_float["object"] == "list" and as_float["data"][0]["object"] == "embedding"


def test_dimensions_shortens_and_renormalizes(minilm_server):
    with quanta.Client(minilm_server.url) as client:
        full = client.embed(["a short sentence"])[0]
        short = client.embed(["a short sentence"], dimensions=64)[0]

    assert short.shape == (64,)
    np.testing.assert_allclose(short, full[:64] / np.linalg.norm(full[:64]), atol=1e-5)


def test_long_text_is_truncated_and_usage_counts_embedded_tokens(minilm_server, reference_model):
    long_text = "the quick brown fox jumps over the lazy dog " * 100
    response = httpx.post(
        f"{minilm_server.url}/v1/embeddings", json={"model": MODEL, "input": long_text}
    ).json()

    assert response["usage"]["prompt_tokens"] == 256
    expected = reference_model.encode([long_text], normalize_embeddings=True)[0]
    assert float(np.dot(response["data"][0]["embedding"], expected)) >= 0.999


def test_request_larger_than_a_batch_comes_back_in_order(minilm_server):
    # 150 inputs of different lengths span several batches and size buckets
    texts = [f"sentence number {i} " + "word " * (i % 37) for i in range(150)]
    with quanta.Client(minilm_server.url) as client:
        together = client.embed(texts)
        apart = np.concatenate([client.embed([t]) for t in texts[::15]])

    np.testing.assert_allclose(together[::15], apart, atol=2e-2)
    assert ((together[::15] * apart).sum(axis=1) >= 0.999).all()


def test_models_lists_the_builtin_model(minilm_server):
    client = openai.OpenAI(base_url=f"{minilm_server.url}/v1", api_key="unused")
    assert MODEL in [m.id for m in client.models.list()]


def test_metrics_count_requests_batches_and_workers(minilm_server):
    httpx.post(f"{minilm_server.url}/v1/embeddings", json={"model": MODEL, "input": "x y z"})
    text = httpx.get(f"{minilm_server.url}/metrics").text

    assert 'quanta_requests_total{route="/v1/embeddings",status="200"}' in text
    assert "quanta_request_latency_seconds_bucket" in text
    assert 'quanta_batch_size_count{endpoint="/v1/embeddings"}' in text
    assert 'quanta_queue_depth{endpoint="/v1/embeddings"}' in text
    assert "quanta_ready_workers 1.0" in text


def test_precision_choice_is_logged(minilm_server):
    assert "precision auto: " in minilm_server.log()


def test_docs_page_is_served(minilm_server):
    assert httpx.get(f"{minilm_server.url}/docs").status_code == 200
    schema = httpx.get(f"{minilm_server.url}/openapi.json").json()
    assert "/v1/embeddings" in schema["paths"]
