"""A slow link for benchmarks: two network namespaces joined by a shaped veth pair.

    with SlowLink(rate="1gbit") as link:
        Popen([*link.exec_in("b"), python, "-m", "receiver", link.address("b")])
        Popen([*link.exec_in("a"), python, "-m", "sender", link.address("b")])

Namespace `a` holds one end of the pair, namespace `b` the other; each end
shapes what it sends with a token bucket, so traffic both ways crosses a link
of `rate`. The namespaces hold nothing but loopback and their end, so the
addresses cannot clash with the host's networks and nothing outside can reach
a process started in them. Creating them needs root (CAP_NET_ADMIN);
`SlowLinkUnavailable` says why it failed, after removing whatever was made.

NOTE: the bucket counts whole packets, headers included, so TCP carries about
95% of `rate` in payload (1448 of every 1514 bytes at an MTU of 1500).
"""

from __future__ import annotations

import os
import subprocess

__all__ = ["SlowLink", "SlowLinkUnavailable"]

# Namespaces are private, so fixed addresses are safe: nothing else routes here.
_ADDRESSES = {"a": "10.77.0.1", "b": "10.77.0.2"}
_PREFIX = 30


class SlowLinkUnavailable(RuntimeError):
    """The namespaces or the shaped link could not be created here."""


class SlowLink:
    """Two namespaces, `a` and `b`, joined by a veth pair shaped to `rate` both ways.

    Args:
        rate: a tc rate, e.g. "1gbit" or "100mbit".
        burst: the token bucket's depth, a tc size. It must exceed one GSO
            segment (64 KiB) or the bucket drops every large segment.
        latency: the longest a packet may wait in the bucket before tc drops it.

    The names carry the process id, so two benchmarks can run side by side.
    Use it as a context manager; leaving the block removes both namespaces
    (which also removes the veth pair), even on Ctrl-C.
    """

    def __init__(self, *, rate: str = "1gbit", burst: str = "256kb", latency: str = "50ms") -> None:
        pid = os.getpid()
        self.rate, self.burst, self.latency = rate, burst, latency
        self.names = {"a": f"qb{pid}a", "b": f"qb{pid}b"}
        self._devices = {"a": f"qb{pid}va", "b": f"qb{pid}vb"}
        self._made: list[str] = []

    def address(self, side: str) -> str:
        """The IPv4 address of `side`'s end of the link."""
        return _ADDRESSES[side]

    def exec_in(self, side: str) -> list[str]:
        """The command prefix that runs a program inside `side`'s namespace."""
        return ["ip", "netns", "exec", self.names[side]]

    def describe(self) -> dict:
        """The link's settings, for a benchmark's record."""
        return {
            "namespaces": dict(self.names),
            "addresses": {side: f"{ip}/{_PREFIX}" for side, ip in _ADDRESSES.items()},
            "qdisc": f"tbf rate {self.rate} burst {self.burst} latency {self.latency}",
        }

    def __enter__(self) -> SlowLink:
        if os.geteuid() != 0:
            raise SlowLinkUnavailable("network namespaces need root")
        try:
            self._create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _create(self) -> None:
        for side in ("a", "b"):
            _ip("netns", "add", self.names[side])
            self._made.append(self.names[side])

        # Create the pair with each end already in its namespace: no moment
        # exists where an end sits in the host's namespace.
        a, b = self._devices["a"], self._devices["b"]
        _ip(
            "link", "add", a, "netns", self.names["a"],
            "type", "veth", "peer", "name", b, "netns", self.names["b"],
        )  # fmt: skip

        for side in ("a", "b"):
            ns, device = self.names[side], self._devices[side]
            _ip("-n", ns, "addr", "add", f"{_ADDRESSES[side]}/{_PREFIX}", "dev", device)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", device, "up")
            # Each end shapes its own egress, so data and acks both see the rate.
            _run(
                "tc", "-n", ns, "qdisc", "add", "dev", device, "root", "tbf",
                "rate", self.rate, "burst", self.burst, "latency", self.latency,
            )  # fmt: skip

    def remove(self) -> None:
        """Delete the namespaces made so far; safe to call twice."""
        # Deleting a namespace deletes the veth end inside it, and with it the pair.
        while self._made:
            name = self._made.pop()
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def _ip(*args: str) -> None:
    _run("ip", *args)


def _run(*command: str) -> None:
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise SlowLinkUnavailable(f"{command[0]} is not installed") from exc
    except subprocess.CalledProcessError as exc:
        reason = (exc.stderr or "").strip().splitlines()[-1:] or [f"exit code {exc.returncode}"]
        raise SlowLinkUnavailable(f"`{' '.join(command[:6])} ...` failed: {reason[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise SlowLinkUnavailable(f"`{' '.join(command[:6])} ...` took over 30 s") from exc
