"""Settings (flags > environment > defaults), the docs that describe them, and the
``tessera-server`` command run for real as a subprocess."""

from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from server.settings import Settings, add_arguments, env_name, flag_name
from tests.support.s3 import free_port

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {f.name: f for f in fields(Settings)}


def server_bin() -> str:
    candidate = Path(sys.executable).parent / "tessera-server"
    return str(candidate if candidate.exists() else ROOT / ".venv" / "bin" / "tessera-server")


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without any TESSERA_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    return env | extra


# ------------------------------------------------------------ from_sources


def test_defaults():
    s = Settings.from_sources([], {})
    assert s.port == 8080
    assert s.host == "127.0.0.1"
    assert s.database_url == ""
    assert s.s3_secure is False and s.migrate is True
    assert s == Settings()


def test_env_sets_values():
    s = Settings.from_sources(
        [],
        {
            "TESSERA_PORT": "9000",
            "TESSERA_HOST": "0.0.0.0",
            "TESSERA_DATA_DIR": "/srv/tessera",
            "TESSERA_HELLO_TIMEOUT": "2.5",
            "UNRELATED": "x",
        },
    )
    assert s.port == 9000 and isinstance(s.port, int)
    assert s.host == "0.0.0.0"
    assert s.data_dir == Path("/srv/tessera")
    assert s.hello_timeout == 2.5


def test_empty_env_value_keeps_default():
    assert Settings.from_sources([], {"TESSERA_PORT": ""}).port == 8080


def test_flag_beats_env():
    env = {"TESSERA_PORT": "9000", "TESSERA_HOST": "10.0.0.1"}
    s = Settings.from_sources(["--port", "9100"], env)
    assert s.port == 9100
    assert s.host == "10.0.0.1"  # no flag: the environment still applies
    assert Settings.from_sources(["--port=9200"], {}).port == 9200


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("off", False),
        ("No", False),
    ],
)
def test_boolean_env_values(raw, expected):
    assert Settings.from_sources([], {"TESSERA_S3_SECURE": raw}).s3_secure is expected
    assert Settings.from_sources([], {"TESSERA_MIGRATE": raw}).migrate is expected


def test_boolean_flags():
    assert Settings.from_sources(["--s3-secure"], {}).s3_secure is True
    assert Settings.from_sources(["--no-migrate"], {}).migrate is False
    # A flag beats the environment in both directions.
    assert (
        Settings.from_sources(["--no-s3-secure"], {"TESSERA_S3_SECURE": "true"}).s3_secure is False
    )
    assert Settings.from_sources(["--migrate"], {"TESSERA_MIGRATE": "no"}).migrate is True


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("TESSERA_PORT", "abc"),
        ("TESSERA_PORT", "80.5"),
        ("TESSERA_S3_SECURE", "maybe"),
        ("TESSERA_MIGRATE", "2"),
        ("TESSERA_HELLO_TIMEOUT", "soon"),
        ("TESSERA_MAX_FRAME", "2MiB"),
    ],
)
def test_invalid_env_values_name_the_variable(name, raw):
    with pytest.raises(ValueError, match=name):
        Settings.from_sources([], {name: raw})


def test_invalid_log_level_is_rejected():
    # README: "debug, info, warning or error". An unknown level must be refused
    # when the settings are read, not crash the server later in logging setup.
    with pytest.raises(ValueError, match=r"TESSERA_LOG_LEVEL|log_level"):
        Settings.from_sources([], {"TESSERA_LOG_LEVEL": "loud"})


@pytest.mark.parametrize(
    "raw", ["proxy.internal", "10.0.0.1/8", "10.0.0.0/8, nonsense", "0.0.0.0/0", "::/0"]
)
def test_trusted_proxies_must_be_addresses_or_networks(raw):
    # uvicorn would take a name or a network with host bits for a literal that
    # never matches, and the proxy's clients would silently share one address.
    with pytest.raises(ValueError, match="trusted_proxies"):
        Settings.from_sources([], {"TESSERA_TRUSTED_PROXIES": raw})


def test_trusted_proxies_are_a_list():
    settings = Settings.from_sources(["--trusted-proxies", "10.0.0.0/8, ::1,"])
    assert settings.proxies == ["10.0.0.0/8", "::1"]
    assert Settings.from_sources([]).proxies == []


@pytest.mark.parametrize(
    "env",
    [
        {"TESSERA_WINDOW": "1000"},  # window < max_chunk
        {"TESSERA_MAX_CHUNK": "2097152"},  # max_frame < max_chunk + 64 KiB
        {"TESSERA_MAX_FRAME": "0"},
        {"TESSERA_MAX_PARTS": "-1"},
        {"TESSERA_PORT": "70000"},
        {"TESSERA_ACCESS_TTL": "0"},
    ],
)
def test_inconsistent_values_are_rejected(env):
    with pytest.raises(ValueError):
        Settings.from_sources([], env)


