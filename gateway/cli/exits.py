"""The exit statuses of `smtp-gateway`: the one table every command returns from (and the docs list)."""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    """An exit status with what it means to the operator or script that ran the command."""

    meaning: str

    def __new__(cls, status: int, meaning: str) -> Exit:
        member = int.__new__(cls, status)
        member._value_ = status
        member.meaning = meaning
        return member

    OK = (
        0,
        "Done. For `serve`, `quickstart` and `sandbox`: stopped by SIGTERM once started. For `check-config`: no "
        "problem found. For `check-domains`: no domain with a problem. For `check-upstream`: every account's API "
        "reached, the credentials taken, every answer understood, every configured campaign or sender found.",
    )
    PROBLEM = (
        1,
        "A problem on this machine (a port taken, a file the configuration names that cannot be read or loaded: "
        "a certificate, a CA file, a `*_file` secret; the resolver), a queue that cannot be opened, no SQLite "
        "queue file where `queue`, `status` or `suppression` looked (the line names the absolute path) or a file "
        "there that is not a queue (an empty file, another program's database, the queue's `-ratelimit` side "
        "file: left unchanged), or a command that found problems: `check-config` (its last line counts them), "
        "`check-domains`, "
        "`check-upstream` (an account not reached, its credentials refused, an answer not understood, a "
        "campaign or sender it does not have: each named with what to fix), `queue "
        "show`/`retry`/`delete`/`requeue` (no such message, or not in a state that allows it), `queue backup` (DEST "
        "exists and no `--force`, DEST is the queue or one of its files even with `--force`, DEST cannot be "
        "written, a PostgreSQL queue: pg_dump), `status` (no "
        "message found, or no queue and so no ledger), `suppression remove` (the address was not suppressed). "
        "`serve --workers "
        "N`: the highest status of a worker that did not stop cleanly (a worker killed by signal S counts as S). "
        "Also an unexpected error, printed with its traceback.",
    )
    USAGE = (
        2,
        "The configuration or the command line: an unknown key or `GATEWAY_*` variable, an invalid value, a TOML "
        "syntax error, a wrong option or argument (an id, address or name that is not UTF-8 text: a Latin-1 "
        "terminal's), an empty password for `hash-password` or one that is not UTF-8 text.",
    )
    INTERRUPTED = (
        130,
        "Ctrl-C (SIGINT): `serve`, `quickstart` and `sandbox` stop cleanly first (`serve --workers N`: the "
        "supervisor, when every worker stopped cleanly); any command at any other moment, even while its modules "
        "load, stops at once, without a traceback.",
    )
    BROKEN_PIPE = (
        141,
        "The output pipe was closed (e.g. `queue list --json` piped into `head`, which stops reading), as a shell "
        "reports a command killed by SIGPIPE.",
    )
