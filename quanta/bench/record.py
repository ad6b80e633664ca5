"""Writing a benchmark's record: NAME.json and NAME.png side by side, and saying where."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_record"]


def write_record(out: Path, name: str, record: dict, plot: Callable[[Path], None]) -> None:
    """Write `record` as OUT/NAME.json, have `plot` draw OUT/NAME.png, and print both paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2))
    plot(out / f"{name}.png")
    print(f"wrote {out / f'{name}.json'} and {out / f'{name}.png'}")
