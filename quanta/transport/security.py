"""CURVE security for quanta's ZeroMQ sockets: encrypted links, known clients only.

CURVE gives each side a key pair. The server proves who it is with its secret
key, and the client must know the server's public key before it connects; all
frames after the handshake are encrypted. On its own, a CURVE server takes any
client that knows its public key. To admit only known clients, an
`Authenticator` answers ZeroMQ's ZAP requests for one context and accepts a
client only if its public key is in the allowed set.

Keys live in files in ZeroMQ's certificate format, as `quanta keys` writes them:

    NAME.key          the public key; give it to peers
    NAME.key_secret   the public and the secret key; mode 0600, never share it

Keys are handled in their z85 text form: 40 bytes for a 32-byte key.

    server_keys = load_keys("server.key_secret")
    with Authenticator(context, load_allowed_keys("clients/")):
        router = context.socket(zmq.ROUTER)
        secure_server(router, server_keys)
        router.bind("tcp://0.0.0.0:5555")
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from quanta.errors import ConfigError, shorten

__all__ = [
    "CurveKeys",
    "Authenticator",
    "generate_keypair",
    "load_keys",
    "load_public_key",
    "load_allowed_keys",
    "secure_server",
    "secure_client",
]

logger = logging.getLogger(__name__)

_Z85_KEY_LEN = 40
_RAW_KEY_LEN = 32
# the endpoint libzmq asks for ZAP decisions; one per context
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_FIX = "create a key pair with `quanta keys --out DIR`"


@dataclass(frozen=True)
class CurveKeys:
    """One side's CURVE key pair, both z85-encoded (40 bytes each)."""

    public: bytes
    # kept out of repr, so the secret key never reaches a log line or a traceback
    secret: bytes = field(repr=False)


def _check_key(key: bytes, what: str) -> bytes:
    """Return `key` as 40 z85 bytes; accept a raw 32-byte key too."""
    if isinstance(key, str):
        key = key.encode("ascii", "replace")
    if len(key) == _RAW_KEY_LEN:
        return z85.encode(key)

    # a decode catches characters outside z85's alphabet as well as a bad length
    try:
        if len(key) == _Z85_KEY_LEN and len(z85.decode(key)) == _RAW_KEY_LEN:
            return bytes(key)
    except (ValueError, KeyError, TypeError):
        pass
    raise ConfigError(
        f"{what} {shorten(key, 20)} is not a CURVE key; expected 40 z85 characters "
        f"as `quanta keys` writes them"
    )


def _read_certificate(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"key file {str(path)!r} does not exist; {_FIX}")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"key file {str(path)!r} is not a ZeroMQ certificate ({exc}); {_FIX}"
        ) from exc
    return _check_key(public, f"public key in {str(path)!r}:"), secret


def load_public_key(path: str | os.PathLike) -> bytes:
    """Read the z85 public key from a `.key` or a `.key_secret` file.

    Args:
        path: a certificate file written by `generate_keypair` or zmq.

    Returns:
        The 40-byte z85 public key.

    Raises:
        ConfigError: the file is missing or holds no valid public key.

    Example:
        server_public = load_public_key("keys/server.key")
    """
    public, _ = _read_certificate(path)
    return public


def load_keys(path: str | os.PathLike) -> CurveKeys:
    """Read a key pair from a `.key_secret` file.

    Args:
        path: the secret certificate file written by `generate_keypair`.

    Returns:
        The file's public and secret keys.

    Raises:
        ConfigError: the file is missing, malformed, or holds only a public key.

    Example:
        keys = load_keys("keys/worker.key_secret")
    """
    public, secret = _read_certificate(path)
    if secret is None:
        raise ConfigError(
            f"key file {str(path)!r} holds only a public key; pass the matching "
            f".key_secret file instead"
        )

    # others can read the secret, so whoever else is on this machine can pose as us
    if os.name == "posix" and stat.S_IMODE(os.stat(path).st_mode) & 0o077:
        logger.warning("secret key file %s is readable by others; chmod 600 it", path)
    return CurveKeys(public=public, secret=_check_key(secret, f"secret key in {str(path)!r}:"))


def load_allowed_keys(
    paths_or_dir: str | os.PathLike | Iterable[str | os.PathLike],
) -> frozenset[bytes]:
    """Collect the client public keys a server admits.

    Args:
        paths_or_dir: a directory (every `*.key` file in it is read), one key
            file, or a list of key files.

    Returns:
        The z85 public keys, as a frozenset of bytes.

    Raises:
        ConfigError: a file is missing or malformed, or no key was found.

    Example:
        allowed = load_allowed_keys("keys/clients")
    """
    if isinstance(paths_or_dir, str | os.PathLike):
        where = Path(paths_or_dir)
        # `*.key` leaves out `.key_secret` files, which hold keys to keep private
        paths = sorted(where.glob("*.key")) if where.is_dir() else [where]
    else:
        where = None
        paths = [Path(p) for p in paths_or_dir]

    keys = frozenset(load_public_key(path) for path in paths)
    if not keys:
        source = f"no *.key files in {str(where)!r}" if where else "an empty list of key files"
        raise ConfigError(f"{source}: every client would be refused; add the clients' .key files")
    return keys


