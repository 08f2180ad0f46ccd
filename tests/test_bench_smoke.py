"""The benchmarks must keep working: run them all at smoke sizes, as ``make bench`` would.

``python -m bench --smoke`` uses tiny sizes and writes nothing, so this keeps
the benchmark code from rotting without costing the suite more than a minute
or so. Only benchmark modules that exist are run (a name in ``BENCHMARKS``
whose module is not written yet is skipped, not failed).
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
    """The names in BENCHMARKS whose module exists and has ``run``."""
    names = []
    for name in BENCHMARKS:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bench.{name}":
                continue  # not written yet
            raise  # the module exists but is broken
        assert callable(getattr(module, "run", None)), f"bench.{name} has no run()"
        names.append(name)
    return names


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
