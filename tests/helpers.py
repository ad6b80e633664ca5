"""Test helpers: real servers in subprocesses, and real text to embed."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TOY_APP = str(ROOT / "tests" / "serving" / "toy_app.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `quanta` server in a subprocess on a free loopback port; stops on exit."""

    def __init__(self, *args: str, wait_ready: bool = True, timeout_s: float = 90.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="quanta-test-", suffix=".log")[1])
        command = [sys.executable, "-m", "quanta.cli", *args, "--port", str(self.port)]
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT
            )
        self.wait_http(timeout_s)
        if wait_ready:
            self.wait_ready(timeout_s)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_http(self, timeout_s: float) -> httpx.Response:
        """Wait until the gateway answers HTTP; return its first /healthz answer."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=5)
            except httpx.TransportError:
                time.sleep(0.02)
        raise TimeoutError(f"server did not answer within {timeout_s} s:\n{self.log()}")

    def wait_ready(self, timeout_s: float = 90.0, workers: int = 1) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            response = httpx.get(f"{self.url}/healthz", timeout=5)
            if response.status_code == 200 and response.json()["ready_workers"] >= workers:
                return response.json()
            time.sleep(0.05)
        raise TimeoutError(f"{workers} workers not ready in {timeout_s} s:\n{self.log()}")

    def socket_dir(self) -> str:
        match = re.search(r"socket ipc://(\S+)/gateway\.sock", self.log())
        assert match, self.log()
        return match.group(1)

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has exited; only its parent has not collected it yet
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False
