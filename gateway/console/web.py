"""The console's HTTP side (aiohttp.web) under /console/ on the operator endpoint: sign-in and sessions, CSRF on
every form, security headers, the audit log of every admin action, and each page's route.

Sessions are signed cookies (gateway/console/sessions.py): HttpOnly, SameSite=Strict, Secure (and named
`__Host-...`) when the endpoint serves TLS; they end after `idle_timeout` without a request, `session_lifetime`
after sign-in, at sign-out, when the admin's password hash changes or the admin is removed. A sign-out is
recorded in the queue's store (the session id until its lifetime ends): every instance sharing the key and the
queue refuses the cookie from then on, after a restart too; each request's session is checked there (one
primary-key read), and while the store cannot answer the console refuses every page (503: fail closed).
Without a configured `session_secret` the key is random per start. Every POST carries the session's CSRF
token in a hidden field; a missing or wrong one gets 403 and a log line.
"""

from __future__ import annotations

import contextvars
import os
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import jinja2
import structlog
from aiohttp import web

from gateway.config import Settings
from gateway.config.console import ConsoleAdmin, ConsoleSettings
from gateway.console import configpage, logins, messages, overview, queuepage, suppressionpage, testsend
from gateway.console.runtime import Gateway
from gateway.console.sessions import Session, SessionKeys, ended, new_session
from gateway.console.signin import AdminSignIn
from gateway.core.errors import SpoolUnavailable
from gateway.delivery.admin import BadSelection
from gateway.ledger.model import iso
from gateway.ledger.store import LedgerUnavailable
from gateway.limits.clients import LogSampler, ScopedLedger
from gateway.ops.metrics import (
    CONSOLE_ACTION_MESSAGES,
    CONSOLE_ACTIONS,
    CONSOLE_CSRF_REFUSED,
    CONSOLE_ERRORS,
    CONSOLE_LOGINS,
)

