"""CURVE over real tcp sockets: allowed, unknown and plaintext clients; key files; `quanta keys`."""

from __future__ import annotations

import logging
import stat
import subprocess
import sys
import time

import pytest
import zmq
import zmq.asyncio

from quanta.errors import ConfigError
from quanta.transport.security import (
    Authenticator,
    CurveKeys,
    generate_keypair,
    load_allowed_keys,
    load_keys,
    load_public_key,
    secure_client,
    secure_server,
)
from tests.helpers import ROOT

TIMEOUT_MS = 5000


def _keypair() -> CurveKeys:
    public, secret = zmq.curve_keypair()
    return CurveKeys(public=public, secret=secret)


@pytest.fixture(params=[zmq.Context, zmq.asyncio.Context], ids=["sync", "asyncio"])
def context(request):
    context = request.param()
    yield context
    context.destroy(linger=0)


@pytest.fixture()
def quanta_warnings(caplog, monkeypatch):
    # the CLI, if it ran in this process, stops quanta's records from reaching caplog
    monkeypatch.setattr(logging.getLogger("quanta"), "propagate", True)
    caplog.set_level(logging.DEBUG, logger="quanta")
    return caplog


def _server(context: zmq.Context, keys: CurveKeys) -> tuple[zmq.Socket, str]:
    # a sync socket even on an asyncio context, so the test needs no event loop
    router = context.socket(zmq.ROUTER, socket_class=zmq.Socket)
    router.linger = 0
    secure_server(router, keys)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    return router, f"tcp://127.0.0.1:{port}"


def _client(address: str, keys: CurveKeys | None, server_public: bytes) -> zmq.Socket:
    # a context of its own, as a client would have in another process
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.linger = 0
    dealer.rcvtimeo = dealer.sndtimeo = TIMEOUT_MS
    if keys is not None:
        secure_client(dealer, keys, server_public)
    dealer.connect(address)
    return dealer


def _wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_allowed_client_exchanges_messages_with_curve_server(context):
    server_keys, client_keys = _keypair(), _keypair()
    with Authenticator(context, [client_keys.public]) as auth:
        router, address = _server(context, server_keys)
        dealer = _client(address, client_keys, server_keys.public)
        try:
            dealer.send(b"ping")
            assert router.poll(TIMEOUT_MS), "the allowed client's message never arrived"
            identity, body = router.recv_multipart()
            router.send_multipart([identity, b"pong"])

            assert body == b"ping"
            assert dealer.recv() == b"pong"
            assert auth.refused == 0
        finally:
            dealer.close()
            router.close()


def test_unknown_client_is_refused_and_logged(context, quanta_warnings):
    server_keys, allowed, stranger = _keypair(), _keypair(), _keypair()
    with Authenticator(context, [allowed.public]) as auth:
        router, address = _server(context, server_keys)
        dealer = _client(address, stranger, server_keys.public)
        try:
            dealer.send(b"let me in")

            assert router.poll(1000) == 0, "a refused client's message reached the server"
            assert _wait_for(lambda: auth.refused >= 1)
        finally:
            dealer.close()
            router.close()

    warnings = [r for r in quanta_warnings.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "refused" in message and "127.0.0.1" in message
    assert stranger.public[:8].decode() in message
    # the log names the key, never the whole of it
    assert stranger.public.decode() not in message


def test_plaintext_client_cannot_talk_to_curve_server():
    context = zmq.Context()
    server_keys, client_keys = _keypair(), _keypair()
    try:
        with Authenticator(context, [client_keys.public]) as auth:
            router, address = _server(context, server_keys)
            dealer = _client(address, None, server_keys.public)
            try:
                dealer.send(b"hello in the clear")
                assert router.poll(1000) == 0, "a plaintext message reached a CURVE server"
                # the mechanisms differ, so the handshake fails before any key check
                assert auth.refused == 0
            finally:
                dealer.close()
                router.close()
    finally:
        context.destroy(linger=0)


def test_second_authenticator_on_one_context_fails_until_the_first_stops():
    context = zmq.Context()
    first = Authenticator(context, [])
    try:
        first.start()
        with pytest.raises(RuntimeError, match="one Authenticator per context"):
            Authenticator(context, []).start()
        first.stop()
        with Authenticator(context, []):
            pass
    finally:
        first.stop()
        context.destroy(linger=0)


def test_allowed_keys_reject_text_that_is_not_a_key():
    with pytest.raises(ConfigError, match="not a CURVE key"):
        Authenticator(zmq.Context.instance(), [b"too-short"])


def test_generate_keypair_writes_a_private_secret_file(tmp_path):
    public_path, secret_path = generate_keypair(tmp_path / "keys", "worker")

    assert (public_path.name, secret_path.name) == ("worker.key", "worker.key_secret")
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    keys = load_keys(secret_path)
    assert len(keys.public) == len(keys.secret) == 40
    assert load_public_key(public_path) == keys.public
    assert keys.secret.decode() not in public_path.read_text()
    assert keys.secret.decode() not in repr(keys)


def test_generate_keypair_refuses_to_overwrite_without_force(tmp_path):
    public_path, secret_path = generate_keypair(tmp_path)
    old = load_keys(secret_path)

    with pytest.raises(ConfigError, match="quanta.key"):
        generate_keypair(tmp_path)
    assert load_keys(secret_path) == old

    secret_path.chmod(0o644)
    generate_keypair(tmp_path, force=True)
    assert load_keys(secret_path) != old
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600


def test_load_keys_names_a_missing_or_public_only_file(tmp_path):
    public_path, _ = generate_keypair(tmp_path)
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_text("not a certificate\n")

    with pytest.raises(ConfigError, match="nothere.key_secret"):
        load_keys(tmp_path / "nothere.key_secret")
    with pytest.raises(ConfigError, match="quanta.key' holds only a public key"):
        load_keys(public_path)
    with pytest.raises(ConfigError, match="garbage.key_secret"):
        load_keys(garbage)


def test_load_allowed_keys_reads_public_files_of_a_directory(tmp_path):
    a, _ = generate_keypair(tmp_path, "a")
    b, _ = generate_keypair(tmp_path, "b")

    # the .key_secret files in the same directory are left out
    assert load_allowed_keys(tmp_path) == {load_public_key(a), load_public_key(b)}
    assert load_allowed_keys([a]) == {load_public_key(a)}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no \\*.key files"):
        load_allowed_keys(tmp_path / "empty")


def _quanta_keys(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "quanta.cli", "keys", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_keys_command_writes_a_pair_and_refuses_a_second_without_force(tmp_path):
    first = _quanta_keys("--out", str(tmp_path), "--name", "gateway")

    assert first.returncode == 0, first.stderr
    public = load_public_key(tmp_path / "gateway.key")
    assert public.decode() in first.stdout
    assert str(tmp_path / "gateway.key_secret") in first.stdout

    second = _quanta_keys("--out", str(tmp_path), "--name", "gateway")
    assert second.returncode != 0
    assert "--force" in second.stderr
    assert load_public_key(tmp_path / "gateway.key") == public

    forced = _quanta_keys("--out", str(tmp_path), "--name", "gateway", "--force")
    assert forced.returncode == 0, forced.stderr
    assert load_public_key(tmp_path / "gateway.key") != public
