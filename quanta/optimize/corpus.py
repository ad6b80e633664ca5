"""Real text for calibrating and judging an embedder: the standard library's docstrings.

A paragraph of a docstring whose first sentence is followed by more text gives
a retrieval pair: the first sentence is the query, the rest the document it
should find. Paragraphs are split in two fixed halves, one to calibrate on and
one to judge with, so no candidate is judged on text it was tuned on.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from dataclasses import dataclass

__all__ = ["Corpus", "docstring_paragraphs", "load_corpus"]

# Modules whose docstrings are English prose about many different things.
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
    "email.message",
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
    "pickle",
    "heapq",
    "contextlib",
    "dataclasses",
    "enum",
    "io",
    "tempfile",
    "glob",
    "fnmatch",
    "difflib",
    "calendar",
    "hashlib",
    "hmac",
    "base64",
    "struct",
    "codecs",
    "locale",
    "gettext",
    "queue",
    "sched",
    "selectors",
    "signal",
    "ssl",
    "uuid",
    "weakref",
    "copy",
    "pprint",
    "traceback",
    "warnings",
    "abc",
    "numbers",
    "fractions",
    "math",
    "operator",
    "bisect",
    "array",
    "mailbox",
    "smtplib",
    "ftplib",
    "xml.dom.minidom",
    "html.parser",
    "multiprocessing.pool",
    "concurrent.futures",
    "importlib.metadata",
    "zoneinfo",
    "ipaddress",
    "shlex",
    "cmd",
    "pdb",
    "timeit",
    "trace",
    "gzip",
    "bz2",
    "lzma",
    "zlib",
    "filecmp",
    "netrc",
    "plistlib",
    "wave",
    "colorsys",
    "imaplib",
    "poplib",
    "xmlrpc.client",
    "socketserver",
    "http.server",
    "http.cookiejar",
    "urllib.parse",
    "webbrowser",
    "optparse",
    "getopt",
    "platform",
    "sysconfig",
    "tokenize",
    "ast",
    "dis",
    "pydoc",
    "doctest",
)
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]'\"`])\.\s+(?=[A-Z])")


@dataclass(frozen=True)
class Corpus:
    """Texts to calibrate on, and held-out retrieval pairs to judge with."""

    calibration: list[str]
    queries: list[str]
    documents: list[str]


def docstring_paragraphs(*, min_chars: int = 120, max_chars: int = 1200) -> list[str]:
    """Distinct prose paragraphs of standard library docstrings, in a fixed order.

    A paragraph counts when it has at least two sentences and no code
    (no line starting with `>>>` and no indented block).
    """
    found: dict[str, None] = {}
    for module_name in _MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a platform without it: the rest still makes a corpus
            continue
        for name in sorted(dir(module)):
            # Deprecated aliases (typing.io, ...) warn when touched; only their docs are read.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                doc = inspect.getdoc(getattr(module, name, None))
            for raw in (doc or "").split("\n\n"):
                if ">>>" in raw or "\n " in raw or raw.startswith(" "):
                    continue
                paragraph = " ".join(raw.split())
                if min_chars <= len(paragraph) <= max_chars and _split(paragraph):
                    found.setdefault(paragraph)
    return list(found)


def _split(paragraph: str) -> tuple[str, str] | None:
    """(first sentence, the rest) when both have some substance."""
    parts = _SENTENCE_END.split(paragraph, maxsplit=1)
    if len(parts) != 2 or len(parts[0]) < 25 or len(parts[1]) < 40:
        return None
    return parts[0] + ".", parts[1]


def load_corpus(*, calibration: int = 256, pairs: int = 300) -> Corpus:
    """Split the paragraphs: even ones (whole) to calibrate, odd ones as retrieval pairs.

    Args:
        calibration: how many calibration texts at most.
        pairs: how many held-out query/document pairs at most.
    """
    paragraphs = docstring_paragraphs()
    queries, documents = [], []
    for paragraph in paragraphs[1::2][:pairs]:
        query, document = _split(paragraph)
        queries.append(query)
        documents.append(document)
    return Corpus(paragraphs[0::2][:calibration], queries, documents)
