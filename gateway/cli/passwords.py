"""`smtp-gateway hash-password`: the scrypt hash a configured user's password_hash holds."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gateway.cli.exits import Exit


def cmd_hash_password(args: argparse.Namespace) -> int:
    import getpass  # termios and the rest: only for this command

    from gateway.auth.passwords import hash_password

    try:
        if args.stdin or not sys.stdin.isatty():
            # piped in (echo pw | smtp-gateway hash-password): the first line is the password
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            try:
                password = getpass.getpass("Password: ")
            except EOFError:  # Ctrl-D at the prompt
                password = ""
        # Under a C/POSIX locale stdin decodes with surrogateescape: such a password cannot be hashed either.
        password.encode("utf-8")
    except UnicodeError:  # a Latin-1 terminal or file: the error names no byte of the password
        print(
            "smtp-gateway: the password is not UTF-8 text: type it in a UTF-8 terminal (LANG=C.UTF-8), or pipe "
            "it in as UTF-8",
            file=sys.stderr,
        )
        return Exit.USAGE
    if not password:
        print(
            "smtp-gateway: empty password: type one, or pipe it in (printf '%s\\n' PASSWORD | "
            "smtp-gateway hash-password --stdin)",
            file=sys.stderr,
        )
        return Exit.USAGE
    print(hash_password(password))
    return Exit.OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser("hash-password", help="hash a password for [[accounts.X.users]] password_hash")
    p.add_argument(
        "--stdin",
        action="store_true",
        help="read the password from standard input (the default when it is not a terminal)",
    )
    p.set_defaults(func=cmd_hash_password)
