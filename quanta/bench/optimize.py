"""Benchmark `quanta optimize`'s recipes against fp32, torch's and ONNX Runtime's int8.

All rows are built in one run on this machine from the built-in
all-MiniLM-L6-v2 and judged on the same held-out retrieval pairs (the
calibration texts are separate): mean and minimum cosine of each pooled
embedding to fp32's, and recall@10. Only after every model is built are they
timed, in eager mode with the same thread count and the same token batches,
round-robin over the rows for several rounds, so a burst of load elsewhere on
a shared machine falls on every row alike; a row's latency is the median of
its rounds' medians.

    python -m quanta.bench optimize [--recipes bf16,int8,prune+int8] [--out bench-results]
    python -m quanta.bench optimize --pairs 40 --calibration 32 --recipes int8 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from quanta import hardware
from quanta.bench.optimize_peers import (
    load_fp32,
    model_size,
    ort_dynamic_int8,
    ort_unavailable,
    torch_dynamic_int8,
    versions,
)
from quanta.bench.record import write_record
from quanta.errors import ConfigError, OptimizeError
from quanta.optimize.corpus import load_corpus
from quanta.optimize.measure import latency_p50
from quanta.optimize.optimizer import optimize
from quanta.optimize.recipe import parse_recipe
from quanta.optimize.tasks import EmbeddingTask

__all__ = ["main"]

RECIPES = ("bf16", "int8", "int4", "prune", "lowrank", "prune+int8")
BATCH = 32
FP32, TORCH_INT8, ORT_INT8 = "fp32", "torch dynamic int8", "ORT dynamic int8"
# A 1-minute load average above this share of our threads means others were running.
BUSY_LOAD = 0.5


# -- building the rows -------------------------------------------------------------


def _row(name: str, model: nn.Module, task: EmbeddingTask, build_s: float, **extra) -> dict:
    """A built model's record: its quality on the held-out pairs and its size."""
    metrics = extra.pop("metrics", None) or task.evaluate(model).metrics
    size, size_method = extra.pop("size", None) or model_size(model)
    return {
        "name": name,
        "build_s": build_s,
        **metrics,
        "size_bytes": size,
        "size_method": size_method,
        **extra,
    }


def _build_quanta(
    recipe: str, fp32: nn.Module, task, max_loss: float, time_budget_s: float | None
) -> tuple[dict, nn.Module]:
    start = time.perf_counter()
    result = optimize(fp32, recipe, task, max_loss=max_loss, time_budget_s=time_budget_s)
    build_s = time.perf_counter() - start
    kept = Counter(d.change for d in result.decisions if d.kept)
    row = _row(
        f"quanta {recipe}",
        result.model,
        task,
        build_s,
        metrics=result.quality.metrics,
        recipe=recipe,
        dtype=str(result.dtype).removeprefix("torch."),
        kept=dict(kept),
        tried=len(result.decisions),
    )
    return row, result.model


def _build_all(
    args: argparse.Namespace, task: EmbeddingTask, fp32: nn.Module, load_s: float
) -> tuple[list[dict], dict]:
    """Every row's record, and the models to time by row name; failures get a row too."""
    rows = [_row(FP32, fp32, task, load_s)]
    models = {FP32: fp32}

    builders = {}
    if not args.skip_peers:
        builders[TORCH_INT8] = lambda: _build_torch_int8(fp32, task)
        if reason := ort_unavailable():
            rows.append({"name": ORT_INT8, "outcome": "skipped", "error": reason})
            print(f"{ORT_INT8}: skipped, {reason}", flush=True)
        else:
            builders[ORT_INT8] = lambda: _build_ort_int8(fp32, task, args.workdir)
    for recipe in args.recipes:
        builders[f"quanta {recipe}"] = lambda r=recipe: _build_quanta(
            r, fp32, task, args.max_loss, args.time_budget
        )

    for name, build in builders.items():
        print(f"{name}: building", flush=True)
        try:
            row, model = build()
        except OptimizeError as exc:
            rows.append({"name": name, "outcome": "no change fits", "error": str(exc)})
            print(f"{name}: {exc}", flush=True)
            continue
        except Exception as exc:  # one broken row must not cost the others' results
            error = f"{type(exc).__name__}: {exc}"
            rows.append({"name": name, "outcome": "failed", "error": error})
            print(f"{name}: failed, {error}", flush=True)
            continue
        rows.append(row)
        models[name] = model
        print(f"{name}: built in {row['build_s']:.1f} s", flush=True)
    return rows, models


def _build_torch_int8(fp32: nn.Module, task: EmbeddingTask) -> tuple[dict, nn.Module]:
    start = time.perf_counter()
    model = torch_dynamic_int8(fp32)
    return _row(TORCH_INT8, model, task, time.perf_counter() - start), model


