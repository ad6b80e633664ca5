"""Benchmark quanta's kernels against numpy, torch and faiss on this machine's CPU.

Two parts, in one run on seeded data:

    matmul   a @ b on standard-normal fp32 matrices: numpy, torch, and quanta
             in auto, bf16 and int8; relative error against float64 on every
             16th row of a
    top-k    unit vectors by inner product: numpy and torch brute force in
             blocks, faiss IndexFlatIP, quanta Corpus + topk; recall against
             the torch fp32 result

Each row runs once untimed, then every round runs every row once, in order, so
a burst of load elsewhere falls on all rows alike. A row reports its best and
its median round; the ratios and targets use the best. Only the search is
timed; preparing an index or a corpus is reported apart.

    python -m quanta.bench kernels [--rounds 3] [--out bench-results]
    python -m quanta.bench kernels --matmul-size 1024 --corpus-size 100000 --queries 100 --rounds 1
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from quanta import hardware
from quanta.bench.kernels_peers import (
    PEER_BLOCK,
    faiss_unavailable,
    numpy_topk,
    recall,
    torch_topk,
    unit_rows,
)
from quanta.bench.record import write_record
from quanta.kernels import Corpus, matmul, plan, topk

__all__ = ["main"]

NUMPY_FP32, TORCH_FP32 = "numpy fp32", "torch fp32"
FAISS_FLAT, QUANTA_TOPK = "faiss IndexFlatIP", "quanta topk"
MATMUL_SPEEDUP, TOPK_SPEEDUP, RECALL = 4.0, 3.0, 0.999
# Every 16th row of a is multiplied again in float64 to measure each row's error.
ERROR_ROW_STEP = 16
# Queries of the untimed first call of each top-k row: enough for faiss to take
# its BLAS path (it searches fewer than 20 queries another way).
WARMUP_QUERIES = 64
# Tile sides of the rows that compare running tiles in order and on the pool.
TILE_SIDES = (256, 128)
# Seconds of rest before each timed row: longer than the spin of idle BLAS threads.
SETTLE_S = 1.0
# A 1-minute load average above this share of the cores means others were running.
BUSY_LOAD = 0.5
DEFAULT_CANDIDATES = inspect.signature(topk).parameters["candidates"].default


# -- timing ------------------------------------------------------------------------


def _time_rows(
    rows: dict[str, Callable], args: tuple, warmup: tuple, judge: Callable, rounds: int
) -> dict[str, dict]:
    """Per row its round times and what `judge` says of its first timed result."""
    for name, run in rows.items():
        run(*warmup)  # first calls pay thread pools, kernel setup and quanta's speed probe
        print(f"  {name}: warmed up", flush=True)
    seconds, judged = {name: [] for name in rows}, {}
    for index in range(rounds):
        for name, run in rows.items():
            # BLAS and OpenMP threads spin for a while after a parallel call
            # (OpenBLAS, MKL, libgomp all do); a pause keeps one row's spinning
            # threads from slowing the next row.
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            result = run(*args)
            seconds[name].append(time.perf_counter() - start)
            if index == 0:
                judged[name] = judge(result)
            del result
        print(f"  round {index + 1} of {rounds} done", flush=True)
    return {
        name: {
            "best_s": min(times),
            "median_s": statistics.median(times),
            "round_s": times,
            **judged[name],
        }
        for name, times in seconds.items()
    }


# -- the two parts -----------------------------------------------------------------


def _tiled(a: np.ndarray, b: np.ndarray, *, block: int, threads: int | None) -> np.ndarray:
    return matmul(a, b, precision="fp32", block=block, threads=threads)


def _matmul_part(args: argparse.Namespace, rng: np.random.Generator) -> dict:
    size, tol = args.matmul_size, args.tol
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    reference = a[::ERROR_ROW_STEP].astype(np.float64) @ b.astype(np.float64)
    norm = np.linalg.norm(reference)

    def judge(c) -> dict:
        c = c.numpy() if isinstance(c, torch.Tensor) else c
        return {"rel_error": float(np.linalg.norm(c[::ERROR_ROW_STEP] - reference) / norm)}

    how = plan(a, b, tol=tol)
    choice = how.choice
    rows = {
        NUMPY_FP32: lambda x, y: x @ y,
        TORCH_FP32: lambda x, y: torch.from_numpy(x) @ torch.from_numpy(y),
        "quanta auto": lambda x, y: matmul(x, y, tol=tol),
        "quanta bf16": lambda x, y: matmul(x, y, precision="bf16"),
        "quanta int8": lambda x, y: matmul(x, y, precision="int8"),
    }
    # Small tiles, as a tight memory limit makes them: one tile after another
    # (torch's threads inside each tile) against a pool of one thread per core;
    # the "pool_threads" of the record says which of the two matmul chose.
    for side in TILE_SIDES:
        for threads, label in ((1, "in order"), (hardware.detect().cores, "pool")):
            rows[f"quanta fp32, {side} tiles, {label}"] = functools.partial(
                _tiled, block=side, threads=threads
            )
    print(f"matmul {size}^3: {choice.reason}", flush=True)
    timed = _time_rows(rows, (a, b), (a, b), judge, args.rounds)
    precision = {"quanta auto": choice.precision, "quanta bf16": "bf16", "quanta int8": "int8"}
    pool_threads = plan(a, b, precision="fp32", block=TILE_SIDES[0]).threads
    for name, row in timed.items():
        row["name"], row["precision"] = name, precision.get(name, "fp32")
        row["gflops"] = 2 * size**3 / row["best_s"] / 1e9
        row["speedup"] = timed[NUMPY_FP32]["best_s"] / row["best_s"]
    auto = {"precision": choice.precision, "errors": choice.errors, "reason": choice.reason}
    return {
        "size": size,
        "tol": tol,
        "auto_choice": auto,
        "tiling": str(how.tiling),
        "pool_threads": pool_threads,
        "rows": list(timed.values()),
    }


def _topk_part(args: argparse.Namespace, rng: np.random.Generator) -> dict:
    n, d, k = args.corpus_size, args.dim, args.k
    corpus, queries = unit_rows(rng, n, d), unit_rows(rng, args.queries, d)
    print(f"top-k: {n} x {d} corpus, {args.queries} queries, k={k}; the exact top k", flush=True)
    exact = torch_topk(queries, corpus, k)

    rows = {
        NUMPY_FP32: lambda q: numpy_topk(q, corpus, k),
        TORCH_FP32: lambda q: torch_topk(q, corpus, k),
    }
    build, skipped = {}, []
    if reason := faiss_unavailable():
        skipped.append({"name": FAISS_FLAT, "outcome": "skipped", "error": reason})
        print(f"{FAISS_FLAT}: skipped, {reason}", flush=True)
    else:
        import faiss

        start = time.perf_counter()
        index = faiss.IndexFlatIP(d)
        index.add(corpus)
        build[FAISS_FLAT] = time.perf_counter() - start
        rows[FAISS_FLAT] = lambda q: index.search(q, k)[1]

    start = time.perf_counter()
    prepared = Corpus(corpus, precision=args.corpus_precision)
    build[QUANTA_TOPK] = time.perf_counter() - start
    quanta_rows = {QUANTA_TOPK: DEFAULT_CANDIDATES}
    extra = (c for c in args.candidates if c != DEFAULT_CANDIDATES)
    quanta_rows.update({f"{QUANTA_TOPK} candidates={c}": c for c in extra})
    for name, c in quanta_rows.items():
        rows[name] = lambda q, c=c: topk(q, prepared, k, candidates=c).indices
        build.setdefault(name, build[QUANTA_TOPK])

    def judge(found) -> dict:
        return {f"recall_at_{k}": recall(np.asarray(found), exact)}

    timed = _time_rows(rows, (queries,), (queries[:WARMUP_QUERIES],), judge, args.rounds)
    base = timed.get(FAISS_FLAT, {}).get("best_s")
    for name, row in timed.items():
        row["name"], row["build_s"] = name, build.get(name, 0.0)
        row["queries_per_s"] = args.queries / row["best_s"]
        row["speedup"] = base / row["best_s"] if base else None
        if name in quanta_rows:
            row["candidates"] = quanta_rows[name]
    return {
        "corpus_size": n,
        "dim": d,
        "queries": args.queries,
        "k": k,
        "reference": f"{TORCH_FP32} in blocks of {PEER_BLOCK} rows",
        "corpus_precision": prepared.precision,
        "codes_bytes": prepared.codes.numel() * prepared.codes.element_size(),
        "rows": list(timed.values()) + skipped,
    }


# -- targets, report, plot ---------------------------------------------------------


def _targets(mm: dict, tk: dict) -> list[dict]:
    """Each aim with the measured values and whether it is met (None: not measured)."""
    auto = next(r for r in mm["rows"] if r["name"] == "quanta auto")
    ours = next(r for r in tk["rows"] if r["name"] == QUANTA_TOPK)
    recall, k = ours[f"recall_at_{tk['k']}"], tk["k"]
    speed = (
        {"met": None, "value": "not measured: no faiss"}
        if ours["speedup"] is None
        else {"met": ours["speedup"] >= TOPK_SPEEDUP, "value": f"{ours['speedup']:.2f}x"}
    )
    return [
        {
            "target": f"quanta auto >= {MATMUL_SPEEDUP:g}x numpy fp32 within tol",
            "met": auto["speedup"] >= MATMUL_SPEEDUP and auto["rel_error"] <= mm["tol"],
            "value": f"{auto['speedup']:.2f}x, error {auto['rel_error']:.2e} (tol {mm['tol']:g})",
        },
        {"target": f"quanta topk >= {TOPK_SPEEDUP:g}x faster than IndexFlatIP", **speed},
        {"target": f"recall@{k} >= {RECALL}", "met": recall >= RECALL, "value": f"{recall:.4f}"},
    ]


def _table(title: str, columns: dict[str, Callable[[dict], str]], rows: list[dict]):
    """A rich table of the rows, a cell per column; a row that was not timed says why."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("row")
    for header in columns:
        table.add_column(header, justify="right")
    for row in rows:
        if "best_s" not in row:
            table.add_row(row["name"], row["outcome"], *["-"] * (len(columns) - 1))
        else:
            table.add_row(row["name"], *(cell(row) for cell in columns.values()))
    return table