log = structlog.get_logger("gateway.console")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ROOT = "/console/"
HERE = Path(__file__).parent
STATIC = {"console.css": "text/css", "console.js": "text/javascript", "favicon.svg": "image/svg+xml"}
NOT_ENABLED = (
    "The console is not enabled: set [console] enabled = true with at least one [[console.admins]] (name, and "
    "password_hash made by `smtp-gateway hash-password`), then reload (SIGHUP). See docs/console.md."
)
# The pages in the navigation, in order. A new page is a module giving its context, a template, its routes in
# `Console.install` and its entry here.
NAV = (
    ("/console/", "Overview"),
    ("/console/messages", "Messages"),
    ("/console/queue", "Queue"),
    ("/console/logins", "Logins"),
    ("/console/suppressions", "Suppressions"),
    ("/console/test-send", "Test send"),
    ("/console/configuration", "Configuration"),
)
# No inline script or style anywhere: the pages load /console/static/ files only.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# The session of the request being handled (each request runs in its own task, with its own context).
_SESSION: contextvars.ContextVar[Session | None] = contextvars.ContextVar("console_session", default=None)
# A session's cookie is sealed again (its idle clock reset) at most this often (or every idle_timeout / 2).
TOUCH_EVERY = 30.0
# The sign-in form's nonce cookie lives this long.
SIGNIN_FORM_TTL = 3600


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _when(at: float | None) -> str:
    return "-" if not at else iso(at)


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    for unit, step in (("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= step:
            return f"{size / step:.1f} {unit}"
    return f"{size} B"


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(ago=_ago, when=_when, size=_size, urlencode_dict=urllib.parse.urlencode)
    return env


def _safe_next(target: str | None) -> str:
    """Where to go after signing in: a console path on this site, never elsewhere. Never with a control
    character either: aiohttp refuses to send a Location holding one, after the handler returned (the
    connection dropped, no answer)."""
    if (
        target
        and target.startswith(ROOT)
        and not target.startswith("//")
        and "\\" not in target
        and not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in target)
    ):
        return target
    return ROOT


class Console:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        shared = ScopedLedger(gw.store, "console") if gw.store is not None else None
        self.signin = AdminSignIn(gw.settings.limits, shared)
        # A locked-out client's sign-ins cost no hash: one line a minute per address (as SMTP's auth_locked_out),
        # each one counted in smtp_gateway_console_logins_total{result="locked_out"}.
        self._lockout_lines = LogSampler()
        self._secret: str | None = None
        self.keys = self._keys(gw.settings.console)
        # Sessions known here to be signed out (a sign-out is never undone: kept until its lifetime ends). Only
        # this: a session the store said was not signed out is asked again at the next request (no window).
        self._revoked: dict[str, float] = {}  # session id -> when its lifetime ends anyway
        self._unchecked = False  # the store could not say whether sessions were signed out (logged once)
        self.env = environment()

    # -- configuration -------------------------------------------------------------------------------------

    def _keys(self, settings: ConsoleSettings) -> SessionKeys:
        secret = settings.session_secret.get_secret_value() if settings.session_secret else None
        if secret is None:
            key = os.urandom(32)
            if settings.enabled:
                log.warning(
                    "console_session_key_generated",
                    note="no console.session_secret: a random key for this process; sessions end at a restart "
                    "and are not valid in other processes",
                )
        else:
            key = secret.encode()
        self._secret = secret
        return SessionKeys(key)

    def configure(self, settings: Settings) -> None:
        """A reload: the admins and timeouts apply to the next request; a new (or removed) key ends every session."""
        wanted = settings.console.session_secret.get_secret_value() if settings.console.session_secret else None
        if wanted != self._secret:
            self.keys = self._keys(settings.console)
        elif wanted is None and settings.console.enabled and not self.settings.enabled:
            self.keys = self._keys(settings.console)  # enabled now: say that its key is this process's own
        self.signin.configure(settings.limits)

    @property
    def settings(self) -> ConsoleSettings:
        return self.gw.settings.console

    @property
    def tls(self) -> bool:
        return self.gw.settings.http.tls

    @property
    def cookie(self) -> str:
        # __Host-: the browser keeps it only from a secure origin, for the whole host, set without a Domain.
        return "__Host-smtp-gateway-console" if self.tls else "smtp-gateway-console"

    @property
    def signin_cookie(self) -> str:
        return "__Host-smtp-gateway-signin" if self.tls else "smtp-gateway-signin"

    # -- routes --------------------------------------------------------------------------------------------

    def install(self, app: web.Application) -> None:
        app.middlewares.append(self._middleware)
        add = app.router.add_route
        add("GET", "/", self._root)
        add("GET", "/console", self._root)
        add("GET", "/console/static/{name}", self._static)
        add("GET", "/console/signin", self._signin_form)
        add("POST", "/console/signin", self._signin)
        add("POST", "/console/signout", self._signout)
        add("GET", ROOT, self._overview)
        add("GET", "/console/messages", self._messages)
        add("GET", "/console/messages/{ident}", self._message)
        add("GET", "/console/queue", self._queue)
        add("POST", "/console/queue/confirm", self._queue_confirm)
        add("POST", "/console/queue/act", self._queue_act)
        add("GET", "/console/logins", self._logins)
        add("POST", "/console/logins/lift", self._lift)
        add("GET", "/console/suppressions", self._suppressions)
        add("POST", "/console/suppressions/remove", self._unsuppress)
        add("GET", "/console/test-send", self._test_form)
        add("POST", "/console/test-send", self._test_send)
        add("GET", "/console/configuration", self._configuration)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/" and not request.path.startswith("/console"):
            return await handler(request)
        try:
            response = await self._guarded(request, handler)
        except web.HTTPException as exc:
            exc.headers.update(SECURITY_HEADERS)
            exc.headers["Cache-Control"] = "no-store"
            raise
        except Exception:  # a bug in a page: the console's own answer, not aiohttp's bare 500
            response = self._failed(request)
        response.headers.update(SECURITY_HEADERS)
        if not request.path.startswith("/console/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    async def _guarded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.settings.enabled:
            return web.Response(status=404, text=NOT_ENABLED)
        path = request.path
        if path.startswith("/console/static/") or path in ("/", "/console", "/console/signin"):
            return await handler(request)
        now = time.time()
        try:
            session = await self._session(request, now)
        except SpoolUnavailable as exc:
            return self._sessions_unchecked(request, exc)
        if session is None:
            if request.method == "GET":
                # One query value: an unescaped `&` would end `next` at the first filter. The raw target, as
                # the client escaped it: path_qs is decoded, so an escaped `&` in a filter's value would split.
                target = urllib.parse.quote(request.raw_path, safe="/")
                return self._redirect(f"/console/signin?next={target}")
            return self._redirect("/console/signin")
        _SESSION.set(session)
        if request.method == "POST":
            form = await self._form(request)
            if form is None:
                return self._bad_form(request)
            token = form.get("csrf")
            if not self.keys.csrf_valid(session, token if isinstance(token, str) else None):
                return self._csrf_refused(request, session.admin)
        response = await handler(request)
        # Every TOUCH_EVERY, or every half idle_timeout when that is shorter: a session in use never goes idle.
        touch = min(TOUCH_EVERY, self.settings.idle_timeout / 2)
        if now - session.seen >= touch and not response.cookies.get(self.cookie):
            self._set_session(response, session.touched(now))
        return response

    async def _session(self, request: web.Request, now: float) -> Session | None:
        """The request's session, or None. Raises SpoolUnavailable when the store cannot say whether it was
        signed out (its other checks passed: a forged or ended cookie costs no read of the store)."""
        session = self.keys.open(request.cookies.get(self.cookie))
        if session is None or session.sid in self._revoked:
            return None
        admin = self._admin(session.admin)
        if admin is None or self.keys.fingerprint(admin.password_hash.get_secret_value()) != session.fingerprint:
            return None
        if ended(session, now, self.settings.idle_timeout, self.settings.session_lifetime) is not None:
            return None
        if await self._signed_out(session, now):
            return None
        return session

    async def _signed_out(self, session: Session, now: float) -> bool:
        """Whether the session was signed out on any instance on the queue (or on this one before a restart):
        asked of the store at every request, one primary-key read, so a sign-out anywhere refuses here at once."""
        store = self.gw.store
        if store is None:  # before the gateway's start: only this process's sign-outs
            return False
        revoked = await store.session_revoked(session.sid)
        if self._unchecked:
            self._unchecked = False
            # The store answers again: the console serves its pages again (after console_sessions_unchecked).
            log.info("console_sessions_checked")
        if revoked:
            self._remember_revoked(session, now)
        return revoked

    def _remember_revoked(self, session: Session, now: float) -> None:
        self._revoked = {sid: until for sid, until in self._revoked.items() if until > now}
        self._revoked[session.sid] = session.issued + self.settings.session_lifetime

    def _sessions_unchecked(self, request: web.Request, exc: SpoolUnavailable) -> web.Response:
        """Fail closed: a session the store cannot check may have been signed out on another instance."""
        if not self._unchecked:
            self._unchecked = True
            # Once an episode: every signed-in page is refused (503) until the store can say again whether its
            # session was signed out on another instance (fail closed).
            log.warning("console_sessions_unchecked", error=exc.reason, client=request.remote, path=request.path)
        response = self._page(
            request,
            "error.html",
            status=503,
            title="Unavailable",
            message="The console cannot check its sessions now: the queue's database, where sign-outs are "
            f"recorded, cannot be read ({exc.reason}). Try again later.",
        )
        response.headers["Retry-After"] = "10"
        return response

    def _admin(self, name: str) -> ConsoleAdmin | None:
        return next((a for a in self.settings.admins if a.name.lower() == name.lower()), None)

    def _set_session(self, response: web.StreamResponse, session: Session) -> None:
        response.set_cookie(
            self.cookie, self.keys.seal(session), path="/", httponly=True, secure=self.tls, samesite="Strict"
        )

    def _expire(self, response: web.StreamResponse, name: str) -> None:
        """Remove a cookie from the browser: with the attributes it was set with. aiohttp's del_cookie omits
        Secure, and a browser ignores every Set-Cookie for a `__Host-` name without it, the expiring one too."""
        response.set_cookie(
            name,
            "",
            path="/",
            httponly=True,
            secure=self.tls,
            samesite="Strict",
            max_age=0,
            expires="Thu, 01 Jan 1970 00:00:00 GMT",
        )

    async def _form(self, request: web.Request) -> Mapping[str, object] | None:
        """The POST's form, or None when its body is no form aiohttp can read (a broken multipart boundary, an
        unknown or not ASCII-compatible charset, bytes that are not of it): a client's error, not a bug.
        aiohttp caches it: a handler's own `request.post()` gets the same. A too large body stays a 413."""
        try:
            return await request.post()
        except (ValueError, LookupError) as exc:  # UnicodeDecodeError is a ValueError
            log.warning(
                "console_bad_form",
                client=request.remote,
                path=request.path,
                content_type=request.headers.get("Content-Type", "")[:100],
                error=type(exc).__name__,
            )
            return None

    def _bad_form(self, request: web.Request) -> web.Response:
        return self._page(
            request,
            "error.html",
            status=400,
            title="Bad request",
            message="This form could not be read: its body is not a form in a known encoding. Go back, reload "
            "the page and try again.",
        )

    def _redirect(self, location: str) -> web.Response:
        return web.Response(status=303, headers={"Location": location})

    def _csrf_refused(self, request: web.Request, who: str | None) -> web.Response:
        CONSOLE_CSRF_REFUSED.inc()
        log.warning("console_csrf_refused", admin=who, client=request.remote, path=request.path)
        return self._page(
            request,
            "error.html",
            status=403,
            title="Refused",
            message="This form was refused: its security token is missing or out of date. Go back, reload the "
            "page and try again.",
        )

    def _failed(self, request: web.Request) -> web.Response:
        """An unexpected error in a handler (called in its `except`): logged once with its traceback and
        counted here, so aiohttp logs nothing more; the admin gets the error page, with no traceback."""
        CONSOLE_ERRORS.inc()
        session = _SESSION.get()
        log.error(
            "console_error",
            admin=session.admin if session else None,
            client=request.remote,
            method=request.method,
            path=request.path,
            exc_info=True,
        )
        return self._page(
            request,
            "error.html",
            status=500,
            title="Error",
            message="This request failed on an unexpected error, described in the gateway's log (console_error). "
            "Look at the pages it concerns before trying again: it may have been done in part.",
        )

    # -- rendering -----------------------------------------------------------------------------------------

    def _page(self, request: web.Request, template: str, *, status: int = 200, **context: Any) -> web.Response:
        session = _SESSION.get()
        html = self.env.get_template(template).render(
            admin=session.admin if session else None,
            csrf=self.keys.csrf(session) if session else "",
            path=request.path,
            nav=NAV,
            hostname=self.gw.settings.hostname,
            **context,
        )
        return web.Response(status=status, text=html, content_type="text/html", charset="utf-8")

    def _audit(self, request: web.Request, action: str, count: int = 1, **fields: Any) -> None:
        """One line per admin action: who, what, how many, from where; counted."""
        session = _signed_in()
        log.info("console_action", admin=session.admin, action=action, count=count, client=request.remote, **fields)
        CONSOLE_ACTIONS.labels(action=action).inc()

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        body = (HERE / "static" / name).read_bytes()
        return web.Response(body=body, content_type=STATIC[name], headers={"Cache-Control": "max-age=3600"})

    async def _root(self, request: web.Request) -> web.StreamResponse:
        return self._redirect(ROOT)

    # -- sign-in -------------------------------------------------------------------------------------------

    async def _signin_form(self, request: web.Request, *, error: str = "", status: int = 200) -> web.Response:
        if not error:
            try:
                signed_in = await self._session(request, time.time()) is not None
            except SpoolUnavailable:
                signed_in = False  # cannot be told: the form (a page asked for next says why)
            if signed_in:
                return self._redirect(_safe_next(request.query.get("next")))
        nonce = secrets.token_urlsafe(16)
        response = self._page(
            request,
            "signin.html",
            status=status,
            title="Sign in",
            token=self.keys.signin_token(nonce),
            next=_safe_next(request.query.get("next")),
            error=error,
        )
        response.set_cookie(
            self.signin_cookie,
            nonce,
            path="/",
            httponly=True,
            secure=self.tls,
            samesite="Strict",
            max_age=SIGNIN_FORM_TTL,
        )
        return response

    async def _signin(self, request: web.Request) -> web.StreamResponse:
        client = request.remote or ""
        # A client locked out is refused before its body is read (a malformed one too).
        if (locked_for := await self.signin.locked_for(client)) > 0:
            return await self._locked_out(request, client, locked_for)
        form = await self._form(request)
        if form is None:
            return self._bad_form(request)
        name, password, token = (_field(form, k) for k in ("name", "password", "csrf"))
        if not self.keys.signin_valid(request.cookies.get(self.signin_cookie), token):
            return self._csrf_refused(request, None)
        verdict = await self.signin.check(self.settings.admins, name, password, client)
        if verdict.result == "locked_out":
            return await self._locked_out(request, client, verdict.retry_after)
        if verdict.result != "ok" or verdict.admin is None:
            CONSOLE_LOGINS.labels(result="invalid").inc()
            # A name is logged only when it is an admin's: a password typed into the name field is not.
            known = self._admin(name) is not None
            log.warning(
                "console_signin_failed", client=client, **({"admin": name} if known else {"admin_known": False})
            )
            return await self._signin_form(request, error="Wrong name or password.", status=401)
        admin = verdict.admin
        CONSOLE_LOGINS.labels(result="ok").inc()
        log.info("console_signin", admin=admin.name, client=client)
        session = new_session(admin.name, self.keys.fingerprint(admin.password_hash.get_secret_value()), time.time())
        response = self._redirect(_safe_next(_field(form, "next")))
        self._set_session(response, session)
        self._expire(response, self.signin_cookie)
        return response

    async def _locked_out(self, request: web.Request, client: str, retry_after: float) -> web.Response:
        CONSOLE_LOGINS.labels(result="locked_out").inc()
        suppressed = self._lockout_lines.allow(client)
        if suppressed is not None:
            log.warning(
                "console_signin_locked_out", client=client, retry_after=round(retry_after), suppressed=suppressed
            )
        response = await self._signin_form(
            request, error="Too many failed sign-ins from this address: try again later.", status=429
        )
        response.headers["Retry-After"] = str(max(1, round(retry_after)))
        return response

    async def _signout(self, request: web.Request) -> web.StreamResponse:
        session = _signed_in()
        self._remember_revoked(session, time.time())
        self._audit(request, "sign_out")
        until = session.issued + self.settings.session_lifetime
        try:
            if self.gw.store is not None:
                await self.gw.store.session_revoke(session.sid, until)
            response = self._redirect("/console/signin")
        except SpoolUnavailable as exc:
            # Signed out in this browser and this process only: the operator must know a copy of the cookie
            # still opens the console on another instance, or here after a restart, until it ends by itself.
            log.warning(
                "console_signout_not_shared",
                admin=session.admin,
                client=request.remote,
                error=exc.reason,
                usable_until=iso(until),
            )
            _SESSION.set(None)
            response = await self._signin_form(
                request,
                error="Signed out in this browser, but the sign-out could not be recorded in the queue's database "
                f"({exc.reason}): a copy of this session's cookie still opens the console on another instance, or "
                f"on this one after a restart, until it has gone unused for {round(self.settings.idle_timeout)} s "
                f"(idle_timeout) or until {iso(until)} (its lifetime).",
            )
        self._expire(response, self.cookie)
        return response

    # -- pages ---------------------------------------------------------------------------------------------

    async def _overview(self, request: web.Request) -> web.StreamResponse:
        return self._page(request, "overview.html", title="Overview", **await overview.page(self.gw))

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        context = await messages.search(self.gw, request.query)
        return self._page(request, "messages.html", title="Messages", **context)

    async def _message(self, request: web.Request) -> web.StreamResponse:
        context = await messages.one(self.gw, request.match_info["ident"].strip())
        status = 200 if context["record"] is not None or context["records"] else 404
        return self._page(request, "message.html", status=status, title="Message", **context)

    async def _queue(self, request: web.Request) -> web.StreamResponse:
        context = await queuepage.listing(self.gw, request.query)
        return self._page(request, "queue.html", title="Queue", **context)

    async def _queue_confirm(self, request: web.Request) -> web.StreamResponse:
        return await self._queue_form(request, confirmed=False)

    async def _queue_act(self, request: web.Request) -> web.StreamResponse:
        return await self._queue_form(request, confirmed=True)

    async def _queue_form(self, request: web.Request, *, confirmed: bool) -> web.StreamResponse:
        """The confirmation (the count, and what it is), then the action. "Every one matching" posts its
        filters, not thousands of ids, and is resolved again at the action: if the messages it selects are
        no longer those confirmed, the admin is asked again with the new count, and nothing is done."""
        form = await request.post()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if self.gw.store is None:
            return self._page(request, "error.html", status=503, title="Queue", message="the queue is not open")
        try:
            action = queuepage.action(_field(form, "action"))
            ids, what = await queuepage.chosen_ids(self.gw, fields, [str(v) for v in form.getall("id", [])], action)
        except BadSelection as exc:
            return self._page(request, "error.html", status=400, title="Queue", message=str(exc))
        except (SpoolUnavailable, LedgerUnavailable) as exc:
            return self._unavailable(request, exc)
        back = {k: fields[k] for k in queuepage.FILTERS if fields.get(k)}
        every = fields.get("scope") == "all"
        selected = queuepage.digest(ids)
        if not confirmed or (every and fields.get("selected") != selected):
            return self._page(
                request,
                "confirm.html",
                title="Confirm",
                action=action,
                verb=queuepage.VERBS[action],
                ids=ids,
                what=what,
                back=back,
                every=every,
                selected=selected,
                changed=confirmed,
            )
        session = _signed_in()
        try:
            results = await queuepage.act(self.gw, f"{session.admin} (console)", action, ids)
        except SpoolUnavailable as exc:
            return self._unavailable(request, exc)
        self._audit(
            request,
            action,
            count=len(results.done),
            asked=len(ids),
            skipped=len(results.skipped),
            ids=results.done[:20],
        )
        CONSOLE_ACTION_MESSAGES.labels(action=action).inc(len(results.done))
        return self._page(request, "acted.html", title="Done", results=results, verb=queuepage.VERBS[action], back=back)

    async def _logins(self, request: web.Request) -> web.StreamResponse:
        return self._page(request, "logins.html", title="Logins", **await logins.page(self.gw))

    async def _lift(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        scope, client = _field(form, "scope"), _field(form, "client")
        lifted = await self.gw.lockouts.lift(scope, client)
        self._audit(request, "lift_lockout", count=int(lifted), scope=scope, lifted_client=client)
        return self._redirect("/console/logins")

    async def _suppressions(self, request: web.Request) -> web.StreamResponse:
        query: Mapping[str, str] = request.query
        # The outcome of a removal is shown only from the redirect this session's own POST made: a link cannot
        # make the console say its words ("removed", an address, a count) as an outcome.
        outcome = suppressionpage.outcome_text(query)
        if outcome is not None and not self.keys.outcome_valid(_signed_in(), outcome, query.get("tag")):
            query = {k: v for k, v in query.items() if k not in suppressionpage.OUTCOME}
        context = await suppressionpage.page(self.gw, query)
        return self._page(request, "suppressions.html", title="Suppressions", **context)

    async def _unsuppress(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        address, account = _field(form, "address").strip(), _field(form, "account").strip()
        if "@" not in address:
            return self._page(request, "error.html", status=400, title="Suppressions", message="No address given.")
        try:
            removed = await suppressionpage.remove(self.gw, address, account or None)
        except LedgerUnavailable as exc:
            return self._unavailable(request, exc)
        self._audit(request, "unsuppress", count=removed, address=address, account=account or None)
        back = {"account": account, "removed": address, "n": str(removed)}
        back["tag"] = self.keys.outcome(_signed_in(), suppressionpage.outcome_text(back) or "")
        return self._redirect("/console/suppressions?" + urllib.parse.urlencode(back))

    def _unavailable(self, request: web.Request, exc: SpoolUnavailable | LedgerUnavailable) -> web.Response:
        return self._page(
            request, "error.html", status=503, title="Unavailable", message=f"cannot be read now: {exc.reason}"
        )

    # -- test send -----------------------------------------------------------------------------------------

    def _test_context(self, form: Mapping[str, str]) -> dict[str, Any]:
        settings = self.gw.settings
        users = testsend.users(settings)
        listeners = testsend.listeners(settings)
        defaults = {
            f"{account}/{user.username}": testsend.default_sender(settings, account, user) for account, user in users
        }
        login = form.get("login") or (next(iter(defaults)) if defaults else "")
        return {
            "users": users,
            "listeners": listeners,
            "defaults": defaults,
            "form": {
                "login": login,
                "listener": form.get("listener") or (listeners[0].name if listeners else ""),
                "sender": form.get("sender") or defaults.get(login, ""),
                "recipient": form.get("recipient", ""),
                "subject": form.get("subject") or "smtp-gateway console test",
                "body": form.get("body") or "A test message sent from the smtp-gateway console.",
            },
        }

    async def _test_form(self, request: web.Request) -> web.StreamResponse:
        context = self._test_context(request.query)
        return self._page(request, "testsend.html", title="Test send", outcome=None, error="", **context)

    async def _test_send(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        fields = {k: v.strip() for k, v in form.items() if isinstance(v, str)}
        context = self._test_context(fields)
        chosen = context["form"]
        account, _, login = chosen["login"].partition("/")
        users = {f"{a}/{u.username}" for a, u in context["users"]}
        listener = next((lsn for lsn in context["listeners"] if lsn.name == chosen["listener"]), None)
        error = ""
        if chosen["login"] not in users:
            error = "Pick one of the configured logins."
        elif listener is None:
            error = "Pick one of the listeners."
        else:
            user = next(u for a, u in context["users"] if f"{a}/{u.username}" == chosen["login"])
            error = testsend.login_error(chosen["login"], user, time.time()) or (
                testsend.form_error(chosen["sender"], chosen["recipient"], chosen["subject"], chosen["body"]) or ""
            )
        if error or listener is None:
            return self._page(
                request, "testsend.html", status=400, title="Test send", outcome=None, error=error, **context
            )
        session = _signed_in()
        data = testsend.compose(
            chosen["sender"],
            chosen["recipient"],
            chosen["subject"],
            chosen["body"],
            session.admin,
            self.gw.settings.hostname,
        )
        password = self.gw.onetime.issue(login)
        outcome = await testsend.send(
            self.gw.settings, self.gw.ports, listener, login, password, chosen["sender"], chosen["recipient"], data
        )
        writer = self.gw.ledger_writer
        if outcome.accepted and writer is not None:
            try:
                await writer.flush()  # the message page right after shows the record
            except LedgerUnavailable as exc:
                log.warning("console_ledger_flush_failed", error=exc.reason)
        self._audit(
            request,
            "test_send",
            account=account,
            login=login,
            listener=listener.name,
            recipient=chosen["recipient"],
            reply=outcome.reply or outcome.error,
        )
        return self._page(request, "testsend.html", title="Test send", outcome=outcome, error="", **context)

    async def _configuration(self, request: web.Request) -> web.StreamResponse:
        return self._page(request, "configuration.html", title="Configuration", **configpage.page(self.gw))


def _field(form: Mapping[str, Any], name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _signed_in() -> Session:
    """The session of the request being handled (the middleware let it through only with one)."""
    session = _SESSION.get()
    assert session is not None
    return session
