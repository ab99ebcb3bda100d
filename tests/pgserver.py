"""A private PostgreSQL cluster for the tests: initdb + pg_ctl in a temporary directory, listening only on a
Unix socket there, stopped by PID at the end. Run as the `postgres` user when the tests run as root
(PostgreSQL refuses to run as root). Each test gets a database of its own (`new_database`)."""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path


class PgUnavailable(Exception):
    """No PostgreSQL server binaries here."""


def _bindir() -> Path:
    for candidate in (shutil.which("pg_ctl"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)):
        if candidate:
            return Path(candidate).resolve().parent
    raise PgUnavailable("pg_ctl not found: apt-get install postgresql")


class PgCluster:
    def __init__(self) -> None:
        self.bin = _bindir()
        # Short path: a Unix socket path must fit in ~100 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="gwpg-"))
        self.data = self.dir / "data"
        self.user = None if os.geteuid() != 0 else "postgres"
        self._names = itertools.count()
        self.pid: int | None = None

    def _run(self, *args: str) -> str:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def start(self, hba: str = "") -> None:
        """initdb and start; `hba`: the pg_hba.conf lines instead of initdb's (which trust every connection),
        in place before the server starts (a reload would take effect at a time nobody can wait for)."""
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "gateway", "--no-sync", "-E", "UTF8")
        if hba:
            (self.data / "pg_hba.conf").write_text(hba)
        self.resume()

    def resume(self) -> None:
        """Start the server (again, after `halt`: its databases as they were)."""
        # Test speed: no fsync (these tests are about the queue's logic, not about power loss), small pool.
        options = f"-k {self.dir} -c listen_addresses='' -c fsync=off -c full_page_writes=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-w", "-t", "60", "-l", str(self.dir / "log"), "start")
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def halt(self) -> None:
        """Stop the server as an outage does (fast: open connections are cut), keeping its data."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        self.pid = None

    def new_database(self) -> str:
        """A fresh database; returns its URL (Unix socket in the cluster's directory)."""
        name = f"gw{next(self._names)}_{os.getpid()}"
        self._run("createdb", "-h", str(self.dir), "-U", "gateway", name)
        return f"postgresql://gateway@/{name}?host={self.dir}"

    def stop(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGQUIT)  # immediate shutdown
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            self.pid = None
        shutil.rmtree(self.dir, ignore_errors=True)


def new_cluster() -> PgCluster:
    """A cluster not started yet. Missing server binaries skip the test on a developer machine and fail it in CI
    (CI=true), where .ci/run installs PostgreSQL."""
    import pytest

    try:
        return PgCluster()
    except PgUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(str(exc))
