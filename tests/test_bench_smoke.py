"""The benchmarks must keep working: run them all at smoke sizes, as ``make bench`` would.

``python -m bench --smoke`` uses tiny sizes and writes nothing, so this keeps
the benchmark code from rotting without costing the suite more than a minute
or so. Every name in ``BENCHMARKS`` must have its module, with a ``run``.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import BENCHMARKS

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300


def available() -> list[str]:
    """The names in BENCHMARKS, each checked to have a module with ``run``."""
    for name in BENCHMARKS:
        module = importlib.import_module(f"bench.{name}")
        assert callable(getattr(module, "run", None)), f"bench.{name} has no run()"
    return list(BENCHMARKS)


@pytest.mark.timeout(TIMEOUT + 30)
def test_every_benchmark_runs_at_smoke_size() -> None:
    names = available()
    assert names, "no benchmark modules found"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", *names],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    rows = 0
    for name in names:
        match = re.search(rf"^{re.escape(name)}: (\d+) result\(s\)", proc.stdout, re.MULTILINE)
        assert match, f"no results line for {name}:\n{output[-4000:]}"
        assert int(match.group(1)) > 0, f"{name} produced no results"
        rows += int(match.group(1))
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) - 1 >= rows, proc.stdout  # the header row, then one row per result
    assert "mode: smoke" in proc.stdout
