"""`quanta serve --index FILE`: /v1/search over a collection, sharded over two workers."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest

from quanta.models.collection import read_collection
from quanta.optimize.corpus import docstring_paragraphs
from tests.helpers import ROOT, Server

PARAGRAPHS = 300


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    path = tmp_path_factory.mktemp("index") / "stdlib.jsonl"
    lines = [
        json.dumps({"id": f"doc-{i}", "text": p}) for i, p in enumerate(docstring_paragraphs())
    ]
    path.write_text("\n".join(lines[:PARAGRAPHS]) + "\n")
    return path


@pytest.fixture(scope="module")
def search_server(collection):
    with Server("serve", "--index", str(collection), "--workers", "2", timeout_s=180) as server:
        server.wait_ready(workers=2)
        yield server


def search(server: Server, query, k: int = 3) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/search", json={"query": query, "k": k}, timeout=30)


def test_each_paragraph_finds_itself_first(search_server, collection):
    texts = read_collection(collection).texts
    for i in range(0, PARAGRAPHS, PARAGRAPHS // 50)[:50]:
        response = search(search_server, texts[i])
        assert response.status_code == 200, response.text
        (answer,) = response.json()["data"]
        best = answer["results"][0]
        assert best["id"] == f"doc-{i}" and best["text"] == texts[i]
        assert best["score"] > 0.99
        scores = [r["score"] for r in answer["results"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 3


def test_results_equal_brute_force_over_both_shards(search_server, collection):
    vectors = np.load(f"{collection}.vectors.npy")
    queries = ["how to read a file line by line", "start a new thread", "parse a date string"]
    embedded = httpx.post(
        f"{search_server.url}/v1/embeddings",
        json={"input": queries, "model": "all-MiniLM-L6-v2"},
        timeout=30,
    ).json()["data"]
    response = search(search_server, queries, k=20)
    assert response.status_code == 200, response.text
    found = []
    for query, embedding, answer in zip(queries, embedded, response.json()["data"], strict=True):
        assert answer["query"] == query
        exact = np.argsort(-(vectors @ np.asarray(embedding["embedding"], np.float32)))[:20]
        got = [int(r["id"].removeprefix("doc-")) for r in answer["results"]]
        # rows from both halves of the collection: the shards were merged
        assert got == exact.tolist()
        found += got
    # the answers hold rows of both shards (each worker holds one half)
    assert min(found) < PARAGRAPHS // 2 <= max(found)


@pytest.mark.parametrize(
    ("body", "status", "code", "needle"),
    [
        ({"query": "x", "k": 0}, 400, "invalid_k", "k=0 is out of range"),
        ({"query": "x", "k": PARAGRAPHS + 1}, 400, "invalid_k", f"use 1 to {PARAGRAPHS}"),
        ({"query": "", "k": 1}, 400, "empty_input", "query is an empty string"),
        ({"query": ["ok", "  "], "k": 1}, 400, "empty_input", "query[1] is an empty string"),
        ({"query": [], "k": 1}, 400, "empty_input", "query is an empty list"),
        ({"query": "x", "k": "3"}, 422, "invalid_type", "expected an integer"),
        ({"k": 3}, 422, "invalid_type", "'query' is required"),
        ({"query": 5}, 422, "invalid_type", "expected a string or a list of strings"),
    ],
)
def test_bad_search_input_gets_a_json_error(search_server, body, status, code, needle):
    response = httpx.post(f"{search_server.url}/v1/search", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and needle in error["message"]
    assert search(search_server, "still serving", k=1).status_code == 200


def test_a_restart_maps_the_cached_vectors_instead_of_embedding(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("open a file for reading\n\nsort a list in place\nsend bytes on a socket\n")
    with Server("serve", "--index", str(path), "--workers", "1", timeout_s=180) as first:
        response = search(first, "sort a list in place", k=3)
        assert "embedded 3 texts" in first.log()
    cached = path.with_name("notes.txt.vectors.npy").stat().st_mtime_ns
    with Server("serve", "--index", str(path), "--workers", "1", timeout_s=180) as second:
        again = search(second, "sort a list in place", k=3)
        assert "found current vectors of 3 texts" in second.log()
    assert path.with_name("notes.txt.vectors.npy").stat().st_mtime_ns == cached
    # a text file's ids are its line numbers; the blank line 2 is skipped
    assert [r["id"] for r in response.json()["data"][0]["results"]][0] == 3
    assert again.json() == response.json()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "does not exist"),
        ('{"id": 1, "text": "fine"}\n\n{"id": 2, "text": "also fine"\n', "bad.jsonl line 3 is not"),
        ('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n', "line 2 repeats the id 1 of line 1"),
        ('{"id": 1}\n', 'line 1 has no non-empty string "text"'),
    ],
)
def test_a_bad_index_file_stops_the_server_with_its_line(tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    done = subprocess.run(
        [sys.executable, "-m", "quanta.cli", "serve", "--index", str(path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert needle in done.stderr
