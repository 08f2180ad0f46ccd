"""``python -m bench [name ...]``: run benchmarks (all by default)."""

from __future__ import annotations

import sys

from bench import push_latency

BENCHMARKS = {"push_latency": push_latency.main}


def main() -> None:
    names = sys.argv[1:] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    for name in names:
        sys.argv = [name]
        BENCHMARKS[name]()


if __name__ == "__main__":
    main()
