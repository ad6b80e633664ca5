"""What the optimizer did and why: one decision per change tried, and the candidates measured.

`Observed` wraps a task so that every model the search judges is also timed
and kept as a `Candidate`, with progress bars for calibration and search, and
`write_report` turns the lot into report.md and report.png:

    observed = Observed(task, progress=True)
    result = optimize(model, "int8", observed)
    write_report(out_dir, result, observed.candidates)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from quanta.optimize.measure import latency_p50

__all__ = ["Decision", "Candidate", "Observed", "write_report"]

# Timed runs per candidate: enough for a median that orders candidates, cheap
# next to the evaluation that judged it.
_CANDIDATE_REPEAT = 3


@dataclass(frozen=True)
class Decision:
    """One change tried on one layer: kept or not, and why.

    Args:
        layer: the module's name in the model, e.g. `blocks.0.mlp.fc`.
        change: what was tried, e.g. `int8`, `prune 25% of neurons`, `rank 96`.
        kept: whether the change stayed in the model.
        reason: why, in words a user can act on.
        loss: the whole model's loss with the change, where it was measured.
    """

    layer: str
    change: str
    kept: bool
    reason: str
    loss: float | None = None


@dataclass(frozen=True)
class Candidate:
    """A whole model the optimizer measured: its quality and latency."""

    label: str
    loss: float
    metrics: dict
    latency_s: dict
    size_bytes: int = 0


class _Tracked(list):
    """Calibration batches that advance a progress bar as they are iterated."""

    def __init__(self, batches: list, advance: Any):
        super().__init__(batches)
        self._advance = advance

    def __iter__(self) -> Iterator:
        for batch in super().__iter__():
            yield batch
            self._advance()


class Observed:
    """A task whose every evaluation is also timed and recorded as a candidate.

    Everything else (`forward`, `calibration`, `example`, ...) is the task's own.

    Args:
        task: an `EmbeddingTask` or `TensorTask`.
        progress: show rich progress bars for calibration passes and the search.
        time_candidates: time each evaluated model at the task's batch size.
    """

    def __init__(self, task: Any, *, progress: bool = False, time_candidates: bool = True):
        self.task = task
        self.time_candidates = time_candidates
        self.candidates: list[Candidate] = []
        self._progress = None
        if progress:
            from rich.progress import Progress

            self._progress = Progress(transient=False)
            self._calibration = self._progress.add_task("calibration passes", total=None)
            self._search = self._progress.add_task("candidates judged", total=None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def __enter__(self) -> Observed:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    @property
    def calibration(self) -> list:
        if self._progress is None:
            return self.task.calibration
        return _Tracked(self.task.calibration, self._advance_calibration)

    def _advance_calibration(self) -> None:
        self._progress.advance(self._calibration)

    def evaluate(self, model: nn.Module) -> Any:
        """The task's quality of `model`; also its latency, kept as a candidate."""
        quality = self.task.evaluate(model)
        latency = {}
        if self.time_candidates:
            batch = self.task.batch_size
            latency[batch] = latency_p50(model, self.task, batch, repeat=_CANDIDATE_REPEAT)
        label = f"candidate {len(self.candidates)}"
        self.candidates.append(Candidate(label, quality.loss, quality.metrics, latency))
        if self._progress is not None:
            self._progress.advance(self._search)
        return quality


def write_report(
    out: str | Path,
    result: Any,
    candidates: list[Candidate],
    summary: dict[str, dict[str, float]],
) -> tuple[Path, Path]:
    """Write report.md (summary, decisions, candidates) and report.png into `out`.

    Args:
        out: the artifact directory.
        result: the `Optimized` the optimizer returned.
        candidates: every model judged on the way, from `Observed`.
        summary: per model ("original", "optimized"): metrics, latency, size.

    Returns:
        The paths of the markdown report and the plot.
    """
    out = Path(out)
    lines = [
        f"# quanta optimize: recipe `{result.recipe.name}`, max loss {result.max_loss}",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}. Loss is the drop against the original "
        "on held-out data (1 - mean cosine for an embedder, the accuracy drop for a "
        "classifier).",
        "",
        "| measure | " + " | ".join(summary) + " |",
        "| --- | " + " | ".join("---:" for _ in summary) + " |",
    ]
    for key in _columns(summary):
        lines.append(
            f"| {key} | " + " | ".join(_cell(row.get(key)) for row in summary.values()) + " |"
        )
    lines += ["", "## Decisions", "", "| layer | change | kept | loss | reason |"]
    lines.append("| --- | --- | --- | ---: | --- |")
    for d in result.decisions:
        kept = "yes" if d.kept else "no"
        lines.append(f"| {d.layer} | {d.change} | {kept} | {_cell(d.loss)} | {d.reason} |")
    lines += ["", "## Candidates judged", "", "| candidate | loss | latency ms |"]
    lines.append("| --- | ---: | ---: |")
    for c in candidates:
        ms = ", ".join(f"{s * 1e3:.1f} at batch {b}" for b, s in c.latency_s.items())
        lines.append(f"| {c.label} | {c.loss:.5f} | {ms or '-'} |")
    markdown = out / "report.md"
    markdown.write_text("\n".join(lines) + "\n")
    return markdown, _plot(out / "report.png", result, candidates, summary)


def _columns(summary: dict[str, dict[str, float]]) -> list[str]:
    return list(dict.fromkeys(key for row in summary.values() for key in row))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def _plot(path: Path, result: Any, candidates: list[Candidate], summary: dict) -> Path:
    """Quality against latency for every candidate, with the budget drawn in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [c for c in candidates if c.latency_s]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    if timed:
        xs = [next(iter(c.latency_s.values())) * 1e3 for c in timed]
        ax.scatter(xs, [c.loss for c in timed], s=18, color="tab:blue", label="candidates judged")
        ax.scatter(xs[-1:], [timed[-1].loss], s=60, color="tab:red", label="final model")
        batch = next(iter(timed[0].latency_s))
        ax.set_xlabel(f"latency p50 at batch {batch} (ms)")
    ax.axhline(result.max_loss, color="gray", linestyle="--", label=f"max loss {result.max_loss}")
    ax.set_ylabel("loss against the original (lower is better)")
    ax.set_title(f"quanta optimize, recipe {result.recipe.name}")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
