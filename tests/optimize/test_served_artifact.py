"""`quanta optimize` writes an artifact; `quanta serve --model DIR` serves it as optimized."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import quanta
from quanta.bench.corpus import sentences as stdlib_sentences
from quanta.optimize.api import embedding_task, optimize_builtin
from quanta.optimize.corpus import docstring_paragraphs
from quanta.optimize.quantize import Int8Linear
from tests.helpers import ROOT, Server


def _quanta(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "quanta.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("served") / "minilm-int8"
    texts = docstring_paragraphs()[0:64:2]
    result, summary = optimize_builtin(
        "builtin:minilm", "int8", out=out, max_loss=0.005, texts=texts, pairs=48
    )
    return out, result, summary


def test_served_embeddings_match_the_in_process_optimized_model(int8_artifact, minilm_dir):
    out, result, _ = int8_artifact
    assert any(isinstance(m, Int8Linear) for m in result.model.modules())
    texts = stdlib_sentences(24)
    # one text a batch on both sides: a batch's shape changes the kernels' rounding
    task = embedding_task(minilm_dir, pairs=10)
    expected = np.concatenate([task.forward(result.model, task.encode([t])[0]) for t in texts])

    with Server("serve", "--model", str(out), "--workers", "1", "--max-batch-size", "1") as server:
        with quanta.Client(server.url) as client:
            served = client.embed(texts)
        assert "optimized model: recipe int8" in server.log()

    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5)


def test_int8_model_keeps_the_cosine_and_runs_every_int8_product_in_int_mm(
    int8_artifact, minilm_dir
):
    _, result, summary = int8_artifact
    assert result.quality.metrics["mean_cosine"] >= 0.995
    assert result.quality.metrics["recall_at_10_drop"] <= 0.005
    int8 = [m for m in result.model.modules() if isinstance(m, Int8Linear)]
    assert len(int8) >= 12, result.decisions  # at least half of the 24 products

    task = embedding_task(minilm_dir, pairs=10)
    batch = task.encode(stdlib_sentences(8))[0]
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as profile:
        task.forward(result.model, batch)
    calls = {e.key: e.count for e in profile.key_averages()}
    assert calls.get("aten::_int_mm") == len(int8)


def test_report_and_summary_say_what_was_kept_and_what_it_bought(int8_artifact):
    out, result, summary = int8_artifact
    report = (out / "report.md").read_text()
    assert "## Decisions" in report and "## Candidates judged" in report
    for decision in result.decisions:
        assert f"| {decision.layer} | {decision.change} |" in report
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["optimized"]["mean_cosine"] >= 0.995
    assert summary["optimized"]["size_mb"] < summary["original"]["size_mb"]


def test_cli_writes_an_artifact_and_says_how_to_serve_it(tmp_path):
    calibration = tmp_path / "texts.txt"
    calibration.write_text("\n".join(docstring_paragraphs()[:16]))
    out = tmp_path / "bf16"
    result = _quanta(
        "optimize", "--recipe", "bf16", "--out", str(out),
        "--calibration", str(calibration), "--pairs", "24",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert f"quanta serve --model {out}" in result.stdout
    assert {"quanta.json", "model.safetensors", "report.md", "report.png"} <= {
        p.name for p in out.iterdir()
    }


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["--recipe", "int3"], "recipe 'int3' has unknown step 'int3'"),
        (["--recipe", "int8", "--max-loss", "-0.1"], "max_loss -0.1 must be a number >= 0"),
        (["--recipe", "int8", "--pairs", "3"], "pairs 3 must be an integer of 10 or more"),
        (["--recipe", "int8", "--calibration", "/nonexistent"], "'/nonexistent' is no file"),
    ],
)
def test_cli_bad_input_exits_2_with_the_reason(tmp_path, args, shown):
    result = _quanta("optimize", *args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert shown in result.stderr


def test_serving_an_incomplete_or_other_format_artifact_fails_fast_naming_the_file(
    int8_artifact, tmp_path
):
    out, _, _ = int8_artifact
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in out.iterdir():
        if path.name != "tokenizer.json":
            (broken / path.name).write_bytes(path.read_bytes())

    result = _quanta("serve", "--model", str(broken), "--port", "0", timeout=60)
    assert result.returncode == 2
    assert "has no tokenizer.json" in result.stderr or f"{broken}/tokenizer.json" in result.stderr

    result = _quanta("serve", "--model", str(out), "--precision", "fp32", "--port", "0", timeout=60)
    assert result.returncode == 2
    assert "keeps the precisions it was optimized to" in result.stderr
