"""Configurations that were accepted but could not work: `check-config` and `serve` refuse each, through the
real CLI, naming the key, where it is and the fix, in the operator's words (no Traceback, no pydantic)."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.configs import APIKEY, PASSWORD_HASH, USER, gateway_config, listener, write
from tests.pgserver import PgCluster, new_cluster
from tests.procs import CLI
from tests.test_first_contact import _env

# A guard against a process that starts serving instead of refusing (it would never end), not a speed check:
# a refusal takes well under a second, but on a loaded machine (CI, two test workers, two busy cores) the
# interpreter's start alone took more than 8 s.
TIMEOUT = 60


def config(tmp: Path, **overrides: Any) -> Path:
    return write(tmp / "gateway.toml", gateway_config(tmp, listeners=[listener("plain")], **overrides))


def cli(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*CLI, *args], cwd=tmp, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    assert "Value error" not in done.stderr and "pydantic" not in done.stderr, done.stderr
    return done


def refused(tmp: Path, path: Path, status: int, message: str) -> None:
    """check-config and serve both refuse `path` with `status` and a line holding `message`."""
    for command in ("check-config", "serve"):
        done = cli(tmp, command, "--config", str(path))
        assert done.returncode == status, (command, done.stderr)
        assert message in done.stderr, (command, done.stderr)


def test_one_login_in_two_accounts(tmp_path: Path) -> None:
    users = [{"username": "erp", "password_hash": PASSWORD_HASH}, {"username": USER, "password_hash": PASSWORD_HASH}]
    path = config(tmp_path, accounts={"acme": {}, "other": {"dmdsid": "other", "apikey": APIKEY, "users": users}})
    refused(
        tmp_path,
        path,
        2,
        f"invalid configuration in {path}:\n  accounts.acme.users[0].username and "
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
def test_a_password_hash_cut_short(tmp_path: Path, cut: Any, why: str) -> None:
    truncated = cut(PASSWORD_HASH)
    users = [{"username": USER, "password_hash": truncated, "campaign": 22}]
    path = config(tmp_path, accounts={"acme": {"users": users}})
    refused(
        tmp_path,
        path,
        2,
        f"accounts.acme.users[0].password_hash: {why}; run `smtp-gateway hash-password` and paste its whole line",
    )
    assert truncated not in cli(tmp_path, "check-config", "--config", str(path)).stderr


@pytest.mark.parametrize("provider", ["dmds", "dengage"])
def test_api_base_without_its_scheme(tmp_path: Path, provider: str) -> None:
    secrets = {"dmdsid": "shop", "apikey": APIKEY} if provider == "dmds" else {"userkey": "k", "password": "p"}
    shop = {"provider": provider, "api_base": "api.shop.example/rest", **secrets}
    path = config(tmp_path, accounts={"acme": {}, "shop": shop})
    refused(
        tmp_path,
        path,
        2,
        "accounts.shop.api_base: must be an http:// or https:// URL with a host, written whole, e.g. "
        "https://api.example.com",
    )
    # Never quoted: a URL may hold a key (a malformed one with user:password@ would print it twice).
    assert "api.shop.example" not in cli(tmp_path, "check-config", "--config", str(path)).stderr


@pytest.mark.parametrize("provider", ["dmds", "dengage"])
@pytest.mark.parametrize(
    "api_base",
    [
        "https://api.shop.example/rest?key=URLSECRET",
        "https://api.shop.example/rest#URLSECRET",
        "https://api.shop.example/?",
    ],
)
def test_api_base_with_a_query_or_fragment(tmp_path: Path, provider: str, api_base: str) -> None:
    """Each call's path is appended to api_base: after a query (`/rest?key=K/v1/version/`) no call could work,
    so a query is refused at load, not found out by every message failing; never quoted (a key goes there)."""
    secrets = {"dmdsid": "shop", "apikey": APIKEY} if provider == "dmds" else {"userkey": "k", "password": "p"}
    shop = {"provider": provider, "api_base": api_base, **secrets}
    path = config(tmp_path, accounts={"acme": {}, "shop": shop})
    refused(
        tmp_path,
        path,
        2,
        "accounts.shop.api_base: must have no query or fragment (?... or #...): each call's path is appended to "
        "it; the account's keys go in its own settings",
    )
    assert "URLSECRET" not in cli(tmp_path, "check-config", "--config", str(path)).stderr


@pytest.mark.parametrize(
    ("where", "url"),
    [
        ("accounts.acme.api_base", "https://user:URLSECRET@api.example.com/rest"),
        ("accounts.acme.api_base", "user:URLSECRET@api.example.com"),
        ("accounts.acme.api_base", "https://api.example.com:99999/URLSECRET"),
        ("oauth.issuers[0].jwks_url", "https://user:URLSECRET@idp.example/keys"),
        ("oauth.issuers[0].jwks_url", "idp.example/URLSECRET"),
    ],
)
def test_a_url_holding_credentials_or_malformed_is_refused_without_echoing_it(
    tmp_path: Path, where: str, url: str
) -> None:
    """An account's api_base and an issuer's jwks_url are printed by check-config and logged: credentials in
    their user part are refused (as a webhook's are), and no refusal quotes the value."""
    if where.startswith("oauth"):
        issuer = {"name": "corp", "issuer": "https://idp.example", "jwks_url": url, "audience": ["gw"]}
        path = config(tmp_path, oauth={"issuers": [issuer]})
    else:
        path = config(tmp_path, accounts={"acme": {"api_base": url}})
    done = cli(tmp_path, "check-config", "--config", str(path))
    assert done.returncode == 2, done.stderr
    assert f"{where}: " in done.stderr, done.stderr
    if "@" in url and "://" in url:
        assert "holds credentials (user:password@)" in done.stderr, done.stderr
    assert "URLSECRET" not in done.stdout + done.stderr


def test_a_missing_oauth_ca_file(tmp_path: Path) -> None:
    """check-config said OK and serve ended in a FileNotFoundError traceback: both now name the key."""
    missing = tmp_path / "missing-ca.pem"
    issuer = {
        "name": "corp",
        "issuer": "https://idp.example",
        "jwks_url": "https://127.0.0.1:1/keys",
        "audience": ["gw"],
        "ca_file": str(missing),
    }
    refused(
        tmp_path,
        config(tmp_path, oauth={"issuers": [issuer]}),
        1,
        f"oauth.issuers[corp].ca_file {missing} does not exist: create it or set oauth.issuers[corp].ca_file to "
        "the right file",
    )


def test_an_oauth_ca_file_that_is_no_certificate(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a certificate\n")
    issuer = {
        "name": "corp",
        "issuer": "https://idp.example",
        "jwks_url": "https://127.0.0.1:1/keys",
        "audience": ["gw"],
        "ca_file": str(notes),
    }
    refused(
        tmp_path,
        config(tmp_path, oauth={"issuers": [issuer]}),
        1,
        f"oauth.issuers[corp].ca_file {notes} does not load as CA certificates",
    )


def test_a_missing_extra_certificate(tmp_path: Path) -> None:
    """serve loads tls.extra_cert_file with the main pair: check-config said OK, and serve refused naming
    tls.cert_file / tls.key_file with exit status 2."""
    base = gateway_config(tmp_path, listeners=[listener("starttls", "starttls")])
    missing = tmp_path / "no-rsa.pem"
    tls = {**base["tls"], "extra_cert_file": str(missing), "extra_key_file": str(tmp_path / "no-rsa.key")}
    path = write(tmp_path / "gateway.toml", {**base, "tls": tls})
    refused(
        tmp_path,
        path,
        1,
        f"tls.extra_cert_file {missing} does not exist: create it or set tls.extra_cert_file to the right file",
    )


def test_an_unreadable_secret_file_is_a_problem_of_this_machine(tmp_path: Path) -> None:
    """exit-statuses.md: a file unreadable is status 1 (this machine), an invalid value 2; it was 2."""
    missing = tmp_path / "secrets" / "apikey"
    path = config(tmp_path, accounts={"acme": {"apikey": None, "apikey_file": str(missing)}})
    refused(tmp_path, path, 1, f"accounts.acme: apikey_file: cannot read {missing}: No such file or directory")
    # With an invalid value beside it, the configuration is at fault: 2, and both are named.
    path = config(
        tmp_path, accounts={"acme": {"apikey": None, "apikey_file": str(missing)}}, limits={"max_recipients": 0}
    )
    done = cli(tmp_path, "check-config", "--config", str(path))
    assert done.returncode == 2 and "apikey_file: cannot read" in done.stderr and "max_recipients" in done.stderr


def test_a_spool_path_that_is_not_a_database(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a queue\n")
    refused(
        tmp_path,
        config(tmp_path, delivery={"spool_path": str(notes)}),
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
        config(tmp_path, delivery={"spool_path": str(other)}),
        1,
        f"delivery.spool_path {other} is another program's SQLite database (tables invoices): set "
        "delivery.spool_path to a file of its own",
    )


def test_serve_refuses_a_queue_a_newer_version_wrote(tmp_path: Path) -> None:
    """docs/install.md: a queue of a newer schema is refused. It was only logged (queue_unavailable) and the
    gateway served, answering 452 to every message that needed the queue."""
    spool = tmp_path / "newer.sqlite3"
    with contextlib.closing(sqlite3.connect(spool)) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (99)")
        db.commit()
    done = cli(tmp_path, "serve", "--config", str(config(tmp_path, delivery={"spool_path": str(spool)})))
    assert done.returncode == 1, done.stderr
    assert f"delivery.spool_path {spool}: queue {spool}: queue schema version 99 is newer than this gateway" in (
        done.stderr
    )


@pytest.mark.parametrize("workers", ["0", "-2", "two"])
def test_serve_with_no_workers(tmp_path: Path, workers: str) -> None:
    done = cli(tmp_path, "serve", "--config", str(config(tmp_path)), "--workers", workers)
    assert done.returncode == 2
    assert (
        f"smtp-gateway serve: error: argument --workers: '{workers}' is not a number of processes: give 1 or more"
        in done.stderr
    )


def test_an_unreachable_postgresql_queue(tmp_path: Path) -> None:
    with socket.socket() as bound:  # bound, never listening: a connection to it is refused at once
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        path = config(tmp_path, delivery={"queue_url": f"postgresql://gateway@127.0.0.1:{port}/gateway"})
        message = (
            f"delivery.queue_url postgresql://gateway@127.0.0.1:{port}/gateway: cannot connect to 127.0.0.1:{port}: "
            "Connection refused: start PostgreSQL there, or correct the host and port in delivery.queue_url"
        )
        refused(tmp_path, path, 1, message)
        # The queue commands too: the same message, no "is it an smtp-gateway queue?".
        done = cli(tmp_path, "queue", "--config", str(path), "list")
    # Only the message: the connection is tried before the queue opens (whose circuit would log
    # queue_database_unreachable on stderr ahead of it).
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"smtp-gateway: {message}\n"


@pytest.mark.parametrize(
    ("url", "refusal"),
    [
        (
            "postgresql://gateway@127.0.0.1/gateway?foo=bar",
            "is not a URL libpq can read: invalid URI query parameter",
        ),
        ("postgresql://[::1", 'is not a URL libpq can read: end of string reached when looking for matching "]"'),
        # Named, not quoted: what libpq cannot read is most often a password misplaced (tests/test_cli.py).
        ("postgresql://gateway@127.0.0.1:99999/gateway", "has a port that is not a port number (1-65535)"),
        ("postgresql://gateway@127.0.0.1/gateway?sslmode=requir", "sslmode is not one of disable, allow"),
    ],
    ids=["unknown-parameter", "malformed", "port-out-of-range", "unknown-sslmode"],
)
def test_a_queue_url_libpq_cannot_use_is_refused_where_the_config_is_read(
    tmp_path: Path, url: str, refusal: str
) -> None:
    """libpq reads the URL only when it connects: an unknown query parameter or a malformed URL gave psycopg's
    traceback, a port out of range or an unknown sslmode "cannot connect" to a server never tried. Now the
    config's refusal naming the key, from every command that reads it."""
    path = config(tmp_path, delivery={"queue_url": url})
    refused(tmp_path, path, 2, f"delivery.queue_url: {refusal}")
    done = cli(tmp_path, "queue", "--config", str(path), "list")
    assert done.returncode == 2 and f"delivery.queue_url: {refusal}" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "command", [["suppression", "list"], ["suppression", "remove", "a@example.com"], ["status", "x"]]
)
def test_the_ledger_commands_on_an_unreachable_postgresql_queue(tmp_path: Path, command: list[str]) -> None:
    """They waited 10 s for their pool, printed psycopg's warnings and a PoolTimeout traceback (or a line
    asking whether it was an smtp-gateway queue): now queue list's line, at once."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        path = config(tmp_path, delivery={"queue_url": f"postgresql://gateway@127.0.0.1:{port}/gateway"})
        done = cli(tmp_path, *command, "--config", str(path))
    assert done.returncode == 1
    assert done.stderr == (
        f"smtp-gateway: delivery.queue_url postgresql://gateway@127.0.0.1:{port}/gateway: cannot connect to "
        f"127.0.0.1:{port}: Connection refused: start PostgreSQL there, or correct the host and port in "
        "delivery.queue_url\n"
    )


@pytest.mark.parametrize(
    ("where", "reason", "hint"),
    [
        (
            "/nodb?host={dir}",
            'database "nodb" does not exist',
            "create the database on the server (createdb --owner ROLE NAME), or correct the database name in "
            "delivery.queue_url",
        ),
        (
            "/gateway?host={dir}&user=nobody",
            'role "nobody" does not exist',
            "create the role on the server (createuser NAME), or correct the user name in delivery.queue_url",
        ),
    ],
    ids=["missing-database", "unknown-role"],
)
def test_a_postgresql_server_that_refuses_the_connection(
    tmp_path: Path, pg_cluster: Any, where: str, reason: str, hint: str
) -> None:
    """The server answered: "start PostgreSQL there, or correct the host and port" was the wrong fix for the
    likeliest first-install mistakes (review cli2 F8); each gets its own."""
    url = "postgresql://gateway@" + where.format(dir=pg_cluster.dir)
    path = config(tmp_path, delivery={"queue_url": url})
    message = f"delivery.queue_url {url}: cannot connect to {pg_cluster.dir}:5432: {reason}: {hint}"
    refused(tmp_path, path, 1, message)
    done = cli(tmp_path, "queue", "--config", str(path), "list")
    assert done.returncode == 1
    assert done.stderr == f"smtp-gateway: {message}\n"
    assert "start PostgreSQL" not in done.stderr


@pytest.fixture(scope="module")
def password_cluster() -> Iterator[PgCluster]:
    """A private cluster of its own (the session's trusts every connection): the role `pwuser` logs in with a
    scram-sha-256 password, the role `nohba` has no pg_hba.conf line."""
    cluster = new_cluster()
    try:
        cluster.start(hba="local all gateway trust\nlocal all pwuser scram-sha-256\n")
        with psycopg.connect(f"postgresql://gateway@/postgres?host={cluster.dir}", autocommit=True) as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute("CREATE ROLE pwuser LOGIN PASSWORD 'right-one'")
            conn.execute("CREATE ROLE nohba LOGIN")
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.parametrize(
    ("user", "password", "reason", "hint"),
    [
        (
            "pwuser",
            "wrong-one",
            'password authentication failed for user "pwuser"',
            "set the role's password in delivery.queue_password (or queue_password_file, or PGPASSWORD), or "
            "correct the user name in delivery.queue_url",
        ),
        (
            "pwuser",
            None,
            "fe_sendauth: no password supplied",
            "set the role's password in delivery.queue_password (or queue_password_file, or PGPASSWORD), or "
            "correct the user name in delivery.queue_url",
        ),
        (
            "nohba",
            None,
            'no pg_hba.conf entry for host "[local]", user "nohba"',
            "allow this host, user and database in the server's pg_hba.conf (or set sslmode in "
            "delivery.queue_url if it allows only TLS connections)",
        ),
    ],
    ids=["bad-password", "no-password", "no-pg_hba-entry"],
)
def test_a_postgresql_server_that_refuses_the_login(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    password_cluster: PgCluster,
    user: str,
    password: str | None,
    reason: str,
    hint: str,
) -> None:
    """The hints for a wrong or missing password and for a missing pg_hba.conf line, from a server that asks
    for them (the session's cluster trusts every connection); the password is never printed."""
    monkeypatch.delenv("PGPASSWORD", raising=False)  # the only password libpq may find is the config's
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))
    url = password_cluster.new_database().replace("postgresql://gateway@", f"postgresql://{user}@", 1)
    delivery: dict[str, Any] = {"queue_url": url}
    if password is not None:
        delivery["queue_password"] = password
    path = config(tmp_path, delivery=delivery)
    refused(tmp_path, path, 1, f"delivery.queue_url {url}: cannot connect to {password_cluster.dir}:5432: {reason}")
    done = cli(tmp_path, "queue", "--config", str(path), "list")
    assert done.returncode == 1
    assert reason in done.stderr and done.stderr.rstrip().endswith(hint), done.stderr
    assert "wrong-one" not in done.stderr and "right-one" not in done.stderr


def test_an_api_token_hash_cut_short(tmp_path: Path) -> None:
    """The message API's token hashes are read by the same rule as the logins' password hashes."""
    tokens = [{"name": "ci", "token_hash": PASSWORD_HASH[:-4]}]
    refused(
        tmp_path,
        config(tmp_path, http={"port": 0, "api_tokens": tokens}),
        2,
        "http.api_tokens[0].token_hash: has a digest of 30 bytes instead of 32: it was cut short or edited; run "
        "`smtp-gateway hash-password` and paste its whole line",
    )


def test_a_ledger_retention_shorter_than_a_message_may_live(tmp_path: Path) -> None:
    """A record pruned while its message may still become a dead letter (or its webhooks be retried) would
    take the dead letter's notice and deliveries with it: refused, naming the floor."""
    hook = {"name": "crm", "url": "https://hooks.example/h", "secret": "s", "max_age": 7200}
    path = config(tmp_path, ledger={"retention": 86400}, webhooks=[hook])
    refused(
        tmp_path,
        path,
        2,
        "ledger.retention: 86400 seconds is shorter than delivery.max_lifetime plus the largest webhooks max_age "
        "(439200 seconds): a record could be pruned while its message may still become a dead letter or its "
        "webhooks be delivered; raise ledger.retention to at least 439200",
    )
