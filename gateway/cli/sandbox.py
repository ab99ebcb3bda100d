"""`smtp-gateway sandbox`: the sandbox upstream (every registered provider's routes) as a server of its own."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gateway.cli.common import refuse_on_problems, run_loop, stopped_by
from gateway.config import preflight
from gateway.providers import registry
from gateway.providers.spec import ProviderSpec, SandboxEntry


def cmd_sandbox(args: argparse.Namespace) -> int:
    from gateway.providers.fates import Fates
    from gateway.providers.sandbox import Sandbox, SandboxState, default_shape, run_forever

    served = _served()
    routes = [entry.routes(args) for _, entry in served]  # a malformed option value: ConfigError
    state = SandboxState(
        latency=args.latency_ms / 1000.0,
        record_path=Path(args.record) if args.record else None,
        echo=None if args.quiet else sys.stdout,
        shape=args.shape or default_shape(),
        fates=Fates(delay=args.event_delay),
        webhook_secret=args.webhook_secret,
    )
    sandbox = Sandbox(state, routes)
    host, port = args.listen
    wanted = [preflight.Port("sandbox --listen", host, port)]
    refuse_on_problems(preflight.ports(wanted), args)
    return stopped_by(run_loop(run_forever(sandbox, host, port, lambda url: describe(served, url)), wanted))


def _served() -> list[tuple[ProviderSpec[Any], SandboxEntry]]:
    """The registered providers that have sandbox routes, with them."""
    return [(spec, spec.sandbox) for spec in registry.specs() if spec.sandbox is not None]


def describe(served: list[tuple[ProviderSpec[Any], SandboxEntry]], url: str) -> str:
    """What the sandbox at `url` serves: "DMDS- and dEngage-compatible upstream on URL (dEngage api_base: ...)"."""
    text = f"{_and([f'{spec.label}-' for spec, _ in served])}compatible upstream on {url}"
    bases = [f"{spec.label} api_base: {url}{entry.api_base}" for spec, entry in served if entry.api_base]
    return text + (f" ({', '.join(bases)})" if bases else "")


def _and(names: list[str]) -> str:
    return " and ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} and {names[-1]}"


def _listen_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8025)")
    return host.strip("[]") or "127.0.0.1", int(port)


def add_parser(sub: Any) -> None:
    served = _served()
    p = sub.add_parser("sandbox", help=f"run the sandbox upstream ({_and([spec.label for spec, _ in served])} paths)")
    p.add_argument(
        "--listen",
        default="127.0.0.1:8025",
        type=_listen_address,
        metavar="HOST:PORT",
        help="where to listen (port 0: any free port, named in the line printed once listening)",
    )
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay added to every API call")
    p.add_argument("--record", help="append every request as JSON lines to this file")
    p.add_argument("--quiet", action="store_true", help="do not print requests")
    p.add_argument(
        "--shape",
        choices=("seed", "alt"),
        help="the answers' spelling: seed (the seed document's key names, the default) or alt (the other "
        "documented spellings); default: $SMTP_GATEWAY_SANDBOX_SHAPE, else seed",
    )
    p.add_argument(
        "--event-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="events appear in the event APIs this long after their send (a demonstration; default at once)",
    )
    p.add_argument(
        "--webhook-secret",
        default="",
        metavar="SECRET",
        help="the secret POST /_sandbox/webhook checks each delivery's signature with",
    )
    for spec, entry in served:
        entry.options(p.add_argument_group(f"{spec.label} routes ({entry.prefix or '/'})"))
    p.set_defaults(func=cmd_sandbox, config=None)