def test_limits_follow_settings():
    s = Settings.from_sources(["--max-chunk", "4096", "--max-frame", "70000", "--window", "8192"])
    assert (s.limits.max_chunk, s.limits.max_frame, s.limits.window) == (4096, 70000, 8192)


# -------------------------------------------------- one mechanical naming


def _other_value(name: str) -> tuple[str, Any]:
    """A raw string for ``name`` that is valid and differs from the default, and its value."""
    default = FIELDS[name].default
    if isinstance(default, bool):
        return ("false" if default else "true"), not default
    if isinstance(default, int):
        return str(default + 1), default + 1
    if isinstance(default, float):
        return str(default + 1.5), default + 1.5
    if isinstance(default, Path):
        return "/tmp/elsewhere", Path("/tmp/elsewhere")
    if name == "log_level":
        return "debug", "debug"
    if name == "trusted_proxies":
        return "10.0.0.0/8", "10.0.0.0/8"
    return "some-value", "some-value"


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_every_field_has_env_and_flag(name):
    raw, value = _other_value(name)
    env = env_name(name)
    assert env == "TESSERA_" + name.upper()
    assert getattr(Settings.from_sources([], {env: raw}), name) == value

    flag = flag_name(name)
    assert flag == "--" + name.replace("_", "-")
    argv = [flag, raw]
    if isinstance(value, bool):
        argv = [flag] if value else ["--no-" + flag[2:]]
    assert getattr(Settings.from_sources(argv, {}), name) == value


def test_cli_parser_has_every_flag():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = {opt for action in parser._actions for opt in action.option_strings}
    for name, f in FIELDS.items():
        assert flag_name(name) in options
        if isinstance(f.default, bool):
            assert "--no-" + flag_name(name)[2:] in options


# ------------------------------------------------------------ docs drift


