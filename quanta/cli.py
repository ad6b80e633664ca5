"""The `quanta` command; the only place that configures logging.

    quanta serve                     the built-in embedding model on 127.0.0.1:8000
    quanta serve --index FILE        ... and /v1/search over a text collection
    quanta run app.py:MyService      any Service class
    quanta optimize --recipe int8 --out DIR   a cheaper model that `serve --model DIR` loads
    quanta info [--json]             what this machine offers, as a table or JSON
    quanta keys --out DIR            a CURVE key pair for the workers' transport

Every serving flag has a `QUANTA_<FLAG>` environment variable as its default,
e.g. QUANTA_PORT=9000 or QUANTA_API_KEY=secret.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from quanta.errors import ConfigError, QuantaError

__all__ = ["main", "configure_logging"]

logger = logging.getLogger(__name__)

SEARCH_SERVICE = "quanta.models.search:MiniLMSearch"


def configure_logging(level: str) -> None:
    """Send quanta's log records to stderr, one line each, at `level` and above."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    )
    root = logging.getLogger("quanta")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def _env(flag: str, default: object) -> object:
    # argparse converts a string default with the flag's type, as if typed
    return os.environ.get(f"QUANTA_{flag.lstrip('-').upper().replace('-', '_')}", default)


# flag, type, default, help: each maps to the ServerConfig field of the same name
_SERVING_FLAGS = [
    ("--host", str, "127.0.0.1", "interface to listen on"),
    ("--port", int, 8000, "port to listen on"),
    ("--workers", int, 0, "worker processes (default: one per core)"),
    ("--threads-per-worker", int, 0, "torch threads in each worker (default: cores / workers)"),
    ("--max-batch-size", int, None, "most inputs per batch (default: the endpoint's own)"),
    ("--max-wait-ms", float, None, "how long a batch waits to fill (default: the endpoint's)"),
    ("--max-inputs", int, 2048, "most inputs in one request"),
    ("--max-body-mb", float, 16.0, "largest request body, in MiB"),
    ("--request-timeout", float, 60.0, "seconds before a request is answered 503"),
    ("--api-key", str, None, "require 'Authorization: Bearer KEY' on /v1/ routes"),
    ("--heartbeat-s", float, 1.0, "seconds between heartbeats; a worker silent for 10 is replaced"),
]


def _add_serving_flags(parser: argparse.ArgumentParser) -> None:
    for flag, kind, default, help_text in _SERVING_FLAGS:
        parser.add_argument(flag, type=kind, default=_env(flag, default), help=help_text)
    parser.add_argument(
        "--log-level",
        default=_env("--log-level", "info"),
        choices=["debug", "info", "warning", "error"],
    )


def _serve(args: argparse.Namespace, service: str, options: dict) -> None:
    # Imported here: `quanta info` and the workers need none of the HTTP stack.
    import uvicorn

    from quanta.serving.config import ServerConfig
    from quanta.serving.gateway import create_app

    config = ServerConfig(
        service=service,
        options=options,
        host=args.host,
        port=args.port,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_inputs=args.max_inputs,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        request_timeout_s=args.request_timeout,
        api_key=args.api_key,
        heartbeat_s=args.heartbeat_s,
    )
    app = create_app(config)
    logger.info("serving %s on http://%s:%d (docs at /docs)", service, config.host, config.port)
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_config=None,
        access_log=False,
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=5,
        log_level=args.log_level,
    )


def _serve_builtin(args: argparse.Namespace) -> None:
    from quanta.serving.config import BUILTIN_SERVICE

    options = {"model": args.model, "precision": args.precision}
    if args.index is None:
        _serve(args, BUILTIN_SERVICE, options)
        return
    # Embedding runs in a child process, which keeps torch out of the gateway
    # and shows its progress bar on this terminal; it also checks the file, so
    # a bad one stops the server here, before any worker starts.
    index = str(Path(args.index).resolve())
    command = [sys.executable, "-m", "quanta.models.index", index, "--model", args.model]
    command += ["--precision", args.precision]
    if args.index_cache is not None:
        command += ["--cache-dir", args.index_cache]
    if subprocess.run(command).returncode != 0:
        raise ConfigError(f"preparing the collection {index} failed (see above)")
    options.update(index=index, cache_dir=args.index_cache)
    _serve(args, SEARCH_SERVICE, options)


def _keys(args: argparse.Namespace) -> None:
    from quanta.transport.security import generate_keypair, load_public_key

    public_path, secret_path = generate_keypair(args.out, args.name, force=args.force)
    print(f"public key file: {public_path}")
    print(f"secret key file: {secret_path}  (keep it private)")
    print(f"public key:      {load_public_key(public_path).decode('ascii')}")


