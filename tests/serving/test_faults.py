"""Workers that are slow to start, fail, get killed, or outlive their gateway."""

from __future__ import annotations

import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from quanta.bench.corpus import sentences
from tests.helpers import TOY_APP, Server, pid_alive


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _busy_workers(server: Server) -> list[dict]:
    """The workers that have items in flight, as /healthz reports them."""
    workers = httpx.get(f"{server.url}/healthz").json()["workers"]
    return [w for w in workers if w["items_in_flight"]]


def _accepted(server: Server, endpoint: str) -> float:
    """Inputs the gateway has taken for `endpoint`: sent to workers, or waiting."""
    text = httpx.get(f"{server.url}/metrics").text
    total = 0.0
    for name in ("quanta_batch_size_sum", "quanta_queue_depth"):
        match = re.search(rf'^{name}{{endpoint="{re.escape(endpoint)}"}} (\S+)$', text, re.M)
        total += float(match.group(1)) if match else 0.0
    return total


def _wait_until_busy(server: Server, worker_id: str | None = None) -> dict:
    """Wait for a worker (any, or `worker_id`) to run a batch; return it."""

    def busy() -> list[dict]:
        return [w for w in _busy_workers(server) if worker_id in (None, w["id"])]

    return _wait_for(busy, 30, f"worker {worker_id or 'any'} to run a batch")[0]


def test_healthz_is_503_until_a_worker_is_ready(tmp_path):
    gate = tmp_path / "gate"
    with Server("run", f"{TOY_APP}:Toy", "--option", f"gate={gate}", wait_ready=False) as server:
        first = server.wait_http(60)
        assert first.status_code == 503
        assert first.json()["status"] == "starting"
        with ThreadPoolExecutor(1) as pool:
            early = pool.submit(
                httpx.post, f"{server.url}/double", json={"inputs": [1]}, timeout=30
            )
            time.sleep(0.5)
            assert httpx.get(f"{server.url}/healthz").status_code == 503
            gate.touch()
            server.wait_ready(60)
            # a request sent before any worker was ready waits for one instead of failing
            assert early.result().status_code == 200
            assert early.result().json() == {"outputs": [2]}


def test_killed_worker_under_load_loses_no_request():
    options = ["--option", "delay=0.05", "--workers", "2", "--threads-per-worker", "1"]
    with Server("run", f"{TOY_APP}:Toy", *options) as server:
        server.wait_ready(60, workers=2)
        victim = httpx.get(f"{server.url}/healthz").json()["workers"][0]
        results = []

        def client(n: int) -> None:
            with httpx.Client(base_url=server.url, timeout=60) as http:
                for i in range(40):
                    response = http.post("/double", json={"inputs": [n * 1000 + i]})
                    results.append((n * 1000 + i, response.status_code, response.json()))

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(client, n) for n in range(16)]

            # kill the worker while it runs a batch, so the batch must move
            _wait_until_busy(server, victim["id"])
            os.kill(victim["pid"], signal.SIGKILL)
            for future in futures:
                future.result(timeout=120)

        assert len(results) == 16 * 40
        assert all(status == 200 and body == {"outputs": [2 * x]} for x, status, body in results)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "quanta_batch_retries_total 1.0" in metrics

        health = server.wait_ready(60, workers=2)
        pids = {w["pid"] for w in health["workers"]}
        assert victim["pid"] not in pids and len(pids) == 2
        assert "starting a replacement" in server.log()


def test_request_sent_just_after_a_worker_died_is_served_by_another():
    # The send reaches a socket that is already gone, before the pool has seen
    # the process exit; the retry must not pick the same worker again.
    with Server("run", f"{TOY_APP}:Toy", "--workers", "2", "--threads-per-worker", "1") as server:
        for i in range(5):
            victim = server.wait_ready(60, workers=2)["workers"][0]
            os.kill(victim["pid"], signal.SIGKILL)
            time.sleep(0.005)
            response = httpx.post(f"{server.url}/double", json={"inputs": [i]}, timeout=30)
            assert response.json() == {"outputs": [2 * i]}, response.text


def test_killed_embedding_worker_under_load_loses_no_request():
    texts = sentences(160)
    with Server("serve", "--workers", "2", "--threads-per-worker", "1") as server:
        victim = server.wait_ready(90, workers=2)["workers"][0]

        def embed(chunk: list[str]) -> list[tuple[str, int, list]]:
            with httpx.Client(base_url=server.url, timeout=60) as http:
                answers = []
                for text in chunk:
                    body = {"model": "all-MiniLM-L6-v2", "input": text}
                    response = http.post("/v1/embeddings", json=body)
                    vector = response.json()["data"][0]["embedding"] if response.is_success else []
                    answers.append((text, response.status_code, vector))
                return answers

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(embed, texts[i::16]) for i in range(16)]
            _wait_until_busy(server, victim["id"])
            os.kill(victim["pid"], signal.SIGKILL)
            answers = [a for f in futures for a in f.result(timeout=120)]

        assert sorted(t for t, _, _ in answers) == sorted(texts)
        failed = [(t, status) for t, status, _ in answers if status != 200]
        assert not failed, f"{failed}\n{server.log()}"
        norms = np.linalg.norm(np.array([v for _, _, v in answers]), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-3)
        assert "quanta_batch_retries_total 1.0" in httpx.get(f"{server.url}/metrics").text


