"""One queue for the service and the operator (first-contact review, finding 2): the systemd unit ran the
gateway with GATEWAY_DELIVERY__SPOOL_PATH and its own WorkingDirectory, while the operator's
`smtp-gateway queue -c /etc/smtp-gateway/gateway.toml list`, from a shell with neither, read the example's
relative `var/spool.sqlite3` there and said "no queue at var/spool.sqlite3" with exit 0 while mail waited.
Now the install puts the absolute path in gateway.toml (docs/install.md, the unit sets none), and a command
that finds no queue file names the absolute path it looked at, says when it was relative, and exits 1."""

from __future__ import annotations

import contextlib
import os
import re
import smtplib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import Settings, preflight
from gateway.queue import sqlite_schema
from tests.configs import hash_for_tests
from tests.procs import ready, spawn

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "gateway"]
UNIT = ROOT / "config" / "smtp-gateway.service"
INSTALL = ROOT / "docs" / "install.md"
STATE = "/var/lib/smtp-gateway"


def _env(**extra: str) -> dict[str, str]:
    """An operator's shell: none of the unit's GATEWAY_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**env, **extra}


def _operator(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI run from an operator's shell in `cwd`."""
    return subprocess.run([*CLI, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=60, check=False)


def _unit_environment(state: Path) -> dict[str, str]:
    """The unit's Environment= lines, its state directory moved to `state`."""
    lines = re.findall(r"^Environment=(\w+)=(.*)$", UNIT.read_text(), re.MULTILINE)
    return {name: value.replace(STATE, str(state)) for name, value in lines}


def _install_delivery_block() -> str:
    """The [delivery] block install.md's configuration step says to put in gateway.toml."""
    blocks = re.findall(r"```toml\n(.*?)```", INSTALL.read_text(), re.DOTALL)
    # The same block again in the Upgrade section (for an installation made before).
    [block] = {re.sub(r"^ +", "", b, flags=re.MULTILINE) for b in blocks if "spool_path" in b}
    return block


def test_queue_list_from_a_shell_reads_the_service_s_queue(tmp_path: Path) -> None:
    etc, state, home = tmp_path / "etc", tmp_path / "var-lib", tmp_path / "home"
    for d in (etc, state, home):
        d.mkdir()
    config = etc / "gateway.toml"
    config.write_text(f"""
[[listeners]]
name = "plain"
address = "127.0.0.1"
port = 0
tls = "none"
allow_insecure_auth = true

[accounts.acme]
dmdsid = "acme"
api_base = "http://127.0.0.1:1"          # down: the message waits in the queue
apikey = "k"
sender_domains = {{ "example.com" = "dmds-acme@nl.example.com" }}

[[accounts.acme.users]]
username = "dev"
password_hash = "{hash_for_tests("a long random password")}"
campaign = 22

{_install_delivery_block().replace(STATE, str(state))}
[dns]
check_sender_domain = false
""")
    log = tmp_path / "serve.log"
    with log.open("ab") as out:
        # As the unit runs it: its environment and working directory.
        proc = spawn(
            [*CLI, "serve", "--config", str(config), "--drain-timeout", "2"],
            cwd=state,
            env=_env(**_unit_environment(state)),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        port = ready(log, proc)["plain"]
        with smtplib.SMTP("127.0.0.1", port) as s:
            s.login("dev", "a long random password")
            s.sendmail("a@example.com", ["b@example.net"], b"Subject: invoice\r\n\r\nhello\r\n")
        # The operator's shell: its own directory, none of the unit's environment.
        listed = _operator(["queue", "-c", str(config), "list"], home)
    finally:
        proc.terminate()
        proc.wait(30)
    assert listed.returncode == 0 and "queued 1" in listed.stdout, (listed.returncode, listed.stdout + listed.stderr)


def test_the_unit_sets_no_queue_path_of_its_own() -> None:
    """An Environment= queue path would be the service's alone: the operator's shell does not have it."""
    assert "SPOOL_PATH" not in "".join(_unit_environment(Path(STATE)))


RELATIVE = (
    "({path} is relative: read from the current directory, and serve reads it from its own; an absolute "
    "delivery.spool_path names one file for both, or give it with --spool FILE)"
)


@pytest.mark.parametrize(
    ("command", "what"),
    [
        (["queue", "list"], ""),
        (["queue", "dead"], ""),
        (["queue", "migrate"], ""),  # not an empty queue created and reported migrated
        (["status", "someone@example.com"], " (and so no message ledger)"),
        (["suppression", "list"], " (and so no suppression list)"),
    ],
)
def test_no_queue_names_the_absolute_path_and_exits_1(tmp_path: Path, command: list[str], what: str) -> None:
    done = _operator(command, tmp_path)
    absolute = tmp_path / "var" / "spool.sqlite3"
    expected = f"smtp-gateway: no queue{what} at {absolute} {RELATIVE.format(path='var/spool.sqlite3')}\n"
    # On stderr, as every such error is (troubleshooting.md): `queue list --json` gives a parser no text.
    assert (done.returncode, done.stdout, done.stderr) == (1, "", expected)


def test_no_queue_at_an_absolute_path_asks_whether_serve_uses_it(tmp_path: Path) -> None:
    spool = tmp_path / "elsewhere.sqlite3"
    done = _operator(["queue", "--spool", str(spool), "list"], tmp_path)
    assert (done.returncode, done.stderr) == (
        1,
        f"smtp-gateway: no queue at {spool} (no gateway has run with it: is it the delivery.spool_path that serve "
        "uses?)\n",
    )


def _relative_config(etc: Path) -> Path:
    """A gateway.toml of an install made before the unit stopped setting GATEWAY_DELIVERY__SPOOL_PATH: the
    example's relative spool_path kept (the unit's environment line won over it then)."""
    etc.mkdir()
    config = etc / "gateway.toml"
    config.write_text("""
[[listeners]]
name = "plain"
address = "127.0.0.1"
port = 0
tls = "none"

[delivery]
spool_path = "var/spool.sqlite3"

[dns]
check_sender_domain = false
""")
    return config


def test_check_config_notes_a_relative_spool_path(tmp_path: Path) -> None:
    config = _relative_config(tmp_path / "etc")
    done = _operator(["check-config", "-c", str(config)], tmp_path)
    assert (
        f"note: delivery.spool_path var/spool.sqlite3 is relative: each process reads it from its own current "
        f"directory ({tmp_path}/var/spool.sqlite3 here;"
    ) in done.stderr, done.stderr
    assert "no queue there" not in done.stderr


def test_check_config_names_the_old_unit_s_queue_left_behind(tmp_path: Path) -> None:
    """Upgrade (review: upgrade F5): the new unit (no GATEWAY_DELIVERY__SPOOL_PATH) runs in its state directory,
    where the old unit's queue is; the relative path in gateway.toml would open a new, empty queue beside it."""
    config = _relative_config(tmp_path / "etc")
    state = tmp_path / "state"
    state.mkdir()
    old = state / "spool.sqlite3"
    with contextlib.closing(sqlite3.connect(old)) as db:
        sqlite_schema.migrate(db)
    done = _operator(["check-config", "-c", str(config)], state)  # as the service runs it: in its state directory
    assert f"no queue there, but {old} exists" in done.stderr, done.stderr
    assert f'set delivery.spool_path = "{old}" to keep using it' in done.stderr
    assert not (state / "var").exists()  # check-config created nothing


def test_a_postgresql_queue_gets_no_note_about_spool_path(tmp_path: Path) -> None:
    """With delivery.queue_url the SQLite file is not used: no note about its (default, relative) path, which
    `serve` would print before its JSON log lines."""
    settings = Settings.model_validate(
        {"delivery": {"queue_url": "postgresql://gateway@127.0.0.1:5432/gateway", "spool_path": "var/spool.sqlite3"}}
    )
    assert not [f for f in preflight.files(settings) if "spool_path" in f.text]
    sqlite = Settings.model_validate({"delivery": {"spool_path": "var/spool.sqlite3"}})
    assert [f for f in preflight.files(sqlite) if "is relative" in f.text]


@pytest.mark.parametrize(
    "command",
    [
        ["queue", "--spool", "nope.sqlite3", "list"],
        ["status", "--spool", "nope.sqlite3", "someone@example.com"],
        ["suppression", "list", "--spool", "nope.sqlite3"],
    ],
)
def test_no_queue_at_a_relative_spool_option_says_no_such_file(tmp_path: Path, command: list[str]) -> None:
    """The path came from --spool, not delivery.spool_path: no advice on the setting (review firstcontact2 F6)."""
    done = _operator(command, tmp_path)
    assert done.returncode == 1, done.stdout
    assert done.stderr.endswith(
        f"at {tmp_path / 'nope.sqlite3'} (--spool nope.sqlite3: no such file in the current directory)\n"
    ), done.stderr