def _build_ort_int8(fp32: nn.Module, task: EmbeddingTask, workdir: Path) -> tuple[dict, nn.Module]:
    start = time.perf_counter()
    encoder, facts = ort_dynamic_int8(fp32, task.example(BATCH), workdir)
    build_s = time.perf_counter() - start
    size = (facts.pop("size_bytes"), ".onnx file")
    return _row(ORT_INT8, encoder, task, build_s, size=size, **facts), encoder


# -- timing ------------------------------------------------------------------------


def _time_all(models: dict[str, nn.Module], task, *, rounds: int, repeat: int) -> dict:
    """Per row and batch size, the median over rounds of each round's median latency.

    Each round visits every row once, starting one row later than the round
    before, so no row always runs right after the same neighbour.
    """
    names = list(models)
    samples = {(name, b): [] for name in names for b in (BATCH, 1)}
    for index in range(rounds):
        order = names[index % len(names) :] + names[: index % len(names)]
        for name in order:
            for batch_size in (BATCH, 1):
                seconds = latency_p50(models[name], task, batch_size, repeat=repeat)
                samples[name, batch_size].append(seconds)
        print(f"timing: round {index + 1} of {rounds} done", flush=True)
    return {key: statistics.median(values) for key, values in samples.items()}


# -- targets -----------------------------------------------------------------------


def _speed_quality(speedup: float, cosine: float | None, recall_pts: float | None):
    """A test of one row: at least `speedup` over fp32, and the quality bounds given."""

    def test(row: dict) -> tuple[bool, str]:
        met = row["speedup"] >= speedup
        met &= cosine is None or row["mean_cosine"] >= cosine
        met &= recall_pts is None or row["recall_drop_pts"] <= recall_pts
        return met, _summary(row)

    return test


def _faster_than_ort(ours: dict, ort: dict) -> tuple[bool, str]:
    met = ours["p50_b32_ms"] < ort["p50_b32_ms"] and ours["mean_cosine"] >= ort["mean_cosine"]
    value = (
        f"{ours['p50_b32_ms']:.1f} vs {ort['p50_b32_ms']:.1f} ms, "
        f"cosine {ours['mean_cosine']:.4f} vs {ort['mean_cosine']:.4f}"
    )
    return met, value


# (what the project aims for, the rows it needs, the test of those rows)
TARGETS = (
    (
        "quanta int8 >= 2.5x fp32, mean cosine >= 0.995, recall@10 within 0.5 pts",
        ("quanta int8",),
        _speed_quality(2.5, 0.995, 0.5),
    ),
    (
        "quanta bf16 >= 2x fp32, mean cosine >= 0.999",
        ("quanta bf16",),
        _speed_quality(2.0, 0.999, None),
    ),
    (
        "quanta prune+int8 >= 3x fp32, recall@10 within 1 pt",
        ("quanta prune+int8",),
        _speed_quality(3.0, None, 1.0),
    ),
    (
        "quanta int8 faster than ORT int8 at equal or better cosine",
        ("quanta int8", ORT_INT8),
        _faster_than_ort,
    ),
)


def _targets(rows: dict[str, dict]) -> list[dict]:
    """Each aim with the measured values and whether it is met (None: a row is missing)."""
    results = []
    for text, names, test in TARGETS:
        missing = [n for n in names if "p50_b32_ms" not in rows.get(n, {})]
        if missing:
            value = f"not measured: {', '.join(missing)}"
            results.append({"target": text, "met": None, "value": value})
            continue
        met, value = test(*(rows[n] for n in names))
        results.append({"target": text, "met": bool(met), "value": value})
    return results


def _summary(row: dict) -> str:
    return (
        f"{row['speedup']:.2f}x, cosine {row['mean_cosine']:.4f}, "
        f"recall@10 drop {row['recall_drop_pts']:+.1f} pts"
    )


# -- the report --------------------------------------------------------------------


