"""`smtp-gateway example-config`: print the commented example configuration the package ships."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from typing import Any

from gateway.cli.exits import Exit

# Every key with its default and a comment; the source tree links it as config/example.toml.
EXAMPLE = "examples/example.toml"


def example_text() -> str:
    return resources.files("gateway").joinpath(EXAMPLE).read_text(encoding="utf-8")


def cmd_example_config(args: argparse.Namespace) -> int:
    sys.stdout.write(example_text())
    return Exit.OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "example-config",
        help="print the example configuration (every key, its default, a comment): "
        "smtp-gateway example-config > gateway.toml",
    )
    p.set_defaults(func=cmd_example_config, config=None)
