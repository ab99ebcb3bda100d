"""A non-UTF-8 argument (a Latin-1 terminal typing `müller@...`, a pasted stray byte) or a non-UTF-8 password
is a usage error (exit 2) with a line starting `smtp-gateway:`, as exit-statuses.md promises for whatever an
operator can get wrong: not a traceback from the database's parameter binding or from getpass, and the
password is never echoed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.spool_helpers import make_queue

CLI = str(Path(sys.executable).parent / "smtp-gateway")
LATIN1 = "müller@example.de".encode("latin-1")  # b"m\xfcller@example.de"


def run(*args: str | bytes, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run([CLI, *args], input=stdin, capture_output=True, timeout=60, env=env, check=False)


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--spool", "{q}", LATIN1],
        ["queue", "--spool", "{q}", "show", b"\xff\xfe"],
        ["queue", "--spool", "{q}", "delete", b"\xff\xfe"],
        ["queue", "--spool", "{q}", "retry", b"ABC", b"\xff\xfe"],
        ["suppression", "remove", "--spool", "{q}", LATIN1],
        ["suppression", "list", "--spool", "{q}", "--account", b"acm\xe9"],
    ],
    ids=["status", "queue-show", "queue-delete", "queue-retry", "suppression-remove", "suppression-list-account"],
)
def test_a_non_utf8_argument_is_a_usage_error_not_a_traceback(tmp_path: Path, args: list[str | bytes]) -> None:
    q = str(make_queue(tmp_path / "spool.sqlite3"))
    result = run(*(q if a == "{q}" else a for a in args))
    assert b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")
    assert result.returncode == 2
    assert b"is not UTF-8 text" in result.stderr, result.stderr


@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])
def test_a_non_utf8_password_on_stdin_is_a_usage_error_not_echoed(locale: str) -> None:
    password = "pässwort"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(LC_ALL=locale, LANG=locale)
    env.pop("PYTHONIOENCODING", None)
    result = subprocess.run(
        [CLI, "hash-password", "--stdin"],
        input=password.encode("latin-1") + b"\n",
        capture_output=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")
    assert result.returncode == 2
    assert result.stderr.startswith(b"smtp-gateway: the password is not UTF-8 text"), result.stderr
    assert b"sswort" not in result.stderr + result.stdout
