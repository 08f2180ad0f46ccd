"""``tessera``: the command-line client.

Commands wrap the SDK (:mod:`client.sdk`): ``register``, ``login``, ``logout``,
``passwd``, ``push``, ``pull``, ``ls``, ``rm``, ``devices``, ``status`` and
``sync``. Every failure ends as one line, ``tessera: error: <message>``, on
stderr and exit status 1; usage errors exit 2 (click), an interrupt 130.

Environment:

* ``TESSERA_SERVER`` — the server URL (``--server``), needed for ``register``
  and ``login``; later commands use the one saved at login.
* ``TESSERA_CONFIG_DIR`` — where this device keeps its state (``--config-dir``).
* ``TESSERA_PASSWORD`` — the password, for scripts (or ``--password-stdin``).
  ``passwd`` reads the new one from ``TESSERA_NEW_PASSWORD``.
* ``TESSERA_PART_SIZE`` — plaintext bytes per partition (default 4 MiB).
* ``TESSERA_KDF_FAST=1`` — **tests only**: cheap Argon2id parameters for new
  key bundles. A bundle made this way is far easier to brute-force.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import functools
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import click
import httpx

from client import crypto
from client.api import ApiError
from client.connection import Connection, RemoteError, ServerClosed
from client.crypto import IntegrityError
from client.sdk import RemoteFile, Revoked, Tessera
from client.state import NotLoggedIn, State
from client.transfer import Conflict, FileChanged, journal_key

log = logging.getLogger("tessera")

T = TypeVar("T")

#: The shortest new password the client accepts.
MIN_PASSWORD = 8

#: Test-only Argon2id parameters (TESSERA_KDF_FAST=1).
FAST_KDF = {"iterations": 1, "lanes": 1, "memory_kib": 8 * 1024}


# ------------------------------------------------------------------ errors


class Fail(click.ClickException):
    """A failure reported as one line on stderr, exit status 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"tessera: error: {one_line(self.message)}", err=True)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def describe(exc: BaseException) -> str:
    """The one-line message for an exception the SDK (or the OS) raised."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = list(_leaves(exc))
        integrity = [e for e in leaves if isinstance(e, IntegrityError)]
        return describe((integrity or leaves)[0])
    if isinstance(exc, crypto.WrongPassword):
        return str(exc)
    if isinstance(exc, IntegrityError):
        text = str(exc)
        return text if "integrity" in text.lower() else f"integrity check failed: {text}"
    if isinstance(exc, ServerClosed):
        if exc.code is None:
            reason = exc.reason.removeprefix("cannot connect: ")
            return f"cannot connect to the server: {reason or 'connection lost'}"
        return f"the server closed the session: {exc}"
    if isinstance(exc, httpx.TransportError):
        where = f" at {_origin(exc)}" if _origin(exc) else ""
        return f"cannot reach the server{where}: {exc or type(exc).__name__}"
    if isinstance(exc, ApiError):
        if exc.status == 401 and exc.code == "unauthorized" and "password" not in exc.message:
            return f"{exc}; log in again (tessera login)"
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    if isinstance(
        exc,
        NotLoggedIn | Revoked | RemoteError | FileChanged | Conflict | httpx.HTTPError | OSError,
    ):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def _origin(exc: httpx.TransportError) -> str:
    """``scheme://host:port`` of the failed request, when the error knows it."""
    try:
        url = exc.request.url
    except RuntimeError:  # raised when the error carries no request
        return ""
    return f"{url.scheme}://{url.netloc.decode()}"


def handle_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn any SDK/OS failure inside a command into a one-line ``Fail``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            log.info("the command failed:", exc_info=True)  # the traceback, at -v
            raise Fail(describe(exc)) from exc

    return wrapper


# ------------------------------------------------------------------ helpers


