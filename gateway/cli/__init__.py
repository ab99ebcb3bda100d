"""Command line: serve | quickstart | sandbox | check-config | check-domains | check-upstream | queue | status |
suppression | hash-password | example-config."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from gateway import __version__
from gateway.cli import (
    config,
    domains,
    example,
    passwords,
    queue,
    quickstart,
    sandbox,
    serve,
    status,
    suppression,
    upstream,
)
from gateway.cli.common import Refused
from gateway.cli.exits import Exit
from gateway.config import ConfigError, ConfigFileError

# One module per command: its add_parser(sub) adds the subcommand and sets its handler (`func`). In help order.
COMMANDS = (serve, config, domains, upstream, queue, status, suppression, passwords, sandbox, quickstart, example)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, its usage errors ending with the exit table's status (subcommands' parsers too)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(Exit.USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="smtp-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"smtp-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Whatever an operator can get wrong ends in a line or two on stderr, never a traceback."""
    try:
        args = build_parser().parse_args(argv)
        status = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except ConfigFileError as exc:  # the configuration is right, a file it names is not (exit-statuses.md)
        print(f"smtp-gateway: {exc}", file=sys.stderr)
        return Exit.PROBLEM
    except ConfigError as exc:
        print(f"smtp-gateway: {exc}", file=sys.stderr)
        return Exit.USAGE
    except Refused as exc:
        for line in exc.lines:
            print(f"smtp-gateway: {line}", file=sys.stderr)
        return Exit.PROBLEM
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the line the ^C was echoed on
        return Exit.INTERRUPTED
    except BrokenPipeError:
        # `smtp-gateway queue list --json | head`: the reader has gone, as with coreutils stop quietly.
        # Point stdout at /dev/null so the interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return Exit.BROKEN_PIPE
