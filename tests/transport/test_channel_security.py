"""Channels with CURVE over real loopback tcp: allowed peers talk, strangers get nothing through."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from quanta.errors import ConfigError, TransportError
from quanta.transport import Channel, ChannelConfig
from quanta.transport.security import CurveKeys, generate_keypair, load_keys

TIMEOUT_S = 10


@pytest.fixture()
def keys(tmp_path) -> dict[str, CurveKeys]:
    """Key pairs written and read back as files, the way a deployment has them."""
    pairs = {}
    for name in ("server", "client", "stranger"):
        _, secret_path = generate_keypair(tmp_path / "keys", name)
        pairs[name] = load_keys(secret_path)
    return pairs


@pytest.fixture()
def quanta_logs(caplog, monkeypatch):
    # the CLI, if it ran in this process, stops quanta's records from reaching caplog
    monkeypatch.setattr(logging.getLogger("quanta"), "propagate", True)
    caplog.set_level(logging.DEBUG, logger="quanta")
    return caplog


@pytest.fixture()
def pair(keys):
    """Opens a CURVE server that admits `client`, and a client with the given keys."""
    opened = []

    def pair(own: CurveKeys, server_public: bytes | None) -> tuple[Channel, Channel]:
        allowed = frozenset({keys["client"].public})
        server = ChannelConfig(curve_keys=keys["server"], curve_allowed=allowed)
        rx = Channel.bind("tcp://127.0.0.1:0", server)
        opened.append(rx)
        client = ChannelConfig(
            curve_keys=own,
            curve_server_key=server_public,
            shard_size=256 << 10,
            streams=2,
            codec="none",
        )
        # no keys at all: a plaintext client
        tx = Channel.connect(rx.endpoint, client if own is not None else None)
        opened.append(tx)
        return rx, tx

    yield pair
    # linger 0: a refused client's messages would hold up the close for a second
    for channel in reversed(opened):
        channel.close(linger=0)


def _refusals(caplog) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "quanta.transport.security" and r.levelno == logging.WARNING
    ]


def test_allowed_client_exchanges_messages_both_ways(keys, pair):
    rx, tx = pair(keys["client"], keys["server"].public)
    tensor = np.random.default_rng(0).standard_normal(1 << 19).astype(np.float32)  # 2 MiB

    tx.send({"q": "weights?"}, {"w": tensor, "ids": np.arange(4, dtype=np.int64)})
    message = rx.recv(timeout=TIMEOUT_S)
    rx.send({"a": "thanks"}, {"back": tensor[:1000]}, peer=message.peer)
    reply = tx.recv(timeout=TIMEOUT_S)

    assert message.header == {"q": "weights?"}
    np.testing.assert_array_equal(message.tensors["w"], tensor)
    np.testing.assert_array_equal(message.tensors["ids"], np.arange(4))
    assert tx.engine.stats["shards_none"] == 8
    assert reply.header == {"a": "thanks"}
    np.testing.assert_array_equal(reply.tensors["back"], tensor[:1000])


def test_client_with_an_unknown_key_gets_nothing_through(keys, pair, quanta_logs):
    rx, tx = pair(keys["stranger"], keys["server"].public)
    tx.send({"let me": "in"}, {"x": np.ones(16, dtype=np.float32)})

    with pytest.raises(TransportError, match="no message arrived"):
        rx.recv(timeout=1.0)

    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and not _refusals(quanta_logs):
        time.sleep(0.02)

    refusals = _refusals(quanta_logs)
    assert refusals, "the refused handshake was not logged"
    message = refusals[0].getMessage()
    assert keys["stranger"].public[:8].decode() in message
    assert "127.0.0.1" in message


def test_client_trusting_the_wrong_server_key_gets_nothing_through(keys, pair):
    rx, tx = pair(keys["client"], keys["stranger"].public)
    tx.send({"hello": True})
    with pytest.raises(TransportError, match="no message arrived"):
        rx.recv(timeout=1.0)


def test_plaintext_client_gets_nothing_through(pair):
    rx, tx = pair(None, None)
    tx.send({"hello": "in the clear"})
    with pytest.raises(TransportError, match="no message arrived"):
        rx.recv(timeout=1.0)


def test_bound_channel_with_keys_but_no_allowed_clients_is_a_config_error(keys):
    config = ChannelConfig(curve_keys=keys["server"])
    with pytest.raises(ConfigError, match="curve_allowed"):
        Channel.bind("tcp://127.0.0.1:0", config)


def test_connecting_channel_with_keys_but_no_server_key_is_a_config_error(keys):
    config = ChannelConfig(curve_keys=keys["client"])
    with pytest.raises(ConfigError, match="curve_server_key"):
        Channel.connect("tcp://127.0.0.1:5", config)
