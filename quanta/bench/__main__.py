"""`python -m quanta.bench NAME`: run one benchmark."""

from __future__ import annotations

import sys

BENCHMARKS = {
    "kernels": "quanta.bench.kernels",
    "optimize": "quanta.bench.optimize",
    "serve": "quanta.bench.serve",
    "transport": "quanta.bench.transport",
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print(
            f"usage: python -m quanta.bench {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr
        )
        return 2
    import importlib

    importlib.import_module(BENCHMARKS[sys.argv[1]]).main(sys.argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
