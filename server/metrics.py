"""Prometheus metrics for ``GET /metrics``: what an operator needs to see that a node
is healthy and busy, and nothing about any user (no ids, names or sizes of one).

Counters are plain integers bumped where the work happens (an attribute increment
costs nothing on the hot path); the collector turns them, and a few live values
(sessions, pool connections, the listener), into metric families when scraped.
Each app has its own registry, so several servers in one process (the tests) do
not share counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import asyncpg
from prometheus_client import CONTENT_TYPE_LATEST, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["CONTENT_TYPE_LATEST", "Counters", "Live", "registry"]


@dataclass
class Counters:
    """Monotonic counts of this process, since it started."""

    sessions_opened: int = 0
    commits: int = 0
    deletes: int = 0
    upload_bytes: int = 0
    download_bytes: int = 0
    changes_sent: int = 0
    #: Error replies by (transport, code): ``("ws", "not_found")``, ``("rest", ...)``.
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)

    def error(self, transport: str, code: str) -> None:
        self.errors[(transport, code)] += 1


@dataclass
class Live:
    """Where the collector reads the values that are not counted but looked up."""

    sessions: Callable[[], int]
    feed_queries: Callable[[], int]
    listener_connections: Callable[[], int]
    listener_up: Callable[[], bool]
    pool: asyncpg.Pool


class _Collector(Collector):
    def __init__(self, counters: Counters, live: Live) -> None:
        self.counters = counters
        self.live = live

    def collect(self) -> Iterator[Metric]:
        c, live = self.counters, self.live

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"tessera_{name}", doc, value=value)

        yield GaugeMetricFamily(
            "tessera_sessions", "WebSocket sessions open on this node", value=live.sessions()
        )
        yield counter("sessions_opened", "sessions that completed hello", c.sessions_opened)
        yield counter("commits", "uploads committed (WebSocket and REST)", c.commits)
        yield counter("deletes", "objects deleted", c.deletes)
        yield counter("upload_bytes", "ciphertext bytes received", c.upload_bytes)
        yield counter("download_bytes", "ciphertext bytes sent in data frames", c.download_bytes)
        yield counter("changes_sent", "change frames sent to sessions", c.changes_sent)
        yield counter("feed_queries", "feed reads that went to the database", live.feed_queries())
        yield counter(
            "listener_connections",
            "times the LISTEN connection was (re)established",
            live.listener_connections(),
        )
        yield GaugeMetricFamily(
            "tessera_listener_up", "1 while the LISTEN connection is up", value=live.listener_up()
        )
        errors = CounterMetricFamily(
            "tessera_errors", "error replies by transport and code", labels=["transport", "code"]
        )
        for (transport, code), n in sorted(c.errors.items()):
            errors.add_metric([transport, code], n)
        yield errors
        size, idle = live.pool.get_size(), live.pool.get_idle_size()
        pool = GaugeMetricFamily(
            "tessera_db_connections", "pooled database connections", labels=["state"]
        )
        pool.add_metric(["busy"], size - idle)
        pool.add_metric(["idle"], idle)
        yield pool


def registry(counters: Counters, live: Live) -> CollectorRegistry:
    """A registry of this app's metrics and its process (CPU, memory, file descriptors)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(counters, live))
    ProcessCollector(registry=reg)
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
