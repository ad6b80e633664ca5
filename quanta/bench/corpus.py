"""Real text for tests and benchmarks, built from the standard library's docstrings."""

from __future__ import annotations

import importlib
import inspect

__all__ = ["sentences"]

# Modules whose docstrings are plain English prose about many different things.
_MODULES = (
    "os",
    "json",
    "collections",
    "pathlib",
    "subprocess",
    "threading",
    "asyncio",
    "inspect",
    "re",
    "socket",
    "functools",
    "itertools",
    "argparse",
    "logging",
    "datetime",
    "decimal",
    "email",
    "http.client",
    "urllib.request",
    "unittest",
    "typing",
    "shutil",
    "tarfile",
    "zipfile",
    "sqlite3",
    "csv",
    "configparser",
    "textwrap",
    "string",
    "random",
    "statistics",
)


def sentences(count: int, *, min_chars: int = 20, max_chars: int = 300) -> list[str]:
    """Up to `count` distinct first sentences of standard library docstrings.

    The order is fixed for a given Python version, so two runs embed the same text.
    """
    found: dict[str, None] = {}
    for module_name in _MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(dir(module)):
            doc = inspect.getdoc(getattr(module, name, None))
            if not doc:
                continue
            paragraph = " ".join(doc.split("\n\n")[0].split())
            first = paragraph.split(". ")[0].strip()
            if min_chars <= len(first) <= max_chars:
                found.setdefault(first)
            if len(found) == count:
                return list(found)
    return list(found)
