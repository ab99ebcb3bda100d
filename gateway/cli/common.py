"""What every command shares: exit statuses, refusals, loading the configuration, running the event loop."""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import re
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from gateway.cli.exits import Exit
from gateway.config import CONFIG_ENV, Settings, load_settings, preflight
from gateway.config.settings import ENV_PREFIX
from gateway.core.errors import QueueBusy, QueueUnreachable
from gateway.providers import registry  # noqa: F401 - registers the providers' account models (load)
from gateway.queue.sqlite_wal import busy as sqlite_busy

T = TypeVar("T")


class Refused(Exception):
    """The command cannot run; the lines say why and what to do (Exit.PROBLEM)."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--config", "-c", metavar="FILE", help="TOML file (default: $GATEWAY_CONFIG); GATEWAY_* env overrides"
    )
    return p


def load(args: argparse.Namespace) -> Settings:
    return load_settings(Path(args.config) if args.config else None)


def utf8_text(value: str) -> str:
    """An argparse type for arguments that are looked up in the queue or the ledger (ids, addresses, names): a
    byte that is not UTF-8 (a Latin-1 terminal's `ü`, a pasted stray byte) arrives as a surrogate escape that no
    database can take; it is a usage error (exit 2) naming the argument, not a traceback."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            f"{ascii(value)[:60]} is not UTF-8 text: type it in a UTF-8 terminal (LANG=C.UTF-8), or give it in ASCII"
        ) from None
    return value


def add_spool_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--spool",
        metavar="FILE",
        help="the SQLite queue file (default: delivery.spool_path, or delivery.queue_url's PostgreSQL; the quick "
        "start's is var/quickstart/spool.sqlite3)",
    )


def load_for_queue(args: argparse.Namespace) -> Settings:
    """The configuration, with `--spool FILE` (if given) as the queue: how `queue`, `status` and `suppression`
    find it. Logging is set up here, to stderr: the queue logs as it opens (queue_migrated,
    queue_auto_vacuum_on, queue_database_unreachable...), and structlog's default would print those on stdout,
    in front of `--json` output."""
    from gateway.ops import logs  # structlog's setup: only for commands that open the queue

    settings = load(args)
    logs.configure(settings.log)
    if args.spool:
        delivery = settings.delivery.model_copy(update={"spool_path": Path(args.spool), "queue_url": ""})
        settings = settings.model_copy(update={"delivery": delivery})
    return settings


def no_queue(settings: Settings, what: str = "", *, from_spool: bool = False) -> str:
    """The line for a SQLite queue file that does not exist, naming the absolute path looked at.

    `serve` creates its file when it starts, so a missing one means the path is not the one the running
    gateway uses; a relative path (the example's `var/spool.sqlite3`) is the usual cause: each process reads
    it from its own current directory, and a service's is not the operator's shell's. A path given with
    `--spool FILE` is the operator's own: advice on delivery.spool_path would not apply to it."""
    path = settings.delivery.spool_path
    where = f"no queue{what} at {path.absolute()}"
    if path.is_absolute():
        return f"{where} (no gateway has run with it: is it the delivery.spool_path that serve uses?)"
    if from_spool:
        return f"{where} (--spool {path}: no such file in the current directory)"
    return (
        f"{where} ({path} is relative: read from the current directory, and serve reads it from its own; an "
        "absolute delivery.spool_path names one file for both, or give it with --spool FILE)"
    )


def refuse_other_files(settings: Settings) -> None:
    """An existing SQLite file that is not a queue (another program's database, the queue's own `-ratelimit`
    side file that tab completion offers next to it) is refused before it is opened: opening it as the queue
    would write the gateway's schema into it and VACUUM it, and report an empty queue."""
    if settings.delivery.queue_url:
        return
    problems = preflight.queue_file_contents(settings.delivery.spool_path)
    if problems:
        raise Refused([f.text for f in problems])


def no_config_file(args: argparse.Namespace) -> bool:
    return not args.config and not os.environ.get(CONFIG_ENV)


def refuse_on_problems(findings: list[preflight.Finding], args: argparse.Namespace) -> None:
    problems = [f.text for f in findings if f.problem]
    if problems and args.command == "serve" and no_config_file(args):
        hint = (
            f"no config file was given (--config FILE or ${CONFIG_ENV}); to try the gateway "
            "without one: smtp-gateway quickstart"
        )
        if not any(n.upper().startswith(ENV_PREFIX) and n.upper() != CONFIG_ENV for n in os.environ):
            # Nothing configured at all: the built-in defaults' problems (a listener "submission", a relative
            # spool_path) are of a configuration the user never wrote; the hint is the one line that helps.
            raise Refused([hint])
        problems.append(hint)  # configured by GATEWAY_* variables alone: their problems are the user's
    for note in (f for f in findings if not f.problem):
        print(f"smtp-gateway: {note}", file=sys.stderr)
    if problems:
        raise Refused(problems)


