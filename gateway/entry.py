"""The `smtp-gateway` console script and `python -m gateway`: a Ctrl-C from the first instruction on, even
while the command's modules are still being imported, exits 130 quietly (no KeyboardInterrupt traceback)."""

from __future__ import annotations

import signal
import sys


def main() -> int:
    if "serve" in sys.argv[1:]:
        # `serve` (a worker of `serve --workers N` too: the supervisor passes SIGHUP on at any moment) may get a
        # reload's SIGHUP while it is still importing, and would die of it (systemd counts that a clean exit,
        # so nothing restarts it). The configuration is read after the imports anyway: until `serve` catches
        # SIGHUP (gateway/ops/signals.py), ignore it.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        from gateway.cli import main as run  # imports most of the gateway: tens of milliseconds

        return run()
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the line the ^C was echoed on
        return 130  # Exit.INTERRUPTED (gateway.cli.exits), which may not be importable yet