def test_a_lone_input_is_not_starved_by_a_flood_of_full_batches():
    # one worker, 50 ms a batch: six clients keep full batches of short words
    # waiting all the time, while one long word waits in a bucket of its own
    with Server("run", f"{TOY_APP}:Toy", "--option", "delay=0.05", "--workers", "1") as server:
        flood_until = time.monotonic() + 4

        def flood() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                for _ in range(200):
                    if time.monotonic() > flood_until:
                        return
                    http.post("/batch-sizes", json={"inputs": ["ab"] * 6})

        with ThreadPoolExecutor(6) as pool:
            for _ in range(6):
                pool.submit(flood)
            time.sleep(1)
            started = time.monotonic()
            lone = httpx.post(f"{server.url}/batch-sizes", json={"inputs": ["x" * 100]}, timeout=30)
            waited = time.monotonic() - started

        assert lone.json() == {"outputs": [[100]]}
        # due after max_wait_ms (100 ms), it goes within a few batches, long before
        # the flood ends 3 s later
        assert waited < 2.0, f"the lone input waited {waited:.2f} s behind the flood"


def test_hung_worker_is_killed_and_its_batch_retried_elsewhere():
    options = ["--option", "delay=0.3", "--workers", "2", "--heartbeat-s", "0.1"]
    with Server("run", f"{TOY_APP}:Toy", *options) as server:
        server.wait_ready(60, workers=2)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(
                httpx.post, f"{server.url}/double", json={"inputs": [4]}, timeout=30
            )
            busy = _wait_until_busy(server)
            # a stopped process is alive but silent, as a deadlocked one would be
            os.kill(busy["pid"], signal.SIGSTOP)
            assert answer.result().json() == {"outputs": [8]}
        assert "silent for" in server.log()
        _wait_for(lambda: not pid_alive(busy["pid"]), 10, "the hung worker to be killed")
        server.wait_ready(60, workers=2)


def test_sigterm_stops_gateway_and_workers_and_removes_the_socket():
    with Server("run", f"{TOY_APP}:Toy", "--workers", "2") as server:
        health = server.wait_ready(60, workers=2)
        pids = [w["pid"] for w in health["workers"]]
        socket_dir = server.socket_dir()
        assert os.path.exists(f"{socket_dir}/gateway.sock")

        started = time.monotonic()
        code = server.stop()

        # uvicorn re-raises the signal once it has shut down, as a signalled process should
        assert code in (0, -signal.SIGTERM), server.log()
        assert "all workers stopped" in server.log()
        assert time.monotonic() - started < 15
        assert not any(pid_alive(pid) for pid in [server.process.pid, *pids])
        assert not os.path.exists(socket_dir)


def test_sigterm_lets_requests_in_flight_finish():
    options = ["--option", "delay=0.5", "--workers", "2"]
    with Server("run", f"{TOY_APP}:Toy", *options) as server:
        server.wait_ready(60, workers=2)
        with ThreadPoolExecutor(8) as pool:
            answers = [
                pool.submit(httpx.post, f"{server.url}/double", json={"inputs": [i]}, timeout=30)
                for i in range(8)
            ]
            # every request must have reached the gateway: one still connecting
            # when SIGTERM lands is refused, which is right but not the point here
            _wait_for(lambda: _accepted(server, "/double") >= 8, 30, "all 8 requests to arrive")
            code = server.stop()
            results = [a.result() for a in answers]

        assert code in (0, -signal.SIGTERM), server.log()
        assert [r.json() for r in results] == [{"outputs": [2 * i]} for i in range(8)]


def test_workers_exit_by_themselves_when_the_gateway_is_killed():
    with Server("run", f"{TOY_APP}:Toy", "--workers", "1") as server:
        pid = server.wait_ready(60)["workers"][0]["pid"]
        server.process.kill()
        server.process.wait()
        _wait_for(lambda: not pid_alive(pid), 15, "the orphaned worker to exit")


def test_worker_failing_setup_keeps_health_503_and_is_retried_with_backoff():
    with Server("run", f"{TOY_APP}:Toy", "--option", "fail_setup=true", wait_ready=False) as server:
        _wait_for(lambda: server.log().count("next start in") >= 2, 60, "two failed starts")
        assert httpx.get(f"{server.url}/healthz").status_code == 503
        assert "setup() failed: RuntimeError('setup failed on purpose')" in server.log()
        assert server.process.poll() is None


def test_request_slower_than_the_timeout_gets_503_in_time():
    options = ["--option", "delay=3", "--request-timeout", "1"]
    with Server("run", f"{TOY_APP}:Toy", *options) as server:
        started = time.monotonic()
        response = httpx.post(f"{server.url}/double", json={"inputs": [1]}, timeout=30)
        elapsed = time.monotonic() - started

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "timeout"
    assert elapsed < 3
