"""Command line: serve | quickstart | sandbox | check-config | check-domains | queue | hash-password |
example-config."""

from __future__ import annotations

import argparse
import os
import sys

from gateway import __version__
from gateway.cli import config, domains, example, passwords, queue, quickstart, sandbox, serve
from gateway.cli.common import EXIT_BROKEN_PIPE, EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_PROBLEM, Refused
from gateway.config import ConfigError

# One module per command: its add_parser(sub) adds the subcommand and sets its handler (`func`). In help order.
COMMANDS = (serve, config, domains, queue, passwords, sandbox, quickstart, example)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtp-gateway", description=__doc__)
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
    except ConfigError as exc:
        print(f"smtp-gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Refused as exc:
        for line in exc.lines:
            print(f"smtp-gateway: {line}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the line the ^C was echoed on
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `smtp-gateway queue list --json | head`: the reader has gone, as with coreutils stop quietly.
        # Point stdout at /dev/null so the interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
