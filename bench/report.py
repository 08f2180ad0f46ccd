"""Benchmark results and the table in docs/benchmarks.md.

Every figure is measured beside its baseline in the same run; the table shows
both, the ratio, the target and whether it was met.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

REPORT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
RAW = REPORT.with_suffix(".json")


@dataclass
class Result:
    benchmark: str  # e.g. "upload, one session, LocalStore"
    figure: float
    unit: str  # e.g. "MiB/s", "ms", "KiB/session"
    target: str  # e.g. ">= 60 % of baseline", "p99 <= 15 ms"
    met: bool | None  # None: no target applies
    baseline: float | None = None
    baseline_name: str = ""  # e.g. "bare websockets sink"
    settings: str = ""  # e.g. "1 GiB, 4 MiB parts"
    notes: str = ""
    extra: dict[str, float] = field(default_factory=dict)  # p50/p99 etc.

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        return self.figure / self.baseline  # type: ignore[operator]


def versions() -> str:
    names = ["uvicorn", "websockets", "starlette", "asyncpg", "miniopy-async", "msgpack"]
    found = []
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    return ", ".join(found)


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}, Python {sys.version.split()[0]}"
    )


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def render(results: list[Result], *, smoke: bool = False) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m bench`); do not edit by hand. Every figure was",
        "measured in the same run as its baseline, on the machine below. The load",
        "generator always runs in its own process, never inside the server.",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}",
        f"- versions: {versions()}",
        f"- mode: {'smoke (tiny sizes; figures meaningless)' if smoke else 'full'}",
        "",
        "| benchmark | settings | figure | baseline | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = f"{_fmt(r.baseline)} {r.unit} ({r.baseline_name})" if r.baseline_name else "—"
        ratio = f"{r.ratio:.0%}" if r.ratio is not None else "—"
        met = {True: "yes", False: "**no**", None: "—"}[r.met]
        lines.append(
            f"| {r.benchmark} | {r.settings} | {_fmt(r.figure)} {r.unit} | {base} | {ratio} "
            f"| {r.target} | {met} |"
        )
    notes = [r for r in results if r.notes or r.extra]
    if notes:
        lines += ["", "## Notes", ""]
        for r in notes:
            extra = ", ".join(f"{k} {_fmt(v)}" for k, v in r.extra.items())
            lines.append(
                f"- **{r.benchmark}**: {r.notes}{' — ' if r.notes and extra else ''}{extra}"
            )
    return "\n".join(lines) + "\n"


def merge(previous: list[Result], new: list[Result]) -> list[Result]:
    """Replace the rows of the benchmarks just run; keep the others from the last run."""
    fresh = {r.benchmark for r in new}
    return [r for r in previous if r.benchmark not in fresh] + new


def load_raw() -> list[Result]:
    try:
        return [Result(**d) for d in json.loads(RAW.read_text())]
    except (FileNotFoundError, ValueError, TypeError):
        return []


def save(results: list[Result], *, smoke: bool) -> None:
    """Write docs/benchmarks.md (and its raw JSON); smoke runs write nothing."""
    if smoke:
        return
    merged = merge(load_raw(), results)
    RAW.write_text(json.dumps([asdict(r) for r in merged], indent=1))
    REPORT.write_text(render(merged))