def _report(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"optimize: all-MiniLM-L6-v2, {record['pairs']} held-out pairs, "
        f"{record['threads']} threads, p50 of {record['rounds']} rounds x {record['repeat']} runs"
    )
    columns = ("row", "b32 ms", "b1 ms", "speedup", "mean cos", "min cos", "R@10", "ΔR@10 pts")
    for column in (*columns, "size MB", "build s"):
        table.add_column(column, justify="left" if column == "row" else "right")
    for row in record["rows"]:
        if "p50_b32_ms" not in row:
            table.add_row(row["name"], row["outcome"], *["-"] * 8)
            continue
        table.add_row(
            row["name"],
            f"{row['p50_b32_ms']:.1f}",
            f"{row['p50_b1_ms']:.2f}",
            f"{row['speedup']:.2f}x",
            f"{row['mean_cosine']:.5f}",
            f"{row['min_cosine']:.4f}",
            f"{100 * row['recall_at_10']:.1f}",
            f"{row['recall_drop_pts']:+.1f}",
            f"{row['size_bytes'] / 1e6:.1f}",
            f"{row['build_s']:.1f}",
        )
    console = Console()
    # Off a terminal rich assumes 80 columns, which would fold every cell in two.
    if not console.is_terminal:
        console.width = 150
    console.print(table)
    for row in record["rows"]:
        if "error" in row:
            console.print(f"{row['name']}: {row['outcome']}: {row['error']}", markup=False)
        if "kept" in row:
            kept = ", ".join(f"{change} x{n}" for change, n in row["kept"].items())
            total = sum(row["kept"].values())
            line = f"{row['name']}: kept {total} of {row['tried']} changes tried ({kept})"
            console.print(line, markup=False)
    for target in record["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        console.print(f"{verdict:>12}  {target['target']}: {target['value']}", markup=False)
    before, after = record["load_average"]["before"], record["load_average"]["after_timing"]
    if before > BUSY_LOAD * record["threads"] or after > (1 + BUSY_LOAD) * record["threads"]:
        console.print(
            f"NOTE: the machine was busy (1-minute load {before:.1f} at the start, "
            f"{after:.1f} after timing, for {record['threads']} threads): torch's thread "
            "pool slows far more than ORT's when cores are shared, so rerun on a quiet machine",
            markup=False,
        )


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "p50_b32_ms" in r]
    fig, axis = plt.subplots(figsize=(7.5, 4.8))
    for row in timed:
        color = "#3b7dd8" if row["name"].startswith("quanta") else "#888888"
        axis.scatter(row["p50_b32_ms"], row["mean_cosine"], color=color)
        axis.annotate(
            row["name"],
            (row["p50_b32_ms"], row["mean_cosine"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    axis.set_xlabel(f"p50 latency at batch {BATCH}, ms (lower is better)")
    axis.set_ylabel("mean cosine to fp32 (higher is better)")
    axis.set_title("all-MiniLM-L6-v2: quality against latency, one run on one machine")
    axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- the command -------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m quanta.bench optimize", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma list of recipes")
    parser.add_argument("--max-loss", type=float, default=0.005, help="budget of every recipe")
    parser.add_argument(
        "--time-budget", type=float, default=None, help="seconds of recovery after pruning"
    )
    parser.add_argument("--pairs", type=int, default=300, help="held-out retrieval pairs")
    parser.add_argument("--calibration", type=int, default=256, help="calibration texts")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per row and round")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds of timing")
    parser.add_argument(
        "--skip-peers", action="store_true", help="only fp32 and quanta: no torch or ORT int8"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)

    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    for recipe in args.recipes:
        try:
            parse_recipe(recipe)
        except ConfigError as exc:
            parser.error(str(exc))
    # Half a batch of pairs fills the first timing batch (queries, then documents).
    if args.pairs < BATCH // 2 or args.calibration < 1:
        parser.error(f"--pairs must be at least {BATCH // 2} and --calibration at least 1")
    if args.repeat < 1 or args.rounds < 1 or args.max_loss < 0:
        parser.error("--repeat and --rounds must be at least 1, --max-loss at least 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print the table and write optimize.json and .png to --out."""
    args = _parse(argv)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    fp32, tokenizer = load_fp32()
    load_s = time.perf_counter() - start
    corpus = load_corpus(calibration=args.calibration, pairs=args.pairs)
    task = EmbeddingTask(tokenizer, corpus, batch_size=BATCH)
    task.prepare(fp32)

    # The .onnx files live only as long as the ORT session that reads them is timed.
    with tempfile.TemporaryDirectory(prefix="quanta-bench-optimize-") as workdir:
        args.workdir = Path(workdir)
        rows, models = _build_all(args, task, fp32, load_s)
        latency = _time_all(models, task, rounds=args.rounds, repeat=args.repeat)
        load_after = os.getloadavg()[0]
        del models

    base = latency[FP32, BATCH]
    for row in rows:
        if (row["name"], BATCH) in latency:
            row["p50_b32_ms"] = 1e3 * latency[row["name"], BATCH]
            row["p50_b1_ms"] = 1e3 * latency[row["name"], 1]
            row["speedup"] = base / latency[row["name"], BATCH]
            row["recall_drop_pts"] = 100 * row["recall_at_10_drop"]

    record = {
        "benchmark": "optimize",
        "command": "python -m quanta.bench optimize " + " ".join(argv or sys.argv[2:]),
        "machine": {"cpu": hardware.detect().describe(), "python": platform.python_version()},
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "batch": BATCH,
        "pairs": len(corpus.queries),
        "calibration": len(corpus.calibration),
        "max_loss": args.max_loss,
        "rounds": args.rounds,
        "repeat": args.repeat,
        "load_average": {"before": load_before, "after_timing": load_after},
        "rows": rows,
    }
    record["targets"] = _targets({r["name"]: r for r in rows})
    _report(record)
    write_record(args.out, "optimize", record, lambda path: _plot(rows, path))
    return record
