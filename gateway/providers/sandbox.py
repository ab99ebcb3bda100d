"""The sandbox upstream for quick starts, tests and outage rehearsals: real HTTP, every provider's paths.

The providers' routes live in their packages (gateway/providers/*/sandbox.py, mounted as their registry
entries say); this module holds what they share: the request record and the faults.

    POST /_sandbox/faults   {"status": 500, "count": 3}          next 3 requests answer 500
                            {"status": 429, "probability": 0.3}  30% of requests answer 429, until cleared
                            {"delay": 2.0, "count": 1}           next request answers after 2 s
                            {"mode": "timeout", "count": 1}      next request never answers
                            {"mode": "hold", "count": 1}         next request waits for DELETE
                                                                 /_sandbox/faults, then is answered
                            {"mode": "reset", "count": 1}        next request's connection is dropped
                            {"mode": "err", "reason": "..."}     next request: HTTP 200 with an error body
                            any of them with "kind": "send"      only for that kind of request
                                                                 (send, lookup, login, froms)
                            ... and/or "provider": "dengage"     only for that provider's requests
    GET  /_sandbox/faults                                         the faults still to come (a count-1 fault
                                                                  gone: its request has arrived)
    DELETE /_sandbox/faults                                       clear all faults, release held requests
    GET  /_sandbox/requests                                       the last KEPT_REQUESTS requests recorded,
                                                                  faulted ones too (`at`: when it arrived,
                                                                  epoch seconds)
    DELETE /_sandbox/requests                                     forget them
    POST /_sandbox/shape    {"shape": "alt"}                      answer in the other documented shapes
    GET  /_sandbox/shape                                          the shape answered now
    POST /_sandbox/fate     {"address": A, "fate": "bounce-hard"}   what becomes of A (gateway/providers/fates.py)
                            {"delay": 5}                          events appear 5 s after their send
    GET  /_sandbox/fate                                           the fates set, the delay, DMDS' invalid list
    POST /_sandbox/webhook                                        a webhook receiver: each delivery recorded
                                                                  (kind "webhook") with whether its signature
                                                                  verifies under the sandbox's webhook secret

Answer shapes: the vendors document several of their answers only in part (screenshots, one example), and
the gateway reads each field from a table of candidate names. "seed" answers with the names the seed
document shows (DMDS `camp_apikey`, dEngage `{code, data: [...]}`), "alt" with the other spellings the
documents and public clients use (DMDS `apikey`, a bare list, dEngage camelCase keys), so that the tests
run the gateway against both (`smtp-gateway sandbox --shape`, or SMTP_GATEWAY_SANDBOX_SHAPE).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import os
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TextIO

import orjson
from aiohttp import web
from email_validator import EmailNotValidError, validate_email

from gateway.config import ConfigError
from gateway.core import signature
from gateway.ops.signals import StopSignals
from gateway.providers.fates import FateError, Fates

# The request record is bounded: the quick start's own event polls add a request a second for as long as it
# runs. In memory (GET /_sandbox/requests) the newest KEPT_REQUESTS; on disk (--record FILE) the file is
# moved to FILE.1 (replacing the one before) once it passes RECORD_MAX_BYTES, so at most twice that is kept.
KEPT_REQUESTS = 10_000
RECORD_MAX_BYTES = 10 * 1024 * 1024
# What a poll's printed line is compared by: not when it came or the time window it asked about.
POLL_VOLATILE = frozenset({"at", "body", "query"})

Redactor = Callable[[dict[str, Any]], dict[str, Any]]
ErrorBody = Callable[[str, int], web.Response]
Shape = Literal["seed", "alt"]
SHAPES: tuple[Shape, ...] = ("seed", "alt")
# The shape `smtp-gateway sandbox` and the tests' sandbox answer with when none is given.
SHAPE_ENV = "SMTP_GATEWAY_SANDBOX_SHAPE"


def default_shape() -> Shape:
    """The shape named by SMTP_GATEWAY_SANDBOX_SHAPE, else "seed"."""
    value = os.environ.get(SHAPE_ENV, "seed").strip().lower() or "seed"
    if value not in SHAPES:
        raise ConfigError(f"{SHAPE_ENV}={value!r}: expected one of {', '.join(SHAPES)}")
    return value


@lru_cache(maxsize=4096)
def email_error(value: str) -> str | None:
    """email-validator's objection to an address ("invalid email ..."), or None. Cached: the benchmark
    sends the same addresses thousands of times and the sandbox should answer "at once"."""
    try:
        validate_email(value, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        return f"invalid email {exc}"
    return None


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


@dataclass
class Fault:
    status: int | None = None
    mode: str | None = None  # "timeout" | "hold" | "reset" | "err" | "page" (with a status: an HTML page)
    delay: float = 0.0
    count: int | None = 1  # None: until cleared
    probability: float = 1.0
    reason: str = "sandbox fault"
    kind: str | None = None  # None: any request
    provider: str | None = None  # None: any provider's


@dataclass
class SandboxState:
    latency: float = 0.0
    record_path: Path | None = None
    echo: TextIO | None = None
    requests: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=KEPT_REQUESTS))
    # Counts since the start or the last DELETE /_sandbox/requests (GET /_sandbox/health), not bounded by
    # the record: the benchmarks count more requests than it keeps.
    totals: dict[str, int] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    # Set (and replaced) by DELETE /_sandbox/faults: the requests a "hold" fault keeps go on then. A test can
    # keep a call in flight for as long as it needs and end it when it chooses, not after a timeout.
    released: asyncio.Event = field(default_factory=asyncio.Event)
    # campania_apikey lookups (numid per request), also recorded in `requests` with kind "lookup".
    lookups: deque[int | str] = field(default_factory=lambda: deque(maxlen=100_000))
    rng: random.Random = field(default_factory=lambda: random.Random(1234))
    shape: Shape = field(default_factory=default_shape)  # which documented spelling answers use
    fates: Fates = field(default_factory=Fates)  # what becomes of each recipient, and the events reported
    webhook_secret: str = ""  # the secret POST /_sandbox/webhook checks signatures with

    def next_fault(self, kind: str, provider: str | None = None) -> Fault | None:
        for fault in list(self.faults):
            if fault.kind is not None and fault.kind != kind:
                continue
            if fault.provider is not None and fault.provider != provider:
                continue
            if fault.probability < 1.0 and self.rng.random() >= fault.probability:
                continue
            if fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    self.faults.remove(fault)
            return fault
        return None


def _append_capped(path: Path, line: str) -> None:
    """Append `line` to the record file, moving it to `<path>.1` first once it has RECORD_MAX_BYTES."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size >= RECORD_MAX_BYTES:
            path.replace(path.with_name(path.name + ".1"))
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line)


