"""Configurations that were accepted but could not work: `check-config` and `serve` refuse each, through the
real CLI, naming the key, where it is and the fix, in the operator's words (no Traceback, no pydantic)."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.harness import APIKEY, PASSWORD_HASH, USER
from tests.procs import CLI, free_port
from tests.test_first_contact import _env

# Long enough for a refusal, short of anything that would start serving (or retry a pool for 10 s).
TIMEOUT = 8


def write(tmp: Path, accounts: str = "", delivery: str = "") -> Path:
    path = tmp / "gateway.toml"
    path.write_text(f"""
[[listeners]]
name = "plain"
address = "127.0.0.1"
port = {free_port()}
tls = "none"
allow_insecure_auth = true
[accounts.acme]
dmdsid = "acme"
api_base = "https://api.acme.example"
apikey = "{APIKEY}"
sender_domains = {{ "acme.example" = "dmds-acme@nl.acme.example" }}
[[accounts.acme.users]]
username = "{USER}"
password_hash = "{PASSWORD_HASH}"
campaign = 22
{accounts}
[delivery]
{delivery or f'spool_path = "{tmp / "spool.sqlite3"}"'}
[dns]
check_sender_domain = false
""")
    return path


def cli(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*CLI, *args], cwd=tmp, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    assert "Value error" not in done.stderr and "pydantic" not in done.stderr, done.stderr
    return done


def refused(tmp: Path, config: Path, status: int, message: str) -> None:
    """check-config and serve both refuse `config` with `status` and a line holding `message`."""
    for command in ("check-config", "serve"):
        done = cli(tmp, command, "--config", str(config))
        assert done.returncode == status, (command, done.stderr)
        assert message in done.stderr, (command, done.stderr)


def test_one_login_in_two_accounts(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        accounts=f"""
[accounts.other]
dmdsid = "other"
apikey = "{APIKEY}"
[[accounts.other.users]]
username = "erp"
password_hash = "{PASSWORD_HASH}"
[[accounts.other.users]]
username = "{USER}"
password_hash = "{PASSWORD_HASH}"
""",
    )
    refused(
        tmp_path,
        config,
        2,
        f"invalid configuration in {config}:\n  accounts.acme.users[0].username and "
        f"accounts.other.users[1].username: the login '{USER}' is in two accounts; a login must be unique "
        "across accounts: rename one of them",
    )


@pytest.mark.parametrize(
    ("cut", "why"),
    [
        (lambda h: h[:-4], "has a digest of 30 bytes instead of 32: it was cut short or edited"),
        (lambda h: h.rpartition("$")[0], "has 5 of the 6 '$'-separated parts of a hash: it was cut short or edited"),
        (lambda h: h[:-1], "has a salt or digest that is not base64: it was cut short or edited"),
    ],
)
def test_a_password_hash_cut_short(tmp_path: Path, cut: object, why: str) -> None:
    truncated = cut(PASSWORD_HASH)  # type: ignore[operator]
    config = write(tmp_path)
    config.write_text(config.read_text().replace(PASSWORD_HASH, truncated))
    refused(
        tmp_path,
        config,
        2,
        f"accounts.acme.users[0].password_hash: {why}; run `smtp-gateway hash-password` and paste its whole line",
    )
    assert truncated not in cli(tmp_path, "check-config", "--config", str(config)).stderr


@pytest.mark.parametrize("provider", ["dmds", "dengage"])
def test_api_base_without_its_scheme(tmp_path: Path, provider: str) -> None:
    extra = f"""
[accounts.shop]
provider = "{provider}"
{'dmdsid = "shop"' if provider == "dmds" else ""}
api_base = "api.shop.example/rest"
{f'apikey = "{APIKEY}"' if provider == "dmds" else 'userkey = "k"' + chr(10) + 'password = "p"'}
"""
    refused(
        tmp_path,
        write(tmp_path, accounts=extra),
        2,
        "accounts.shop.api_base: 'api.shop.example/rest' is not an http:// or https:// URL with a host: write it "
        "whole, e.g. https://api.shop.example/rest",
    )


def test_a_spool_path_that_is_not_a_database(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a queue\n")
    refused(
        tmp_path,
        write(tmp_path, delivery=f'spool_path = "{notes}"'),
        1,
        f"delivery.spool_path {notes} is not an SQLite database but some other file: set delivery.spool_path to "
        "a file of its own (the gateway creates it)",
    )


def test_a_spool_path_that_is_another_programs_database(tmp_path: Path) -> None:
    other = tmp_path / "app.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE invoices (id INTEGER)")
    db.close()
    refused(
        tmp_path,
        write(tmp_path, delivery=f'spool_path = "{other}"'),
        1,
        f"delivery.spool_path {other} is another program's SQLite database (tables invoices): set "
        "delivery.spool_path to a file of its own",
    )


@pytest.mark.parametrize("workers", ["0", "-2", "two"])
def test_serve_with_no_workers(tmp_path: Path, workers: str) -> None:
    done = cli(tmp_path, "serve", "--config", str(write(tmp_path)), "--workers", workers)
    assert done.returncode == 2
    assert (
        f"smtp-gateway serve: error: argument --workers: '{workers}' is not a number of processes: give 1 or more"
        in done.stderr
    )


def test_an_unreachable_postgresql_queue(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there: refused at once
    config = write(tmp_path, delivery=f'queue_url = "postgresql://gateway@127.0.0.1:{port}/gateway"')
    message = (
        f"delivery.queue_url postgresql://gateway@127.0.0.1:{port}/gateway: cannot connect to 127.0.0.1:{port}: "
        "Connection refused: start PostgreSQL there, or correct the host and port in delivery.queue_url"
    )
    refused(tmp_path, config, 1, message)
    # The queue commands too, at once: no pool retrying for ten seconds, no "is it an smtp-gateway queue?".
    done = cli(tmp_path, "queue", "--config", str(config), "list")
    assert done.returncode == 1
    assert done.stderr == f"smtp-gateway: {message}\n"