def _optimize(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from quanta.errors import ConfigError
    from quanta.optimize.api import optimize_builtin

    texts = None
    if args.calibration is not None:
        path = Path(args.calibration)
        if not path.is_file():
            raise ConfigError(
                f"--calibration {args.calibration!r} is no file; give one text a line"
            )
        texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not texts:
            raise ConfigError(f"--calibration {args.calibration!r} holds no text")
    _, summary = optimize_builtin(
        args.model,
        args.recipe,
        out=args.out,
        max_loss=args.max_loss,
        time_budget_s=args.time_budget,
        texts=texts,
        pairs=args.pairs,
        progress=True,
    )

    table = Table(title=f"{args.model} with recipe {args.recipe}")
    table.add_column("measure")
    for name in summary:
        table.add_column(name, justify="right")
    for key in dict.fromkeys(key for row in summary.values() for key in row):
        table.add_row(key, *(str(row.get(key, "-")) for row in summary.values()))
    console = Console()
    console.print(table)
    # plain prints: a path must not be wrapped to the width of a terminal
    print(f"artifact: {args.out} (report.md, report.png); serve it with")
    print(f"  quanta serve --model {args.out}")


def _human_bytes(size: int) -> str:
    if size <= 0:
        return "unknown"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value.is_integer() else f"{value:.1f} {unit}"
    return f"{size} B"


def _info(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from quanta import hardware

    report = hardware.info()
    if args.json:
        print(json.dumps(report, indent=2))
        return

    def yes(flag: str) -> str:
        return "yes" if report[flag] else "no"

    table = Table(title="this machine")
    table.add_column("field")
    table.add_column("value")
    table.add_row("CPU", report["cpu_model"])
    table.add_row("cores", f"{report['cores']} usable by this process")
    table.add_row("L1d cache", _human_bytes(report["l1d_bytes"]))
    table.add_row("L2 cache", _human_bytes(report["l2_bytes"]))
    table.add_row("L3 cache", _human_bytes(report["l3_bytes"]))
    table.add_row("memory", _human_bytes(report["memory_bytes"]))
    table.add_row("AVX-512F", yes("avx512f"))
    table.add_row("AVX512-BF16", yes("avx512_bf16"))
    table.add_row("AVX512-VNNI", yes("avx512_vnni"))
    table.add_row(
        "AMX tile / bf16 / int8", " / ".join(yes(f"amx_{k}") for k in ("tile", "bf16", "int8"))
    )
    table.add_row("fast paths", ", ".join(report["fast_paths"]) or "none")
    for i, device in enumerate(report["cuda"]):
        table.add_row(
            f"CUDA {i}",
            f"{device['name']}, {_human_bytes(device['memory_bytes'])}, "
            f"compute capability {device['capability']}",
        )
    if not report["cuda"]:
        table.add_row("CUDA", "none")
    # the summary line first, plain: scripts grep it, and rich would wrap it
    print(hardware.detect().describe())
    Console().print(table)


def _parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise QuantaError(f"--option {pair!r} must look like key=value")
        # JSON values (numbers, true, lists) are taken as such; anything else is a string
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quanta", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the built-in embedding model")
    serve.add_argument(
        "--model",
        default=_env("--model", "builtin:minilm"),
        help="builtin:minilm or a model directory",
    )
    serve.add_argument(
        "--precision", default=_env("--precision", "auto"), choices=["auto", "fp32", "bf16"]
    )
    serve.add_argument(
        "--index",
        default=_env("--index", None),
        metavar="FILE",
        help="also serve /v1/search over this collection (.txt: a text a line; .jsonl: id, text)",
    )
    serve.add_argument(
        "--index-cache",
        default=_env("--index-cache", None),
        metavar="DIR",
        help="where the collection's vectors are cached (default: beside the file)",
    )
    _add_serving_flags(serve)

    run = commands.add_parser("run", help="serve a Service class: quanta run app.py:MyService")
    run.add_argument("service", help="file.py:Class or package.module:Class")
    run.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a keyword option for the class's __init__ (repeatable)",
    )
    _add_serving_flags(run)

    optimize = commands.add_parser(
        "optimize", help="make a cheaper model within a quality budget: writes an artifact"
    )
    optimize.add_argument("--model", default="builtin:minilm", help="builtin:minilm or a directory")
    optimize.add_argument(
        "--recipe", required=True, help="bf16, int8, int4, prune, lowrank, or e.g. prune+int8"
    )
    optimize.add_argument(
        "--max-loss",
        type=float,
        default=0.005,
        help="largest allowed drop in mean cosine to the original (default 0.005)",
    )
    optimize.add_argument("--out", required=True, help="directory to write the artifact to")
    optimize.add_argument(
        "--time-budget", type=float, default=None, help="seconds for recovery after pruning"
    )
    optimize.add_argument(
        "--calibration",
        default=None,
        metavar="FILE",
        help="calibration texts, one a line (default: standard library docstrings)",
    )
    optimize.add_argument(
        "--pairs",
        type=int,
        default=300,
        help="held-out docstring retrieval pairs that judge each candidate (default 300)",
    )
    optimize.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )

    info = commands.add_parser("info", help="print what this machine offers")
    info.add_argument("--json", action="store_true", help="print a JSON object instead of a table")

    keys = commands.add_parser("keys", help="write a CURVE key pair: NAME.key and NAME.key_secret")
    keys.add_argument("--out", default=".", help="directory to write to (default: here)")
    keys.add_argument("--name", default="quanta", help="file name stem (default: quanta)")
    keys.add_argument("--force", action="store_true", help="replace existing key files")

    worker = commands.add_parser("worker", help=argparse.SUPPRESS)
    for flag in ("--address", "--worker-id", "--service", "--options"):
        worker.add_argument(flag, required=True)
    worker.add_argument("--threads", type=int, required=True)
    worker.add_argument("--heartbeat-s", type=float, required=True)
    worker.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(getattr(args, "log_level", "info"))
    try:
        if args.command == "serve":
            _serve_builtin(args)
        elif args.command == "run":
            _serve(args, args.service, _parse_options(args.option))
        elif args.command == "optimize":
            _optimize(args)
        elif args.command == "info":
            _info(args)
        elif args.command == "keys":
            _keys(args)
        elif args.command == "worker":
            from quanta.serving.worker import serve_worker

            serve_worker(
                address=args.address,
                worker_id=args.worker_id,
                service=args.service,
                options=json.loads(args.options),
                threads=args.threads,
                heartbeat_s=args.heartbeat_s,
            )
    except QuantaError as exc:
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