def human_size(n: float) -> str:
    """Binary units: ``0 B``, ``1023 B``, ``64.0 KiB``, ``1.5 GiB``."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            break
    return f"{n:.1f} {unit}"


def printable(name: str) -> str:
    """A name safe to print: control and bidi characters escaped (names come from
    other devices, and must not be able to drive the terminal)."""
    if name.isprintable():
        return name
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in name)


def check_name(name: str) -> PurePosixPath:
    """A remote name as a safe relative path, or ValueError.

    Names come out of decryption, so another device of the user (or a
    bug) chose them: never let one climb out of the destination directory.
    """
    if not name or "\x00" in name:
        raise ValueError(f"unsafe name {name!r}")
    if name.startswith("/") or os.path.isabs(name) or (os.altsep and os.altsep in name):
        raise ValueError(f"unsafe name {name!r} (absolute path)")
    if os.sep != "/" and os.sep in name:
        raise ValueError(f"unsafe name {name!r}")
    segments = name.split("/")
    if any(s in ("", ".", "..") for s in segments):
        raise ValueError(f"unsafe name {name!r} (empty, '.' or '..' segment)")
    path = PurePosixPath(name)
    if path.drive or path.root:
        raise ValueError(f"unsafe name {name!r}")
    return path


def destination(out: Path, name: str) -> Path:
    """``out/name``, refusing anything that would land outside ``out``."""
    rel = check_name(name)
    dest = out.joinpath(*rel.parts)
    base = os.path.abspath(out)
    if os.path.commonpath([base, os.path.abspath(dest)]) != base or dest == out:
        raise ValueError(f"unsafe name {name!r} (outside the output directory)")
    return dest


def push_plan(paths: tuple[str, ...], as_name: str | None) -> list[tuple[Path, str]]:
    """(local file, remote name) for every file the arguments cover.

    A relative path inside the current directory keeps that relative path as
    its name; anything else is named after its basename. A directory brings
    every file under it, named by the same rule.
    """
    cwd = os.path.abspath(os.getcwd())
    plan: dict[str, Path] = {}

    def add(path: Path, name: str) -> None:
        check_name(name)
        if name in plan and os.path.abspath(plan[name]) != os.path.abspath(path):
            raise click.UsageError(f"{plan[name]} and {path} would both be uploaded as {name}")
        plan[name] = path

    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), raw)
        base = _base_name(raw, cwd)
        if path.is_dir():
            if as_name is not None:
                raise click.UsageError("--as takes a single file, not a directory")
            for top, dirs, files in os.walk(path):
                dirs.sort()
                for filename in sorted(files):
                    file = Path(top) / filename
                    if not file.is_file():
                        continue  # sockets, FIFOs, dangling links
                    rel = file.relative_to(path).as_posix()
                    add(file, f"{base}/{rel}" if base else rel)
        elif path.is_file():
            add(path, as_name if as_name is not None else base)
        else:
            raise click.UsageError(f"{raw} is not a regular file or a directory")
    return [(path, name) for name, path in plan.items()]


def _base_name(raw: str, cwd: str) -> str:
    """The remote name for a command-line path (``""`` for the current directory)."""
    if not os.path.isabs(raw):
        norm = os.path.normpath(raw)
        if norm == os.curdir:
            return ""
        parts = Path(norm).parts
        if parts and parts[0] != os.pardir:
            return PurePosixPath(*parts).as_posix()
    return Path(os.path.abspath(raw)).name


def select(remote: dict[str, RemoteFile], names: tuple[str, ...]) -> list[RemoteFile]:
    """The remote files named (a directory name or ``dir/`` takes everything under it)."""
    if not names:
        return [remote[n] for n in sorted(remote)]
    chosen: dict[str, RemoteFile] = {}
    for name in names:
        base = name.rstrip("/")
        found = [
            n
            for n in remote
            if (n == base and not name.endswith("/")) or (base and n.startswith(base + "/"))
        ]
        if base and name.endswith("/") and base in remote and remote[base].meta.kind == "dir":
            found.append(base)
        if not found:
            raise Fail(f"not on the server: {printable(name)}")
        for n in found:
            chosen[n] = remote[n]
    return [chosen[n] for n in sorted(chosen)]


def read_stdin_line(what: str) -> str:
    line = sys.stdin.readline()
    if not line:
        raise Fail(f"--password-stdin: no {what} on standard input")
    return line.rstrip("\r\n")


def ask_password(
    from_stdin: bool, *, env: str = "TESSERA_PASSWORD", prompt: str, confirm: bool = False
) -> str:
    """--password-stdin (one line), else ``$env``, else a hidden prompt."""
    if from_stdin:
        password = read_stdin_line(prompt.lower())
    elif os.environ.get(env):
        password = os.environ[env]
    elif not sys.stdin.isatty():
        raise Fail(f"no password: set {env}, pass --password-stdin, or run in a terminal")
    else:
        password = click.prompt(prompt, hide_input=True, confirmation_prompt=confirm, err=True)
    if not password:
        raise Fail("the password is empty")
    if confirm and len(password) < MIN_PASSWORD:
        # The server only sees a derived secret, so the client is where strength is checked.
        raise Fail(f"a new password needs at least {MIN_PASSWORD} characters")
    return password


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# ------------------------------------------------------------------ progress


class Transfers:
    """Progress bars (bytes, speed, ETA) on stderr when asked or on a terminal."""

    def __init__(
        self, enabled: bool, total: int = 0, files: int = 0, *, force: bool = False
    ) -> None:
        self._progress: Any = None
        self._overall: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True, force_terminal=force or None),
            transient=True,
        )
        if files > 1:
            self._overall = self._progress.add_task(f"{files} files", total=total)

    def __enter__(self) -> Transfers:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextmanager
    def file(self, name: str, size: int) -> Iterator[Callable[[int], None] | None]:
        if self._progress is None:
            yield None
            return
        task = self._progress.add_task(name, total=size)

        def advance(nbytes: int) -> None:
            self._progress.advance(task, nbytes)
            if self._overall is not None:
                self._progress.advance(self._overall, nbytes)

        try:
            yield advance
        finally:
            self._progress.remove_task(task)


# ---------------------------------------------------------------- the app


@dataclass
class App:
    state: State
    server: str | None
    progress: bool | None
    verbose: bool

    def sdk(self, *, logged_in: bool = True) -> Tessera:
        """The SDK for this device; checks the login and the server first."""
        server = self.server
        if logged_in:
            profile = self.state.profile()  # NotLoggedIn: "not logged in on this device"
            if server and _norm(server) != _norm(profile.server):
                raise Fail(
                    f"this device is logged in to {profile.server}, not {server} "
                    "(log in there first)"
                )
            server = profile.server  # exactly as at login: journal keys include it
        sdk = Tessera(self.state, server)
        part_size = os.environ.get("TESSERA_PART_SIZE")
        if part_size:
            try:
                sdk.part_size = int(part_size)
            except ValueError:
                raise Fail(
                    f"TESSERA_PART_SIZE must be a number of bytes, not {part_size!r}"
                ) from None
            if sdk.part_size <= 0:
                raise Fail("TESSERA_PART_SIZE must be positive")
        return sdk

    def bars(self, total: int = 0, files: int = 0) -> Transfers:
        enabled = self.progress if self.progress is not None else sys.stderr.isatty()
        return Transfers(enabled, total, files, force=bool(self.progress))


def _norm(url: str) -> str:
    return url.rstrip("/")


class _OneLine(logging.Formatter):
    """Warnings as single lines; tracebacks only with -v."""

    def __init__(self, verbose: bool) -> None:
        super().__init__("tessera: %(levelname)s: %(message)s")
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        record.levelname = record.levelname.lower()
        if not self.verbose:
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return super().format(record)


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine(verbose))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:  # per-request lines are noise even at -v
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("websockets").setLevel(logging.WARNING)


def use_fast_kdf() -> None:
    """TESSERA_KDF_FAST=1 (tests only): cheap Argon2id for bundles made here."""
    crypto.KDF_MEMORY_KIB = FAST_KDF["memory_kib"]
    crypto.KDF_ITERATIONS = FAST_KDF["iterations"]
    crypto.KDF_LANES = FAST_KDF["lanes"]
    # The login secret too: an account made in this mode logs in only in this mode.
    crypto.LOGIN_KDF_MEMORY_KIB = FAST_KDF["memory_kib"]
    crypto.LOGIN_KDF_ITERATIONS = FAST_KDF["iterations"]
    crypto.LOGIN_KDF_LANES = FAST_KDF["lanes"]


pass_app = click.make_pass_decorator(App)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--server",
    envvar="TESSERA_SERVER",
    metavar="URL",
    help="Server URL, e.g. https://sync.example.com (env TESSERA_SERVER).",
)
@click.option(
    "--config-dir",
    envvar="TESSERA_CONFIG_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where this device keeps its login and keys (env TESSERA_CONFIG_DIR).",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show progress bars (default: when stderr is a terminal).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log what happens to stderr.")
@click.version_option(package_name="tessera-sync", prog_name="tessera")
@click.pass_context
def cli(
    ctx: click.Context,
    server: str | None,
    config_dir: Path | None,
    progress: bool | None,
    verbose: bool,
) -> None:
    """Tessera: end-to-end encrypted file sync."""
    setup_logging(verbose)
    if os.environ.get("TESSERA_KDF_FAST") == "1":
        use_fast_kdf()
    if server is not None and not server.startswith(("http://", "https://")):
        raise click.BadParameter("must start with http:// or https://", param_hint="--server")
    ctx.obj = App(State(config_dir) if config_dir else State(), server, progress, verbose)


password_stdin = click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)


# ---------------------------------------------------------------- accounts


def _login_server(app: App) -> str:
    if app.server:
        return _norm(app.server)
    with suppress(NotLoggedIn):
        return app.state.profile().server
    raise click.UsageError("which server? Pass --server URL or set TESSERA_SERVER")


async def _register_device(sdk: Tessera) -> None:
    """Open one session so the server lists this device (best effort)."""
    try:
        conn = await sdk.open_session(attempts=1)
        await conn.close()
    except (ServerClosed, OSError) as exc:
        log.info("could not open a session yet: %s", exc)


@cli.command()
@click.argument("username")
@password_stdin
@pass_app
@handle_errors
def register(app: App, username: str, password_stdin: bool) -> None:
    """Create an account and log this device in."""
    server = _login_server(app)
    password = ask_password(password_stdin, prompt="Password", confirm=True)
    sdk = Tessera(app.state, server)

    async def go() -> None:
        await sdk.register(username, password)
        await _register_device(sdk)

    run(go())
    click.echo(f"registered {username} on {server}; this device is {sdk.profile.device}")


@cli.command()
@click.argument("username")
@password_stdin
@pass_app
@handle_errors
def login(app: App, username: str, password_stdin: bool) -> None:
    """Log this device in (and fetch the account's keys)."""
    server = _login_server(app)
    password = ask_password(password_stdin, prompt="Password")
    sdk = Tessera(app.state, server)

    async def go() -> None:
        await sdk.login(username, password)
        await _register_device(sdk)

    run(go())
    click.echo(f"logged in as {username} on {server}; this device is {sdk.profile.device}")


@cli.command()
@pass_app
@handle_errors
def logout(app: App) -> None:
    """Sign this device out and forget its tokens and master key."""
    try:
        profile = app.state.profile()
        refresh = app.state.tokens().get("refresh")
    except NotLoggedIn:
        app.state.forget()
        click.echo("not logged in")
        return
    if refresh:  # revoke the refresh token's family on the server (best effort)
        try:
            httpx.post(
                f"{_norm(profile.server)}/v1/auth/logout", json={"refresh": refresh}, timeout=10
            )
        except httpx.HTTPError as exc:
            log.warning("could not tell the server (%s); forgetting the tokens anyway", exc)
    app.state.forget()
    click.echo(f"logged out {profile.username} from {profile.server}")


@cli.command()
@password_stdin
@pass_app
@handle_errors
def passwd(app: App, password_stdin: bool) -> None:
    """Change the password (other devices are signed out).

    With --password-stdin, the first line is the current password and the
    second the new one; otherwise TESSERA_PASSWORD and TESSERA_NEW_PASSWORD.
    """
    sdk = app.sdk()
    current = ask_password(password_stdin, prompt="Current password")
    new = ask_password(
        password_stdin, env="TESSERA_NEW_PASSWORD", prompt="New password", confirm=True
    )
    run(sdk.change_password(current, new))
    click.echo("password changed; other devices have been signed out")


# ------------------------------------------------------------------- files


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--as", "as_name", metavar="NAME", help="Remote name (a single file only).")
@pass_app
@handle_errors
def push(app: App, paths: tuple[str, ...], as_name: str | None) -> None:
    """Upload files (directories recursively); re-pushing makes a new revision."""
    if as_name is not None:
        if len(paths) != 1:
            raise click.UsageError("--as takes a single file")
        try:
            check_name(as_name)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--as") from None
    sdk = app.sdk()
    plan = push_plan(paths, as_name)
    sizes = {name: path.stat().st_size for path, name in plan}

    async def go() -> None:
        remote = await sdk.remote_files()
        if not plan:
            return
        async with sdk.session() as conn:
            with app.bars(sum(sizes.values()), len(plan)) as bars:
                for path, name in plan:
                    await _log_resume(sdk, conn, name)
                    with bars.file(printable(name), sizes[name]) as progress:
                        try:
                            stored, _ = await sdk.push(
                                conn, path, name, existing=remote.get(name), progress=progress
                            )
                        except (FileChanged, BaseExceptionGroup) as exc:
                            if not any(isinstance(e, FileChanged) for e in _leaves(exc)):
                                raise
                            # The unfinished upload can never complete: start afresh next time.
                            await _forget_upload(sdk, conn, name)
                            raise Fail(
                                f"{path} changed while it was being uploaded; run the command again"
                            ) from None
                    line = f"{printable(name)}  {human_size(sizes[name])}"
                    if stored != name:
                        line += f"  conflicted copy: {printable(stored)}"
                    click.echo(line)

    run(go())


async def _forget_upload(sdk: Tessera, conn: Connection, name: str) -> None:
    """Abort the journalled upload of ``name`` on the server and drop the journal."""
    key = journal_key(sdk.server, name)
    entry = sdk.state.journal(key)
    if entry is not None:
        with suppress(RemoteError, ServerClosed):
            await conn.request({"t": "abort", "upload": entry["upload"]})
    sdk.state.drop_journal(key)


async def _log_resume(sdk: Tessera, conn: Connection, name: str) -> None:
    """At -v, say how much of an interrupted upload the server already holds."""
    if not log.isEnabledFor(logging.INFO):
        return
    entry = sdk.state.journal(journal_key(sdk.server, name))
    if entry is None:
        return
    try:
        have = (await conn.request({"t": "resume", "upload": entry["upload"]}))["have"]
    except RemoteError as exc:
        log.info("unfinished upload %s of %s is gone (%s)", entry["upload"], name, exc.code)
        return
    log.info(
        "resuming upload %s: %d of %d parts already on the server",
        entry["upload"],
        len(have),
        len(entry["parts"]),
    )


@cli.command()
@click.argument("names", nargs=-1, metavar="[NAME...]")
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory to download into.",
)
@click.option("--rest", is_flag=True, help="Download over REST instead of the WebSocket session.")
@pass_app
@handle_errors
def pull(app: App, names: tuple[str, ...], out: Path, rest: bool) -> None:
    """Download files: the NAMEs given, or all of them.

    A directory's name (or "dir/") takes everything under it. Files land at
    their remote path under the output directory, with their modification time.
    """
    for name in names:
        if name.startswith("/") or ".." in name.split("/"):
            raise click.BadParameter(f"{name!r}: names are relative, without '..'")
    sdk = app.sdk()
    chosen = select(run(sdk.remote_files()), names)
    targets = []
    for remote in chosen:
        try:
            targets.append((remote, destination(out, remote.name)))
        except ValueError as exc:
            raise Fail(f"refusing a name from the server: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    files = [r for r in chosen if r.meta.kind == "file"]

    async def go() -> None:
        conn = None if rest else await _session_or_rest(sdk)
        try:
            with app.bars(sum(r.meta.size for r in files), len(files)) as bars:
                for remote, dest in targets:
                    with bars.file(printable(remote.name), remote.meta.size) as progress:
                        await sdk.pull(conn, remote, dest, progress=progress)
                    if remote.meta.kind == "file":
                        click.echo(f"{printable(remote.name)}  {human_size(remote.meta.size)}")
        finally:
            if conn is not None:
                await conn.close()

    run(go())


async def _session_or_rest(sdk: Tessera) -> Connection | None:
    try:
        return await sdk.open_session()
    except ServerClosed as exc:
        log.warning("no WebSocket session (%s); downloading over REST", describe(exc))
        return None


@cli.command("ls")
@click.argument("prefix", required=False)
@click.option("-l", "long", is_flag=True, help="Show size, modification time and revision.")
@pass_app
@handle_errors
def ls(app: App, prefix: str | None, long: bool) -> None:
    """List remote files (optionally only those under PREFIX)."""
    sdk = app.sdk()
    files = run(sdk.remote_files())
    chosen = select(files, (prefix,)) if prefix else [files[n] for n in sorted(files)]
    for remote in chosen:
        shown = printable(remote.name) + ("/" if remote.meta.kind == "dir" else "")
        if not long:
            click.echo(shown)
            continue
        when = dt.datetime.fromtimestamp(remote.meta.mtime_ns / 1e9).strftime("%Y-%m-%d %H:%M")
        size = "-" if remote.meta.kind == "dir" else human_size(remote.meta.size)
        click.echo(f"{size:>10}  {when}  rev {remote.rev:<4}  {shown}")


@cli.command()
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option("-r", "--recursive", is_flag=True, help="Also remove everything under a directory.")
@pass_app
@handle_errors
def rm(app: App, names: tuple[str, ...], recursive: bool) -> None:
    """Delete remote files (other devices see them go)."""
    sdk = app.sdk()

    async def go() -> None:
        remote = await sdk.remote_files()
        chosen: dict[str, RemoteFile] = {}
        for name in names:
            base = name.rstrip("/")
            under = [n for n in remote if base and n.startswith(base + "/")]
            if base in remote and (remote[base].meta.kind == "dir" or not name.endswith("/")):
                chosen[base] = remote[base]
            elif not under:
                raise Fail(f"not on the server: {printable(name)}")
            if under and not recursive:
                raise Fail(f"{name} is a directory (use -r to remove everything under it)")
            chosen.update((n, remote[n]) for n in under)
        async with sdk.session() as conn:
            # Deepest first, so a directory object goes after its contents.
            for name in sorted(chosen, key=lambda n: (-n.count("/"), n)):
                await sdk.remove(conn, chosen[name])
                click.echo(f"removed {printable(name)}")

    run(go())


# ----------------------------------------------------------------- devices


@cli.command()
@click.option("--revoke", metavar="ID", help="Revoke a device: it is signed out for good.")
@pass_app
@handle_errors
def devices(app: App, revoke: str | None) -> None:
    """List this account's devices, or revoke one."""
    sdk = app.sdk()

    async def go() -> list[dict[str, Any]]:
        async with sdk.api() as api:
            if revoke:
                await api.revoke_device(revoke)
                return []
            return await api.devices()

    rows = run(go())
    if revoke:
        click.echo(f"revoked {revoke}")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("", "DEVICE", "ADDED", "LAST SEEN", "STATUS"):
        table.add_column(column, no_wrap=True)
    for d in rows:
        status = "revoked" if d["revoked"] else ("this device" if d["current"] else "active")
        table.add_row(
            "*" if d["current"] else "",
            d["id"],
            _when(d["created_at"]),
            _when(d["last_seen"]),
            status,
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)


def _when(iso: str) -> str:
    try:
        return dt.datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


@cli.command()
@pass_app
@handle_errors
def status(app: App) -> None:
    """Who and where this device is, the account's usage, and the server's health."""
    sdk = app.sdk()
    profile = sdk.profile
    unfinished = (
        len(list(app.state.journal_dir.glob("*.json"))) if app.state.journal_dir.is_dir() else 0
    )
    click.echo(f"server: {profile.server}")
    click.echo(f"username: {profile.username}")
    click.echo(f"device: {profile.device}")
    click.echo(f"user id: {profile.user}")

    async def go() -> tuple[dict[str, Any] | None, str, BaseException | None]:
        account: dict[str, Any] | None = None
        error: BaseException | None = None
        try:
            async with sdk.api() as api:
                account = await api.account()
        except (ApiError, httpx.HTTPError, NotLoggedIn) as exc:
            error = exc
        try:
            async with httpx.AsyncClient(base_url=profile.server, timeout=10) as http:
                r = await http.get("/readyz")
            ready = "yes" if r.status_code == 200 else f"degraded (HTTP {r.status_code})"
        except httpx.HTTPError as exc:
            ready = f"no ({describe(exc)})"
            error = error or exc
        return account, ready, error

    account, ready, error = run(go())
    if account is not None:
        used, quota = human_size(account["used"]), human_size(account["quota"])
        click.echo(f"usage: {used} of {quota} used")
    else:
        click.echo("usage: unknown")
    click.echo(f"unfinished uploads: {unfinished}")
    click.echo(f"server reachable: {ready}")
    if error is not None:
        raise Fail(describe(error))


# -------------------------------------------------------------------- sync


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--once", is_flag=True, help="One full two-way pass, then exit.")
@pass_app
@handle_errors
def sync(app: App, directory: Path, once: bool) -> None:
    """Keep DIRECTORY and the account in sync, both ways (until interrupted)."""
    from client.sync import run_sync

    sdk = app.sdk()
    directory.mkdir(parents=True, exist_ok=True)

    def say(line: str) -> None:
        click.echo(line)

    run(run_sync(sdk, directory, once=once, log=say))


# -------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    try:
        result = cli.main(args=argv, prog_name="tessera", standalone_mode=False)
    except click.Abort:  # ^C or ^D at a prompt
        return 130
    except KeyboardInterrupt:
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except BrokenPipeError:  # e.g. `tessera ls | head`
        with suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the final flush
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
