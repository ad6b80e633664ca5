"""A text collection to search: read from a file, its vectors cached beside it.

Two formats, told apart by the file name:

    notes.txt      one text per line; a text's id is its line number
    notes.jsonl    one JSON object per line: {"id": "a1", "text": "..."}; ids are
                   strings or integers and must be unique

Blank lines are skipped in both. The embedded vectors are written next to the
collection as `<file>.vectors.npy`, with `<file>.vectors.json` recording what
they were made from (the file's SHA-256 and the model). A restart whose file
and model are unchanged memory-maps the vectors instead of embedding again.

This module reads and checks files only; it imports no torch, so the gateway
can load a collection to answer with ids and texts.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from quanta.errors import ConfigError

__all__ = ["Collection", "read_collection", "VectorCache"]

# The version of the cache's layout; a cache of another version is rebuilt.
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Collection:
    """The texts of a collection file, in file order, with their ids."""

    path: Path
    ids: list[str | int]
    texts: list[str]
    sha256: str

    def __len__(self) -> int:
        return len(self.texts)


def read_collection(path: str | os.PathLike) -> Collection:
    """Read a collection file (see the module docstring).

    Raises:
        ConfigError: the file is missing or unreadable, holds no text, or a
            line is malformed; the message names the file and the line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"index file {str(path)!r} does not exist; pass an existing file"
        ) from None
    except OSError as exc:
        raise ConfigError(f"index file {str(path)!r} cannot be read: {exc.strerror}") from None
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"index file {str(path)!r} is not UTF-8 text (byte {exc.start}); convert it to UTF-8"
        ) from None
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    ids, texts = _read_jsonl(path, lines) if jsonl else _read_lines(lines)
    if not texts:
        raise ConfigError(f"index file {str(path)!r} holds no text; add one text per line")
    return Collection(path, ids, texts, hashlib.sha256(data).hexdigest())


def _read_lines(lines: list[str]) -> tuple[list[int], list[str]]:
    ids, texts = [], []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            ids.append(number)
            texts.append(line.strip())
    return ids, texts


def _read_jsonl(path: Path, lines: list[str]) -> tuple[list[str | int], list[str]]:
    ids, texts, seen = [], [], {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where} is not valid JSON ({exc.msg}); fix or remove it") from None
        if not isinstance(record, dict):
            raise ConfigError(f'{where} is not a JSON object; write {{"id": ..., "text": ...}}')
        text, key = record.get("text"), record.get("id")
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f'{where} has no non-empty string "text"')
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise ConfigError(f'{where} has no "id" that is a string or an integer')
        if key in seen:
            raise ConfigError(
                f"{where} repeats the id {key!r} of line {seen[key]}; ids must be unique"
            )
        seen[key] = number
        ids.append(key)
        texts.append(text.strip())
    return ids, texts


@dataclass(frozen=True)
class VectorCache:
    """Where the vectors of a collection are cached, and whether they are current."""

    vectors: Path
    record: Path

    @classmethod
    def beside(
        cls, path: str | os.PathLike, directory: str | os.PathLike | None = None
    ) -> VectorCache:
        """The cache of the collection file `path`: next to it, or in `directory` if given."""
        path = Path(path)
        folder = Path(directory) if directory is not None else path.parent
        return cls(folder / f"{path.name}.vectors.npy", folder / f"{path.name}.vectors.json")

    def expected(self, collection: Collection, model: str) -> dict:
        return {
            "format": CACHE_FORMAT,
            "sha256": collection.sha256,
            "model": model,
            "count": len(collection),
        }

    def read_record(self) -> dict:
        """What the cached vectors were made from; empty if there is no readable record."""
        try:
            record = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def is_current(self, collection: Collection, model: str) -> bool:
        """Whether the cached vectors were made from this file with this model."""
        record = self.read_record()
        expected = self.expected(collection, model)
        return self.vectors.is_file() and all(record.get(k) == v for k, v in expected.items())

    def write_record(self, collection: Collection, model: str, dimensions: int) -> None:
        record = {**self.expected(collection, model), "dimensions": dimensions}
        partial = self.record.with_suffix(".json.partial")
        partial.write_text(json.dumps(record, indent=1))
        partial.replace(self.record)
