"""The `smtp-gateway` console script and `python -m gateway`: a Ctrl-C from the first instruction on, even
while the command's modules are still being imported, exits 130 quietly (no KeyboardInterrupt traceback)."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from gateway.cli import main as run  # imports most of the gateway: tens of milliseconds

        return run()
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the line the ^C was echoed on
        return 130  # Exit.INTERRUPTED (gateway.cli.exits), which may not be importable yet
