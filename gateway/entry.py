"""The `smtp-gateway` console script and `python -m gateway`: a Ctrl-C from the first instruction on, even
while the command's modules are still being imported, exits 130 quietly (no KeyboardInterrupt traceback)."""

from __future__ import annotations

import signal
import sys


def main() -> int:
    if "--worker-slot" in sys.argv:
        # A worker of `serve --workers N`: the supervisor passes SIGHUP on at any moment, also while this process
        # is still importing. Its configuration is read after that anyway: until `serve` catches SIGHUP
        # (gateway/ops/signals.py), ignore it rather than die of it.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        from gateway.cli import main as run  # imports most of the gateway: tens of milliseconds

        return run()
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the line the ^C was echoed on
        return 130  # Exit.INTERRUPTED (gateway.cli.exits), which may not be importable yet