def spool_failure(settings: Settings, exc: Exception) -> Refused:
    if isinstance(exc, QueueUnreachable):
        return Refused([unreachable(settings, exc)])
    where = queue_named(settings)
    if _lock_wait(exc):
        # Not the queue's fault and nothing to fix: another process (serve, another command) held the lock past
        # the wait (operations/queue.md "A locked or slow queue"); the library's words would only mislead.
        return Refused([f"{where}: another process holds the queue's lock; try again"])
    if isinstance(exc, QueueBusy):
        # A statement past its bound or every pooled connection in use: the server's words, without the
        # queue's URL a second time.
        return Refused([f"{where}: {str(exc).partition(': busy: ')[2] or exc}: the queue is busy; try again"])
    return Refused([f"{where}: {exc} (is it an smtp-gateway queue, readable and writable?)"])


def queue_named(settings: Settings) -> str:
    """The queue as the operator's lines name it: the setting and its value (a URL without its password)."""
    url = settings.delivery.queue_url
    if not url:
        return f"delivery.spool_path {settings.delivery.spool_path}"
    from gateway.queue.postgres import redacted  # psycopg is only needed for PostgreSQL

    return f"delivery.queue_url {redacted(url)}"


# PostgreSQL's lock_not_available: a lock_timeout reached (the queue's, the ledger's).
_LOCK_NOT_AVAILABLE = "55P03"


def _lock_wait(exc: BaseException) -> bool:
    """Whether `exc`, or what it was raised from, is a wait for another session's lock that timed out."""
    seen: BaseException | None = exc
    while seen is not None:
        if sqlite_busy(seen):
            return True
        if getattr(seen, "sqlstate", None) == _LOCK_NOT_AVAILABLE:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# What to do when the PostgreSQL server (or libpq) refused the connection for a reason other than the network:
# read from their words, as psycopg gives no SQLSTATE for a connection that failed (there is no result yet).
# The server's words are English unless its lc_messages says otherwise; then the general line stands.
_CONNECT_HINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r'database "[^"]*" does not exist'),
        "create the database on the server (createdb --owner ROLE NAME), or correct the database name in "
        "delivery.queue_url",
    ),
    (
        re.compile(r'role "[^"]*" does not exist'),
        "create the role on the server (createuser NAME), or correct the user name in delivery.queue_url",
    ),
    (
        re.compile(r"password authentication failed|authentication failed for user|no password supplied"),
        "set the role's password in delivery.queue_password (or queue_password_file, or PGPASSWORD), or correct "
        "the user name in delivery.queue_url",
    ),
    (
        re.compile(r"no pg_hba\.conf entry"),
        "allow this host, user and database in the server's pg_hba.conf (or set sslmode in delivery.queue_url if "
        "it allows only TLS connections)",
    ),
    (
        re.compile(r"permission denied for database"),
        "grant the role CONNECT on the database (GRANT CONNECT ON DATABASE NAME TO ROLE)",
    ),
    (
        re.compile(r"invalid sslmode value"),
        "sslmode is one of disable, allow, prefer, require, verify-ca, verify-full: correct it in delivery.queue_url",
    ),
    (
        re.compile(r"invalid .*value|invalid .*option"),
        "correct that parameter in delivery.queue_url",
    ),
    (
        re.compile(r"SSL|certificate"),
        "check the TLS parameters in delivery.queue_url (sslmode, sslrootcert, sslcert, sslkey) against the server's",
    ),
)
_NOT_ANSWERING = "start PostgreSQL there, or correct the host and port in delivery.queue_url"


def unreachable(settings: Settings, exc: QueueUnreachable) -> str:
    hint = next((hint for words, hint in _CONNECT_HINTS if words.search(exc.reason)), _NOT_ANSWERING)
    return f"{queue_named(settings)}: {exc.reason}: {hint}"


def queue_findings(settings: Settings) -> list[preflight.Finding]:
    """Whether the PostgreSQL queue's server answers (the SQLite file is one of preflight.files)."""
    delivery = settings.delivery
    if not delivery.queue_url:
        return []
    from gateway.queue.postgres import probe  # psycopg is only needed for PostgreSQL

    password = delivery.queue_password.get_secret_value() if delivery.queue_password else None
    try:
        asyncio.run(probe(delivery.queue_url, password))
    except QueueUnreachable as exc:
        return [preflight.Finding(unreachable(settings, exc))]
    return []


def refuse_unreachable_queue(settings: Settings) -> None:
    """A PostgreSQL queue whose server cannot be reached: refused at once with the line `queue list` gives (one
    connection attempt), not after a pool's retries for seconds with psycopg's warnings and a traceback."""
    problems = queue_findings(settings)
    if problems:
        raise Refused([f.text for f in problems])


def run_loop(coro: Coroutine[Any, Any, T], ports: list[preflight.Port]) -> T:
    try:
        import uvloop
    except ImportError:
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    try:
        result: T = runner(coro)
    except OSError as exc:
        # a port taken between the check and the bind, or another listen failure
        raise listen_failure(exc, ports) from None
    return result


def stopped_by(sig: signal.Signals) -> Exit:
    """The exit status of a server stopped cleanly by `sig`: OK for SIGTERM (a service manager's stop),
    INTERRUPTED for SIGINT (Ctrl-C, as shells report an interrupted command)."""
    return Exit.INTERRUPTED if sig == signal.SIGINT else Exit.OK


def listen_failure(exc: OSError, ports: list[preflight.Port]) -> Exception:
    if exc.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
        return exc  # not a listen failure: let it surface
    findings = preflight.ports(ports)
    return Refused([f.text for f in findings] or [f"cannot listen: {exc.strerror or exc}"])