def _readme_rows() -> dict[str, tuple[str, str]]:
    """README configuration table: env name -> (flag column, default column)."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        match = re.match(r"^\|\s*`(TESSERA_[A-Z0-9_]+)`\s*\|([^|]*)\|([^|]*)\|", line)
        if match:
            rows[match.group(1)] = (match.group(2).strip(), match.group(3).strip())
    return rows


def test_readme_documents_every_setting():
    rows = _readme_rows()
    documented = set(rows)
    actual = {env_name(name) for name in FIELDS}
    assert actual - documented == set(), "settings missing from README's configuration table"
    assert documented - actual == set(), "README documents settings that do not exist"
    for name, f in FIELDS.items():
        flag_col, default_col = rows[env_name(name)]
        assert f"`{flag_name(name)}`" in flag_col, (name, flag_col)
        if isinstance(f.default, bool):
            assert f"`--no-{flag_name(name)[2:]}`" in flag_col, (name, flag_col)
        # The documented default is the real one.
        shown = re.search(r"`([^`]*)`", default_col)
        if f.default in ("", Path("")):
            assert "empty" in default_col, (name, default_col)
        elif isinstance(f.default, bool):
            assert shown and shown.group(1) == str(f.default).lower(), (name, default_col)
        elif isinstance(f.default, Path):
            assert shown and Path(shown.group(1)) == f.default, (name, default_col)
        else:
            assert shown and type(f.default)(shown.group(1)) == f.default, (name, default_col)


def test_compose_and_dockerfile_only_set_real_settings():
    actual = {env_name(name) for name in FIELDS}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    in_compose = set()
    for service in compose["services"].values():
        environment = service.get("environment") or {}
        keys = (
            environment.keys()
            if isinstance(environment, dict)
            else (item.split("=", 1)[0] for item in environment)
        )
        in_compose |= {k for k in keys if k.startswith("TESSERA_")}
    assert in_compose, "docker-compose.yml sets no TESSERA_* variable"
    assert in_compose - actual == set()
    # Every value compose sets parses (booleans, ports) once substitutions are filled.
    server_env = {
        k: re.sub(r"\$\{[^}]*\}", "x", str(v))
        for k, v in compose["services"]["server"]["environment"].items()
        if k.startswith("TESSERA_")
    }
    parsed = Settings.from_sources([], server_env)
    assert parsed.host == "0.0.0.0" and parsed.port == 8080 and parsed.s3_create_buckets is False

    dockerfile = (ROOT / "Dockerfile").read_text()
    env_block = "\n".join(re.findall(r"^ENV\s+(.*(?:\\\n.*)*)", dockerfile, flags=re.MULTILINE))
    in_dockerfile = set(re.findall(r"\b(TESSERA_[A-Z0-9_]+)=", env_block))
    assert in_dockerfile, "Dockerfile sets no TESSERA_* variable"
    assert in_dockerfile - actual == set()
    # Anything else mentioning TESSERA_ in the Dockerfile must be a setting too.
    assert set(re.findall(r"\bTESSERA_[A-Z0-9_]+", dockerfile)) - actual == set()


# --------------------------------------------------------------- the CLI


def test_help_lists_flags():
    result = subprocess.run(
        [server_bin(), "--help"], capture_output=True, text=True, timeout=30, env=clean_env()
    )
    assert result.returncode == 0, result.stderr
    assert "--database-url" in result.stdout
    assert "TESSERA_DATABASE_URL" in result.stdout
    assert "migrate" in result.stdout and "serve" in result.stdout


def test_invalid_settings_exit_with_usage_error():
    result = subprocess.run(
        [server_bin(), "migrate"],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(TESSERA_PORT="abc"),
    )
    assert result.returncode == 2
    assert "TESSERA_PORT" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run(
        [server_bin(), "serve", "--port", "http"],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert result.returncode == 2
    assert "--port" in result.stderr


def test_option_value_equal_to_a_command_name(database_url, tmp_path):
    # "migrate" here is the *value* of --data-dir (a relative directory), not a
    # second command; the CLI must not drop it from the flags.
    result = subprocess.run(
        [server_bin(), "migrate", "--database-url", database_url, "--data-dir", "migrate"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr
    assert "database is up to date" in result.stdout


class Served:
    """A ``tessera-server serve`` subprocess whose stdout is read by a thread."""

    def __init__(self, args: list[str], log_dir: Path) -> None:
        self.stderr_path = log_dir / "server.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [server_bin(), "serve", *args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            env=clean_env(),
            cwd=log_dir,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for_line(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if re.search(pattern, line):
                return line
        raise AssertionError(
            f"no line matching {pattern!r} within {timeout}s (exit {self.proc.poll()}):\n"
            + self.stderr_path.read_text(errors="replace")[-4000:]
        )

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.close()


def _wait_ready(base: str, timeout: float) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: httpx.Response | None = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(base + "/readyz", timeout=5)
            if last.status_code == 200:
                return last
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"/readyz never answered 200: {last and last.text}")


def test_serve_for_real_and_stop_on_sigterm(database_url, tmp_path):
    port = free_port()
    data_dir = tmp_path / "data"
    served = Served(
        [
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--database-url",
            database_url,
            "--jwt-secret",
            "x" * 48,
            "--log-level",
            "info",
        ],
        tmp_path,
    )
    try:
        line = served.wait_for_line(r"Tessera is listening", timeout=30)
        assert line == f"Tessera is listening on http://127.0.0.1:{port}"
        base = f"http://127.0.0.1:{port}"
        r = httpx.get(base + "/healthz", timeout=5)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        r = httpx.get(base + "/readyz", timeout=5)
        assert r.status_code == 200, r.text
        # The configured secret is used; none is generated in the data directory.
        assert not (data_dir / "jwt-secret").exists()

        started = time.monotonic()
        code = served.stop()
        assert time.monotonic() - started < 10
        with pytest.raises(httpx.TransportError):
            httpx.get(base + "/healthz", timeout=2)
        log = served.stderr_path.read_text(errors="replace")
        assert "Application shutdown complete" in log, log[-2000:]  # the lifespan ran down
        assert code == 0, f"SIGTERM after a graceful shutdown should exit 0, got {code}"
    finally:
        served.cleanup()


def test_serve_without_database_url_starts_embedded_postgres(tmp_path):
    port = free_port()
    data_dir = tmp_path / "data"
    served = Served(["--port", str(port), "--data-dir", str(data_dir)], tmp_path)
    try:
        served.wait_for_line(rf"Tessera is listening on http://127\.0\.0\.1:{port}$", 60)
        assert (data_dir / "pgdata").is_dir()
        base = f"http://127.0.0.1:{port}"
        assert _wait_ready(base, 10).json()["status"] == "ready"
        # A JWT secret was generated, private to the owner.
        secret = data_dir / "jwt-secret"
        assert secret.exists() and (secret.stat().st_mode & 0o077) == 0
        # The zero-setup server is fully usable: register and log in.
        r = httpx.post(
            base + "/v1/auth/register",
            json={"username": "zero-setup", "password": "long enough password"},
            timeout=10,
        )
        assert r.status_code == 201, r.text
        pid = _postmaster_pid(data_dir / "pgdata")
        assert pid is not None and _alive(pid)
        code = served.stop()
        # The embedded PostgreSQL goes away with the server ("stops when the last
        # process using it exits"), so `make run` leaves nothing behind.
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), f"embedded PostgreSQL (pid {pid}) still running; server exit {code}"
        assert code == 0
    finally:
        served.cleanup()
        _stop_leftover_postgres(data_dir / "pgdata")


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _stop_leftover_postgres(pgdata: Path) -> None:
    """Stop the PostgreSQL this test's server started, if the server left it running."""
    pid = _postmaster_pid(pgdata)
    if pid is None or not _alive(pid):
        return
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    if str(pgdata).encode() not in cmdline:
        return  # the pid was reused by something else: not ours
    os.kill(pid, signal.SIGINT)  # PostgreSQL's "fast" shutdown
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
