"""Server settings: one naming scheme for flags and environment variables.

Every field of :class:`Settings` is settable as ``--field-name`` on the command
line and as ``TESSERA_FIELD_NAME`` in the environment; a flag wins over the
environment, which wins over the default. Keeping the mapping mechanical means
the README, ``docker-compose.yml`` and ``make run`` can never drift from what the
server really reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from protocol.limits import Limits

ENV_PREFIX = "TESSERA_"
LOG_LEVELS = ("debug", "info", "warning", "error")

MiB = 1024 * 1024


def _h(text: str) -> dict[str, Any]:
    return {"help": text}


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = field(default="127.0.0.1", metadata=_h("address to listen on"))
    port: int = field(default=8080, metadata=_h("port to listen on"))
    data_dir: Path = field(
        default=Path("./tessera-data"),
        metadata=_h("embedded PostgreSQL, local blob store, spool and secrets live here"),
    )
    database_url: str = field(
        default="", metadata=_h("PostgreSQL URL; empty starts an embedded server in data_dir")
    )
    s3_endpoint: str = field(
        default="", metadata=_h("S3/MinIO endpoint host:port; empty uses a local directory store")
    )
    s3_access_key: str = field(default="", metadata=_h("S3 access key"))
    s3_secret_key: str = field(default="", metadata=_h("S3 secret key"))
    s3_secure: bool = field(default=False, metadata=_h("use HTTPS to reach the S3 endpoint"))
    s3_region: str = field(default="us-east-1", metadata=_h("S3 region"))
    s3_staging_bucket: str = field(
        default="tessera-staging", metadata=_h("bucket for parts of unfinished uploads")
    )
    s3_partitions_bucket: str = field(
        default="tessera-partitions", metadata=_h("bucket for committed partitions")
    )
    s3_create_buckets: bool = field(
        default=True, metadata=_h("create the buckets at start when they are missing")
    )
    local_group_sync: bool = field(
        default=True,
        metadata=_h("local store: make small writes durable together, one syncfs per batch"),
    )
    jwt_secret: str = field(
        default="",
        metadata=_h("HMAC key for access tokens; empty generates one in data_dir (one node only)"),
    )
    access_ttl: int = field(default=900, metadata=_h("access token lifetime, seconds"))
    refresh_ttl: int = field(default=30 * 86400, metadata=_h("refresh token lifetime, seconds"))
    upload_ttl: int = field(default=86400, metadata=_h("unfinished uploads expire after, seconds"))
    presign_ttl: int = field(default=300, metadata=_h("presigned download URL lifetime, seconds"))
    hello_timeout: float = field(default=10.0, metadata=_h("seconds to wait for hello"))
    janitor_interval: float = field(default=60.0, metadata=_h("seconds between janitor runs"))
    gc_freeze_interval: float = field(
        default=2.0,
        metadata=_h(
            "seconds between moving live objects out of the garbage collector's sight (0: off)"
        ),
    )
    gc_full_interval: float = field(
        default=900.0,
        metadata=_h("seconds between full garbage collections that include those objects"),
    )
    orphan_grace: float = field(
        default=3600.0,
        metadata=_h("store objects without metadata are removed after this many seconds"),
    )
    garbage_delay: float = field(
        default=600.0,
        metadata=_h("seconds superseded partition data is kept for downloads under way"),
    )
    default_quota: int = field(
        default=10 * 1024 * MiB, metadata=_h("bytes of storage for a new user")
    )
    max_frame: int = field(default=2 * MiB, metadata=_h("largest WebSocket message, bytes"))
    max_chunk: int = field(default=1 * MiB, metadata=_h("largest chunk data, bytes"))
    max_partition: int = field(default=16 * MiB, metadata=_h("largest partition, bytes"))
    max_parts: int = field(default=10_000, metadata=_h("most partitions in one object"))
    window: int = field(default=8 * MiB, metadata=_h("upload credit per session, bytes"))
    max_gets: int = field(default=16, metadata=_h("concurrent downloads per session"))
    max_sessions_per_user: int = field(
        default=64, metadata=_h("concurrent WebSocket sessions per user and node (4429 beyond)")
    )
    outbox_frames: int = field(
        default=1024, metadata=_h("control frames queued per session before it counts as slow")
    )
    slow_consumer_timeout: float = field(
        default=30.0, metadata=_h("seconds a full outbox may last before the session is closed")
    )
    ws_ping_interval: float = field(
        default=20.0, metadata=_h("seconds between WebSocket pings (dead peers are dropped)")
    )
    ws_ping_timeout: float = field(
        default=20.0, metadata=_h("seconds to wait for a pong before dropping the peer")
    )
    long_poll_max: float = field(
        default=60.0, metadata=_h("longest wait= accepted by GET /v1/changes, seconds")
    )
    max_long_polls: int = field(
        default=16, metadata=_h("waiting GET /v1/changes per user on one node (429 beyond)")
    )
    login_max_failures: int = field(
        default=10, metadata=_h("failed logins per account and per address per window (429)")
    )
    login_window: float = field(default=60.0, metadata=_h("login throttling window, seconds"))
    frame_rate: float = field(
        default=2000.0, metadata=_h("frames per second per session (burst: twice that)")
    )
    byte_rate: int = field(
        default=512 * MiB, metadata=_h("chunk bytes per second per session (excess is delayed)")
    )
    max_requests: int = field(
        default=64, metadata=_h("requests in flight per session (rate_limited beyond)")
    )
    max_open_uploads: int = field(
        default=100, metadata=_h("unfinished uploads per user (rate_limited beyond)")
    )
    max_staged_bytes: int = field(
        default=16 * 1024 * MiB,
        metadata=_h("bytes declared by a user's unfinished uploads (quota_exceeded beyond)"),
    )
    ingest_threads: int = field(
        default=0,
        metadata=_h("threads writing and hashing uploaded chunks; 0: one per core, at most 8"),
    )
    idle_timeout: float = field(
        default=3600.0, metadata=_h("seconds without a frame from the client before closing")
    )
    argon2_time_cost: int = field(default=3, metadata=_h("Argon2id iterations"))
    argon2_memory_cost: int = field(default=65536, metadata=_h("Argon2id memory, KiB"))
    migrate: bool = field(default=True, metadata=_h("apply migrations when serving"))
    log_level: str = field(default="info", metadata=_h("debug, info, warning or error"))
    trusted_proxies: str = field(
        default="",
        metadata=_h(
            "comma-separated addresses or networks of reverse proxies whose "
            "X-Forwarded-For and X-Forwarded-Proto are believed; empty: none, the TCP "
            "peer is the client (login throttling is per client address)"
        ),
    )

    @property
    def limits(self) -> Limits:
        return Limits(
            max_frame=self.max_frame,
            max_chunk=self.max_chunk,
            max_partition=self.max_partition,
            max_parts=self.max_parts,
            window=self.window,
        )

    @property
    def uses_s3(self) -> bool:
        return bool(self.s3_endpoint)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_sources(
        cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
    ) -> Settings:
        """Defaults, overridden by the environment, overridden by flags."""
        parser = argparse.ArgumentParser(add_help=False)
        add_arguments(parser)
        return cls.from_namespace(parser.parse_args(list(argv or [])), env)

    @classmethod
    def from_namespace(
        cls, ns: argparse.Namespace, env: Mapping[str, str] | None = None
    ) -> Settings:
        """Settings from parsed flags (None = not given) over the environment."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            flag = getattr(ns, f.name, None)
            raw = env.get(env_name(f.name))
            if flag is not None:
                values[f.name] = flag
            elif raw is not None and raw != "":
                values[f.name] = _convert(f, raw)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        self.limits.validate()
        if self.port < 0 or self.port > 65535:
            raise ValueError("port must be 0..65535")
        if self.access_ttl <= 0 or self.upload_ttl <= 0 or self.refresh_ttl <= 0:
            raise ValueError("token and upload lifetimes must be positive")
        for name in (
            "frame_rate",
            "byte_rate",
            "max_requests",
            "max_open_uploads",
            "login_max_failures",
            "idle_timeout",
            "login_window",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.ingest_threads < 0:
            raise ValueError("ingest_threads must be 0 (one per core) or more")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        for entry in self.proxies:
            try:
                network = ipaddress.ip_network(entry)  # strict, as uvicorn reads it
            except ValueError:
                raise ValueError(
                    f"trusted_proxies: {entry!r} is not an IP address or network"
                ) from None
            if network.prefixlen == 0:  # every client could then claim any address
                raise ValueError(f"trusted_proxies: {entry!r} would trust every peer")

    @property
    def proxies(self) -> list[str]:
        """``trusted_proxies`` as a list."""
        return [p.strip() for p in self.trusted_proxies.split(",") if p.strip()]


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _type_of(f: dataclasses.Field[Any]) -> type:
    default = f.default
    return type(default) if not isinstance(default, Path) else Path


def _parse_bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {raw!r}")


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = _type_of(f)
    try:
        if kind is bool:
            return _parse_bool(raw)
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"{env_name(f.name)}: {exc}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; unset flags stay None so the environment can fill them."""
    for f in fields(Settings):
        kind = _type_of(f)
        help_text = f"{f.metadata.get('help', '')} (env {env_name(f.name)}, default {f.default})"
        if kind is bool:
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag_name(f.name), dest=f.name, default=None, type=kind, help=help_text
            )
