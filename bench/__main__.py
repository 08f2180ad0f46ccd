"""``python -m bench [--smoke] [name ...]``: run benchmarks and write docs/benchmarks.md.

Each benchmark module has ``run(smoke: bool) -> list[Result]``; ``--smoke``
uses tiny sizes (for ``make test``, so the suite cannot rot) and writes nothing.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from bench.report import REPORT, Result, render, save

#: name -> module under bench/, in the order of the table in docs/benchmarks.md.
BENCHMARKS = [
    "upload",
    "download",
    "upload_memory",
    "push_latency",
    "load_latency",
    "idle_sessions",
    "fanout",
    "catchup",
    "small_commits",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {BENCHMARKS}")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; write nothing")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    results: list[Result] = []
    for name in args.names or BENCHMARKS:
        started = time.monotonic()
        module = importlib.import_module(f"bench.{name}")
        got = module.run(smoke=args.smoke)
        print(f"{name}: {len(got)} result(s) in {time.monotonic() - started:.1f}s", flush=True)
        results += got
    print(render(results, smoke=args.smoke))
    save(results, smoke=args.smoke)
    if not args.smoke:
        print(f"written to {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