def _speedup(row: dict) -> str:
    return "-" if row["speedup"] is None else f"{row['speedup']:.2f}x"


def _report(record: dict) -> None:
    from rich.console import Console

    console = Console()
    # Off a terminal rich assumes 80 columns, which would fold every cell in two.
    if not console.is_terminal:
        console.width = 150
    mm, tk, rounds, k = record["matmul"], record["topk"], record["rounds"], record["topk"]["k"]
    columns = {
        "precision": lambda r: r["precision"],
        "best s": lambda r: f"{r['best_s']:.4f}",
        "median s": lambda r: f"{r['median_s']:.4f}",
        "GFLOP/s": lambda r: f"{r['gflops']:.1f}",
        "vs numpy": _speedup,
        "rel error": lambda r: f"{r['rel_error']:.2e}",
    }
    title = f"matmul {mm['size']}^3 fp32 Gaussian, best and median of {rounds}"
    console.print(_table(title, columns, mm["rows"]))
    console.print(f"quanta auto (plan): {mm['auto_choice']['reason']}", markup=False)

    columns = {
        "build s": lambda r: f"{r['build_s']:.2f}",
        "best s": lambda r: f"{r['best_s']:.3f}",
        "median s": lambda r: f"{r['median_s']:.3f}",
        "queries/s": lambda r: f"{r['queries_per_s']:.0f}",
        "vs IndexFlatIP": _speedup,
        f"R@{k}": lambda r: f"{r[f'recall_at_{k}']:.4f}",
    }
    title = f"top-{k}: {tk['corpus_size']} x {tk['dim']} corpus, {tk['queries']} queries, "
    console.print(_table(title + f"best and median of {rounds}", columns, tk["rows"]))
    console.print(
        f"quanta corpus: {tk['corpus_precision']} codes, {tk['codes_bytes'] / 2**20:.0f} MiB; "
        f"{QUANTA_TOPK} runs the default candidates={DEFAULT_CANDIDATES}; "
        f"exact reference: {tk['reference']}",
        markup=False,
    )
    for target in record["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        console.print(f"{verdict:>12}  {target['target']}: {target['value']}", markup=False)
    load, cores = record["load_average"], record["machine"]["cores"]
    loads = ", ".join(f"{key} {value:.2f}" for key, value in load.items())
    console.print(f"1-minute load average: {loads} ({cores} cores)", markup=False)
    # The benchmark itself keeps every core busy, so only load beyond that counts after it.
    if load["before"] > BUSY_LOAD * cores or max(load.values()) > (1 + BUSY_LOAD) * cores:
        console.print("NOTE: the machine was busy; rerun on a quiet machine", markup=False)


def _plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (
        (record["matmul"], MATMUL_SPEEDUP, f"matmul {record['matmul']['size']}^3", "numpy fp32"),
        (record["topk"], TOPK_SPEEDUP, f"top-{record['topk']['k']}", "IndexFlatIP"),
    )
    for axis, (part, target, title, base) in zip(axes, panels, strict=True):
        rows = [r for r in part["rows"] if r.get("speedup") is not None]
        if not rows:
            axis.text(0.5, 0.5, f"{base} not measured", ha="center", transform=axis.transAxes)
        names = [r["name"] for r in rows]
        colors = ["#3b7dd8" if n.startswith("quanta") else "#888888" for n in names]
        axis.bar(names, [r["speedup"] for r in rows], color=colors)
        axis.axhline(target, color="#d83b3b", linestyle="--", label=f"target {target:g}x")
        axis.set_ylabel(f"speedup over {base} (higher is better)")
        axis.set_title(f"{title}, best of {record['rounds']} rounds")
        axis.tick_params(axis="x", labelsize=8, rotation=20)
        axis.legend()
        axis.grid(axis="y", alpha=0.3)
    fig.suptitle(f"quanta kernels, one run on {record['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- the command -------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m quanta.bench kernels", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--matmul-size", type=int, default=4096, help="m = n = k of the product")
    parser.add_argument("--tol", type=float, default=1e-2, help="tolerance of quanta auto")
    parser.add_argument("--corpus-size", type=int, default=1_000_000, help="rows of the corpus")
    parser.add_argument("--dim", type=int, default=384, help="dimensions of every vector")
    parser.add_argument("--queries", type=int, default=1000, help="queries searched at once")
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument(
        "--candidates",
        default="2,4",
        help=f"comma list of extra quanta topk rows by candidates (default {DEFAULT_CANDIDATES})",
    )
    parser.add_argument(
        "--corpus-precision", default="auto", help="the quanta Corpus's candidate precision"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)

    try:
        args.candidates = [int(c) for c in args.candidates.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--candidates {args.candidates!r} must be a comma list of integers")
    if min(args.matmul_size, args.dim, args.queries, args.k, args.rounds, *args.candidates) < 1:
        parser.error("sizes, --k, --rounds and --candidates must be at least 1")
    if args.corpus_size < args.k:
        parser.error(f"--corpus-size {args.corpus_size} must be at least --k {args.k}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print the tables and write kernels.json and .png to --out."""
    args = _parse(argv)
    load = {"before": os.getloadavg()[0]}
    rng = np.random.default_rng(args.seed)
    matmul_part = _matmul_part(args, rng)
    load["after_matmul"] = os.getloadavg()[0]
    topk_part = _topk_part(args, rng)
    load["after_topk"] = os.getloadavg()[0]

    machine = hardware.detect()
    record = {
        "benchmark": "kernels",
        "command": "python -m quanta.bench kernels " + " ".join(argv or sys.argv[2:]),
        "machine": {
            "cpu": machine.describe(),
            "cores": machine.cores,
            "memory_bytes": machine.memory_bytes,
            "python": platform.python_version(),
        },
        "versions": {p: _version(p) for p in ("quanta", "numpy", "torch", "faiss-cpu")},
        "torch_threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "seed": args.seed,
        "load_average": load,
        "matmul": matmul_part,
        "topk": topk_part,
    }
    record["targets"] = _targets(matmul_part, topk_part)
    _report(record)
    write_record(args.out, "kernels", record, lambda path: _plot(record, path))
    return record