class Sandbox:
    """The aiohttp application: shared routes here, each provider's routes installed by its package."""

    def __init__(self, state: SandboxState, providers: list[Callable[[Sandbox], None]]) -> None:
        """`providers`: each adds its routes (gateway/providers/*/sandbox.py `install`)."""
        self.state = state
        self.app = web.Application(client_max_size=128 * 1024 * 1024)
        self.redactors: list[Redactor] = []
        # (provider, kind) of the requests the gateway makes on a timer (event polls), added by the providers'
        # routes: printed only when their answer changes, so that the sends stay readable in a terminal.
        self.polls: set[tuple[str, str]] = set()
        self._last_poll: dict[tuple[str, str], str] = {}
        self.app.router.add_get("/_sandbox/requests", self.list_requests)
        self.app.router.add_delete("/_sandbox/requests", self.clear_requests)
        self.app.router.add_post("/_sandbox/faults", self.add_fault)
        self.app.router.add_get("/_sandbox/faults", self.list_faults)
        self.app.router.add_delete("/_sandbox/faults", self.clear_faults)
        self.app.router.add_get("/_sandbox/health", self.health)
        self.app.router.add_post("/_sandbox/shape", self.set_shape)
        self.app.router.add_get("/_sandbox/shape", self.get_shape)
        self.app.router.add_post("/_sandbox/fate", self.set_fate)
        self.app.router.add_get("/_sandbox/fate", self.get_fate)
        self.app.router.add_post("/_sandbox/webhook", self.webhook)
        for install in providers:
            install(self)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- what provider routes use ----------------------------------------------------------------------

    def record(self, entry: dict[str, Any]) -> None:
        state = self.state
        state.requests.append(entry)
        totals = state.totals
        totals["requests"] = totals.get("requests", 0) + 1
        if entry["kind"] == "send":
            totals["sends"] = totals.get("sends", 0) + 1
        if entry.get("status") == 429:
            totals["status_429"] = totals.get("status_429", 0) + 1
        if state.record_path is not None or state.echo is not None:
            shown = dict(entry)
            if isinstance(shown.get("body"), dict):
                for redact in self.redactors:
                    shown["body"] = redact(shown["body"])
            line = json.dumps(shown, ensure_ascii=False)
            if state.record_path is not None:
                _append_capped(state.record_path, line + "\n")
            if state.echo is not None and not self._repeated_poll(shown):
                state.echo.write(line + "\n")
                state.echo.flush()

    def _repeated_poll(self, shown: dict[str, Any]) -> bool:
        """Whether `shown` is a poll answered as the last one of its kind was (nothing new to print)."""
        key = (str(shown.get("provider")), str(shown["kind"]))
        if key not in self.polls:
            return False
        outcome = json.dumps({k: v for k, v in shown.items() if k not in POLL_VOLATILE}, sort_keys=True)
        if self._last_poll.get(key) == outcome:
            return True
        self._last_poll[key] = outcome
        return False

    def answer(
        self, entry: dict[str, Any], response: web.Response, *, error: str | None = None, response_body: Any = None
    ) -> web.Response:
        """Record the request with its answer, and return the answer."""
        entry["status"] = response.status
        if error is not None:
            entry["error"] = error
        elif response_body is not None:
            entry["response"] = response_body
        elif response.body is not None and response.content_type == "application/json":
            entry["response"] = orjson.loads(response.body)  # type: ignore[arg-type]
        self.record(entry)
        return response

    async def apply_fault(self, request: web.Request, entry: dict[str, Any], error: ErrorBody) -> web.Response | None:
        """Latency, then the next fault for this kind of request, if any (recorded like any request). The
        entry notes when the request arrived (`at`, epoch seconds): rate limits are checked against it."""
        entry["at"] = round(time.time(), 4)
        state = self.state
        fault = state.next_fault(entry["kind"], entry.get("provider"))
        if state.latency:
            await asyncio.sleep(state.latency)
        if fault is None:
            return None
        entry["fault"] = fault.mode or fault.status or "delay"
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.mode == "timeout":
            entry["status"] = None
            self.record(entry)
            await asyncio.sleep(3600)
        if fault.mode == "hold":
            await state.released.wait()  # until DELETE /_sandbox/faults: then answered as without a fault
        if fault.mode == "reset":
            entry["status"] = None
            self.record(entry)
            if request.transport is not None:
                request.transport.abort()
            raise web.HTTPInternalServerError()
        if fault.status is not None and fault.mode == "page":
            # Not the vendor's own answer (a proxy's or a crashed server's page): says nothing of the call.
            page = f"<html><body><h1>{fault.status} {html.escape(fault.reason)}</h1></body></html>"
            return self.answer(entry, web.Response(status=fault.status, text=page, content_type="text/html"))
        if fault.status is not None:
            return self.answer(entry, error(fault.reason, fault.status), error=fault.reason)
        if fault.mode == "err":
            return self.answer(entry, error(fault.reason, 200), error=fault.reason)
        entry.pop("fault")  # a pure delay: the request goes on normally
        return None

    # -- shared routes ---------------------------------------------------------------------------------

    async def list_requests(self, request: web.Request) -> web.Response:
        return json_response(list(self.state.requests))

    async def clear_requests(self, request: web.Request) -> web.Response:
        self.state.requests.clear()
        self.state.totals.clear()
        return json_response({"status": "ok"})

    async def add_fault(self, request: web.Request) -> web.Response:
        spec = await request.json()
        fault = Fault(
            status=spec.get("status"),
            mode=spec.get("mode"),
            delay=float(spec.get("delay", 0.0)),
            count=spec.get("count", None if "probability" in spec else 1),
            probability=float(spec.get("probability", 1.0)),
            reason=str(spec.get("reason", "sandbox fault")),
            kind=spec.get("kind"),
            provider=spec.get("provider"),
        )
        self.state.faults.append(fault)
        return json_response({"status": "ok", "faults": len(self.state.faults)})

    async def list_faults(self, request: web.Request) -> web.Response:
        return json_response({"faults": [asdict(fault) for fault in self.state.faults]})

    async def clear_faults(self, request: web.Request) -> web.Response:
        self.state.faults.clear()
        self.state.released.set()
        self.state.released = asyncio.Event()  # for the next "hold" fault
        return json_response({"status": "ok"})

    async def set_shape(self, request: web.Request) -> web.Response:
        shape = (await request.json()).get("shape")
        if shape not in SHAPES:
            return json_response({"status": "err", "on": f"shape must be one of {', '.join(SHAPES)}"}, 400)
        self.state.shape = shape
        return json_response({"shape": shape})

    async def get_shape(self, request: web.Request) -> web.Response:
        return json_response({"shape": self.state.shape})

    async def set_fate(self, request: web.Request) -> web.Response:
        try:
            spec = await request.json()
            if not isinstance(spec, dict):
                raise FateError("a JSON object")
            self.state.fates.choose(spec)
        except (ValueError, FateError) as exc:
            return json_response({"status": "err", "on": str(exc)}, 400)
        return json_response(self.state.fates.settings())

    async def get_fate(self, request: web.Request) -> web.Response:
        return json_response(self.state.fates.settings())

    async def webhook(self, request: web.Request) -> web.Response:
        body = await request.read()
        value = request.headers.get(signature.HEADER, "")
        try:
            event = orjson.loads(body)
        except ValueError:
            event = None
        verified = bool(self.state.webhook_secret) and signature.valid(self.state.webhook_secret.encode(), value, body)
        entry = {"kind": "webhook", "path": request.path, "event": event, "signature": value, "verified": verified}
        return self.answer(entry, json_response({"received": True}))

    async def health(self, request: web.Request) -> web.Response:
        totals = self.state.totals
        counts = {name: totals.get(name, 0) for name in ("requests", "sends", "status_429")}
        return json_response({"status": "ok", **counts})

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        # Requests stuck in a "timeout" fault must not hold the sandbox's stop for aiohttp's default 60 s.
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()


async def run_forever(sandbox: Sandbox, host: str, port: int, describe: Callable[[str], str]) -> signal.Signals:
    """Serve until SIGTERM or SIGINT (handled even when the process was started with SIGINT ignored, as a
    script's `smtp-gateway sandbox &` is); once listening, say what is served at the URL (`describe(url)`).
    Returns the signal."""
    stop = StopSignals()
    stop.install()
    bound = await sandbox.start(host, port)
    print(f"sandbox: {describe(f'http://{host}:{bound}')}", file=sys.stderr, flush=True)
    try:
        return await stop.wait()
    finally:
        await sandbox.stop()