def generate_keypair(
    directory: str | os.PathLike, name: str = "quanta", *, force: bool = False
) -> tuple[Path, Path]:
    """Write a new key pair as `NAME.key` (public) and `NAME.key_secret` (mode 0600).

    Args:
        directory: where to write; created if missing.
        name: the files' stem.
        force: overwrite existing files of that name.

    Returns:
        (public_path, secret_path).

    Raises:
        ConfigError: a bad name, a directory that cannot be written, or files
            that exist already without `force`.

    Example:
        public_path, secret_path = generate_keypair("keys", "worker")
    """
    if not name or Path(name).name != name or name in (".", ".."):
        raise ConfigError(f"key name {name!r} must be a plain file name, e.g. 'worker'")
    directory = Path(directory)
    public_path = directory / f"{name}.key"
    secret_path = directory / f"{name}.key_secret"
    existing = [str(p) for p in (public_path, secret_path) if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"key file(s) {', '.join(existing)} exist already; pass --force (force=True) "
            f"to replace them, or choose another --name"
        )

    try:
        directory.mkdir(parents=True, exist_ok=True)
        # create the secret file 0600 before zmq writes to it, so the key is never
        # readable by others; an existing file keeps its old mode, hence the chmod
        secret_path.touch(mode=0o600, exist_ok=force)
        secret_path.chmod(0o600)
        zmq.auth.create_certificates(directory, name)
    except FileExistsError as exc:
        raise ConfigError(
            f"key file {str(secret_path)!r} appeared while writing; pass --force to replace it"
        ) from exc
    except OSError as exc:
        raise ConfigError(
            f"cannot write key files in {str(directory)!r} ({exc.strerror}); "
            f"choose a writable directory with --out"
        ) from exc

    logger.info("wrote CURVE key pair %s and %s", public_path, secret_path)
    return public_path, secret_path


def secure_server(socket: zmq.Socket, keys: CurveKeys) -> None:
    """Make `socket` a CURVE server with `keys`; call before `bind`.

    NOTE: without a running `Authenticator` on the socket's context, libzmq
    admits any client that knows the server's public key. Start the
    Authenticator first and stop it only after the socket is closed.

    Example:
        secure_server(router, load_keys("server.key_secret"))
    """
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True


def secure_client(socket: zmq.Socket, keys: CurveKeys, server_public: bytes) -> None:
    """Make `socket` a CURVE client with `keys` that trusts `server_public`; call before `connect`.

    Example:
        secure_client(dealer, load_keys("worker.key_secret"), load_public_key("server.key"))
    """
    socket.curve_serverkey = _check_key(server_public, "server public key")
    socket.curve_publickey = keys.public
    socket.curve_secretkey = keys.secret


def _short(key: bytes) -> str:
    # enough of the key to tell peers apart in a log, short enough to read
    return key[:8].decode("ascii", "replace") + "..."


class _UnbindingAuthenticator(zmq.auth.Authenticator):
    """pyzmq's ZAP socket, unbound before it is closed."""

    def stop(self) -> None:
        # a close frees the inproc ZAP endpoint later, on libzmq's reaper thread, so
        # an Authenticator started right after would find it taken; an unbind frees it
        # at once. ThreadAuthenticator calls this after joining its thread.
        if self.zap_socket is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.zap_socket.unbind(_ZAP_ENDPOINT)
        super().stop()


class _ZapHandler(ThreadAuthenticator, _UnbindingAuthenticator):
    """pyzmq's ZAP thread; it is also its own CURVE credentials provider."""

    def __init__(self, context: zmq.Context, admit: Callable[[bytes, str], bool]):
        super().__init__(context, log=logger)
        self._admit = admit
        self._peer_address = "?"

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # frame 3 of a ZAP request is the peer's address, which the key callback
        # is not given; requests are handled one at a time, so keeping it is safe
        if len(msg) > 3:
            self._peer_address = msg[3].decode("utf-8", "replace")
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        return self._admit(key, self._peer_address)


class Authenticator:
    """Runs ZeroMQ's ZAP handler for one zmq.Context and admits only the listed client public keys.

    A refused peer is logged at WARNING with its address and shortened key;
    an admitted one at DEBUG. `refused` counts refused handshakes.

    NOTE: ZeroMQ allows one ZAP handler per context, so one Authenticator per
    context at a time; a second `start` raises RuntimeError.

    Example:
        with Authenticator(context, load_allowed_keys("clients/")) as auth:
            ...  # CURVE server sockets of `context` admit only those clients
    """

    def __init__(self, context: zmq.Context, allowed: Iterable[bytes]):
        self.allowed = frozenset(_check_key(key, "allowed client key") for key in allowed)
        self.refused = 0
        # the ZAP thread needs sync sockets; a shadow shares the libzmq context, and so
        # its inproc ZAP endpoint, with a zmq.asyncio.Context without owning it
        self._context = zmq.Context.shadow(context)
        self._handler: _ZapHandler | None = None

    def start(self) -> None:
        """Bind the context's ZAP endpoint and start answering on a daemon thread."""
        if self._handler is not None:
            raise RuntimeError("Authenticator.start() called twice; call stop() first")
        handler = _ZapHandler(self._context, self._admit)
        # configured before the thread starts, so no handshake meets an empty policy
        handler.configure_curve_callback("*", handler)
        try:
            handler.start()
        except zmq.ZMQError as exc:
            handler.stop()
            raise RuntimeError(
                f"cannot start CURVE authentication ({exc}); this context has another "
                f"ZAP handler, stop it or use one Authenticator per context"
            ) from exc
        self._handler = handler
        logger.info("CURVE authentication on, %d client key(s) allowed", len(self.allowed))

    def stop(self) -> None:
        """Stop answering ZAP requests; safe to call more than once."""
        if self._handler is None:
            return
        self._handler.stop()
        self._handler = None

    def _admit(self, key: bytes, address: str) -> bool:
        # runs on the ZAP thread, once per CURVE handshake; `key` is z85
        if key in self.allowed:
            logger.debug("admitted CURVE client %s from %s", _short(key), address)
            return True
        self.refused += 1
        logger.warning(
            "refused CURVE client %s from %s: its public key is not in the allowed set",
            _short(key),
            address,
        )
        return False

    def __enter__(self) -> Authenticator:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
