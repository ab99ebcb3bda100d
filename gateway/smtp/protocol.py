"""aiosmtpd's SMTP protocol, adjusted: enhanced status codes on every reply, a fast DATA reader, our AUTH
prompts and rules (any case, after HELO too, long lines), our TLS handshakes for STARTTLS; and the session's
own limits (idle and DATA deadlines, commands before DATA), its refusals counted and logged, its log lines
tagged with a session id, one summary line per DATA."""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import functools
import logging
import random
import re
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FunctionType
from typing import Any, AnyStr, cast

import aiosmtpd.smtp
import structlog
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, syntax

from gateway.core import replies
from gateway.core.model import Principal, Receipt
from gateway.core.replies import Reply, add_enhanced_code
from gateway.core.spill import SpillFile, SpillMap
from gateway.limits.budget import ByteBudget, Reservation
from gateway.ops.metrics import (
    INTERNAL_ERRORS,
    LIMIT_HITS,
    MESSAGES,
    REFUSALS,
    SESSIONS_TLS,
    SPILL_FAILURES,
    SPILLED,
    TLS_CLOSED_BEFORE_REPLY,
)
from gateway.smtp.fastinit import MethodTables, init_session
from gateway.smtp.handshake import ListenerTls, TlsHandshake
from gateway.smtp.peers import balancer_text, peer_text

log = structlog.get_logger("gateway.smtp")
# smtp_gateway_messages_total's series, by the first digit of the reply to a message's data.
_MESSAGES_BY_CLASS = {cls: MESSAGES.labels(result=f"{cls}xx") for cls in "245"}

# Replies that never carry an enhanced code (RFC 2034 §3: not the greeting, not EHLO/HELO lines) and
# intermediate replies whose text is protocol data (334 challenges, 354).
_LEAVE_ALONE = ("220", "334", "354")
_CHUNK = 64 * 1024
# The common "<local@domain> PARAMS" form; anything else (quoted local parts, comments, source routes)
# goes to aiosmtpd's full RFC 5322 parser, which is slow (it defines a class on every call).
_SIMPLE_PATH = re.compile(r"\s*<([^<>\s\"\\()@,;:\[\]]+@[^<>\s\"\\()@,;:]+)>(.*)\Z", re.DOTALL)
_END = b"\r\n.\r\n"
# A timer may run this much before its time (uvloop's timers count whole milliseconds).
_TIMER_SLACK = 0.001
# Once spilling, DATA goes to the file in writes of at least this size. The buffer's last bytes wait for
# the next read: a terminator may begin in them (a terminator is searched for from its first byte on).
_SPILL_WRITE = 256 * 1024
_SPILL_TAIL = len(_END) - 1
# RFC 4954 §4: an AUTH command line (with its initial response) and each line answering a 334 challenge may
# be 12288 octets long; aiosmtpd's default of 512 (and 1001 for any line it reads) refuses a long password.
AUTH_LINE_LIMIT = 12288
# RFC 5321 §4.5.3.1.4: a command line's 512 octets (aiosmtpd's default for every command but AUTH).
_COMMAND_LINE_LIMIT = 512
# aiosmtpd's reply to a line that is no command quotes the (upper-cased) first word back to the client. A
# client whose AUTH was refused goes on with its base64 username and password lines: never echo those.
_UNKNOWN_COMMAND = re.compile(r'500 Error: command ".*" not recognized\Z', re.DOTALL)
# aiosmtpd echoes parts of a command in some replies ('500 Error: command "X" not recognized'): a control
# character there would break the reply line, a lone surrogate (8-bit input) would fail to encode.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
# aiosmtpd's "553 5.1.3 Error: malformed address" already has an enhanced code, so add_enhanced_code
# leaves its "Error:" prefix (an internal word the client does not need) in place.
_ERROR_PREFIX = re.compile(r"^(\d{3}[ -](?:[245]\.\d{1,3}\.\d{1,3} )?)Error: ")
# Commands that move a transaction forward when accepted; every other command (and a refused MAIL/RCPT)
# counts towards limits.max_commands_before_data.
_TRANSACTION = frozenset({"MAIL", "RCPT", "DATA", "QUIT"})
# The commands RFC 2920 lets a client follow without waiting for their replies (not EHLO, DATA, QUIT, ...).
_GROUPABLE = frozenset({"MAIL", "RCPT", "RSET"})
# How often one session may send these commands (aiosmtpd's command_call_limit, done here so the counts can
# restart): MAIL, RCPT, DATA, RSET and QUIT are unlimited for persistent sessions. The counts restart after
# each accepted message, as Postfix's smtpd_junk_command_limit does: a connection pool that checks its
# connection with NOOP before every message is not cut off at its 101st (docs/limits.md).
COMMAND_LIMITS: dict[str, int] = {
    "NOOP": 100,
    "HELP": 20,
    "VRFY": 20,
    "EXPN": 5,
    "AUTH": 10,
    "STARTTLS": 2,
    "EHLO": 20,
    "HELO": 20,
}
# Security limits: counted for the whole connection, a message does not restart them.
PER_CONNECTION = frozenset({"AUTH", "STARTTLS"})
# Unrecognised commands: the one that reaches this count ends the session (aiosmtpd's BOGUS_LIMIT, which it
# counts per connection in a local variable; here it restarts after each accepted message too).
UNKNOWN_LIMIT = 5
# The attributes aiosmtpd's HELP reads from a command method (set by @syntax).
_SYNTAX_ATTRS = ("__smtp_syntax__", "__smtp_syntax_extended__", "__smtp_syntax_when__")


# aiosmtpd's reply to any command line over its limit (or over the reader's): no enhanced code, no command.
_LINE_TOO_LONG = "500 Command line too long"
# aiosmtpd's replies to lines it answers itself before any command lookup: an empty line or a command name
# that is not ASCII, an argument that is not ASCII (SMTPUTF8 off), a line over its limit. Each is counted as
# an unrecognised command (GatewaySMTP._junk_line), as Postfix's smtpd_junk_command_limit counts them.
_JUNK_LINE_REPLIES = frozenset({"500 Error: bad syntax", "500 Error: strict ASCII mode", _LINE_TOO_LONG})


class ClientDone(ConnectionResetError):
    """The reader is at its end (the client half-closed its side) and every whole line it sent has been read:
    the session ends. A ConnectionResetError, which aiosmtpd's command loop ends the session on."""


class CommandReader(asyncio.StreamReader):
    """The session's reader, remembering how the last command line began: aiosmtpd answers every over-long
    line with one generic 500 (it reads past the line without looking at it), and RFC 4954 §4 wants 500 5.5.6
    for an over-long AUTH line (with its initial response). Only the first 5 bytes are kept."""

    head = b""
    _overrun = False  # reading past the rest of a line longer than the reader's limit
    # The session is being closed (GatewaySMTP._closing): set by the session.
    closing: Callable[[], bool] | None = None

    async def readuntil(self, separator: Any = b"\n") -> bytes:  # typeshed's type is private
        self._stop_if_closing()
        try:
            line = await super().readuntil(separator)
        except asyncio.IncompleteReadError as exc:
            # The client half-closed (GatewaySMTP.eof_received) and every line it sent has been handled; an
            # unterminated rest is no command. aiosmtpd's command loop ends the session on this error as on a
            # reset: it closes the transport, which first writes the replies still buffered.
            raise ClientDone("the client sent no more commands") from exc
        except asyncio.LimitOverrunError:
            if not self._overrun:  # the line's first piece: the command is at the buffer's start
                self.head = bytes(self._buffer[:5]).upper()  # type: ignore[attr-defined]
                self._overrun = True
            raise
        if self._overrun:
            self._overrun = False  # the over-long line's last piece: its head is kept
        else:
            self.head = line[:5].upper()
        self._stop_if_closing()
        return line

    def _stop_if_closing(self) -> None:
        """A session being closed (a limit's 421, QUIT, a timeout, the drain) reads no more command lines: the
        lines a pipelining client sent behind the one that ended it are neither handled nor answered, so they
        cannot hit a limit (and log and count it) a second time. aiosmtpd's command loop ends the session on
        this error as on a reset."""
        if self.closing is not None and self.closing():
            raise ClientDone("the session is being closed")

    async def readline(self) -> bytes:
        # asyncio's readline drops an over-long line's start itself (ValueError): the next line is new.
        try:
            return await super().readline()
        finally:
            self._overrun = False

    @property
    def long_line_was_auth(self) -> bool:
        return self.head == b"AUTH "  # aiosmtpd splits the command from its argument at a space


class _Commands(dict[str, Any]):
    """A session's command table: aiosmtpd looks each command up with get(); a command it does not have gets
    the session's own handler (aiosmtpd counts unknown commands itself, per connection, unresettable). HELP
    also looks up with get(): the handler has no syntax, so HELP still answers 501 for an unknown name."""

    __slots__ = ("unknown",)

    def __init__(self, table: dict[str, Any], unknown: Callable[[str, str | None], Any]) -> None:
        super().__init__(table)
        self.unknown = unknown

    def get(self, verb: str, default: Any = None) -> Any:
        found = dict.get(self, verb, default)
        return functools.partial(self.unknown, verb) if found is None else found


@dataclass(slots=True)
class Transaction:
    """One DATA, from 354 to the final reply: what its summary log line says."""

    started: float
    size: int = 0
    receipt: Receipt = field(default_factory=Receipt)


class GatewaySMTP(SMTP):
    # Many printers and scanners expect exactly these prompts (aiosmtpd's defaults differ).
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"
    # The StreamReader's line limit: must hold an AUTH line (and is the buffer's flow-control unit).
    line_length_limit = AUTH_LINE_LIMIT + 2

    def __init__(
        self,
        handler: Any,
        *,
        draining: asyncio.Event,
        on_close: Callable[[GatewaySMTP], None],
        tls: ListenerTls | None = None,
        implicit_tls: bool = False,
        listener: str = "",
        client_key: str = "",
        data_timeout: float = 600.0,
        max_commands_before_data: int = 100,
        budget: ByteBudget | None = None,
        spill_above: int = 0,
        spill_dir: str | None = None,
        call_limits: dict[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        cls = type(self)
        tables = _TABLES.get(cls) or _TABLES.setdefault(cls, MethodTables(cls, wrap=_counted))
        # SMTP.__init__, its method tables computed once per class and handler (gateway/smtp/fastinit.py).
        init_session(
            self,
            tables,
            handler,
            tls_context=tls.context if tls and not implicit_tls else None,
            reader=CommandReader,
            **kwargs,
        )
        self._smtp_methods = _Commands(self._smtp_methods, self._unknown_command)
        self._call_limits = call_limits if call_limits is not None else COMMAND_LIMITS
        self._calls: dict[str, int] = {}  # of the commands in _call_limits, since the last accepted message
        self._unknown = 0  # unrecognised commands since the last accepted message
        # Per session: aiosmtpd's own dict is a class attribute that every EHLO adds to.
        self.command_size_limits = collections.defaultdict(lambda: _COMMAND_LINE_LIMIT, AUTH=AUTH_LINE_LIMIT)
        self._in_ehlo = False
        # EHLO's lines up to its last: sent together with it, one write (one TLS record) instead of one each.
        self._ehlo_lines: list[str] = []
        # Replies to pipelined commands not sent yet: they go out with the next reply (push()).
        self._held: list[bytes] = []
        self._draining = draining
        self._on_close = on_close
        self._tls = tls
        self._implicit_tls = implicit_tls
        # True once the session is encrypted (implicit TLS, or after STARTTLS).
        self.tls_up = False
        self.in_data = False
        # Past the final "." until the reply about the message is written: the drain waits for it (a 421 here
        # would tell the client to resend a message that may go out).
        self.replying = False
        # Past the final "." until the delivery has answered: the idle timer holds off (_timeout_cb).
        self._delivering = False
        # The TLS handshake of the session (implicit TLS: before connection_made(); or STARTTLS's).
        self.handshake: TlsHandshake | None = None
        self.budget = budget
        # The large message being received holds this share of the budget until the pipeline takes it over.
        self.reservation: Reservation | None = None
        self._over_budget = False
        # DATA past this many bytes goes to an unlinked file in spill_dir (0: never; gateway/core/spill.py).
        self._spill_above = spill_above
        self._spill_dir = spill_dir
        self._spill_error: str | None = None  # why the last message's DATA could not go to its file
        # Carried by every log line of the session (structlog contextvars, bound in its task).
        # Only unique, not secret: no system call per connection (random reseeds itself in a forked child).
        self.session_id = f"{random.getrandbits(48):012x}"
        self.listener = listener
        self.client_key = client_key  # what per-IP limits count this client as (gateway.limits.clients.client_key)
        self.txn: Transaction | None = None
        self._data_timeout = data_timeout
        self._max_commands = max_commands_before_data
        self._commands = 0  # commands counted since the last message
        self._verb: str | None = None  # the command being handled
        # The command whose method raised, for handle_exception (aiosmtpd calls it once _verb is cleared).
        self._failed_verb: str | None = None
        self._logged = False  # the refusal about to be sent has its own log line already
        self._cut_off: str | None = None  # the limit that ended the session (command_timeout, data_timeout)
        self._last_code = 0  # of the last final reply sent
        # The idle timer (see _reset_timeout): when it is due, and whether a timer for it is armed.
        self._idle_deadline = 0.0
        self._idle_armed = False
        self._client_done = False  # the client half-closed: no more commands (eof_received)
        self._tls_close_counted = False  # in smtp_gateway_tls_closed_before_reply_total

    # -- connection ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        cast(CommandReader, self._reader).closing = self._closing  # the reader is made by connection_made
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and not self.tls_up:
            self.tls_up = True
            SESSIONS_TLS.labels(listener=self.listener, version=ssl_object.version() or "unknown").inc()
        if self._draining.is_set():
            # Accepted before the drain began, connected (or its TLS handshake done) after it closed the
            # sessions it knew: no greeting, the same 421 and hang-up.
            assert self._handler_coroutine is not None
            self._handler_coroutine.cancel()
            self.shut_down()

    def shut_down(self) -> None:
        """Drain: 421 and hang up gracefully (TLS: close_notify). A session in a TLS handshake (implicit or
        STARTTLS) is cut off without a line; one not connected yet is closed by connection_made()."""
        if self._in_handshake():
            assert self.handshake is not None
            self.handshake.abort()
            return
        if self.transport is None or self.transport.is_closing():
            return
        self.say_and_close(str(replies.SHUTTING_DOWN), logged=True)

    def abort(self) -> None:
        """Hard close, for a client that did not complete the graceful one in time (a TLS session: the TCP
        connection under it, see TlsHandshake.abort)."""
        if self.handshake is not None:
            self.handshake.abort()
        elif self.transport is not None:
            cast(asyncio.WriteTransport, self.transport).abort()

    def _closing(self) -> bool:
        """The session has been closed, or is being closed (its last replies may still be going out)."""
        return self.transport is None or self.transport.is_closing()

    def _in_handshake(self) -> bool:
        # tls_up: connection_made() of a successful handshake runs before the handshake's result is set.
        return self.handshake is not None and not self.handshake.result.done() and not self.tls_up

    def eof_received(self) -> bool | None:
        if self.tls_up or self.handshake is not None or self._implicit_tls:
            # TLS: asyncio's SSLProtocol calls this on the client's close_notify and on a bare TCP FIN, after
            # which it writes nothing more (it is shutting the TLS session down; returning True has no effect
            # there); uvloop's goes straight to connection_lost. The client is gone as far as the session can
            # tell. aiosmtpd cancels the session task (a delivery under way goes on); close now (aiosmtpd would
            # keep the socket half-open, and a task that had not started yet would never close it: CLOSE-WAIT
            # until the idle timeout).
            self._count_tls_close_before_reply()
            super().eof_received()
            return False
        # Plain TCP: a FIN says the client is done writing (shutdown(SHUT_WR) after its final dot or QUIT:
        # `nc -N`, scripted senders), not that it stopped reading. As Postfix does, the commands it sent are
        # handled (a DATA being delivered included) and answered; the reader's EOF then ends the command loop
        # (CommandReader.readuntil), which closes the connection. A client really gone resets it:
        # connection_lost() cancels the session task as before. aiosmtpd's eof_received is skipped: it
        # cancels the task, whose replies the client would never see (its resend: a duplicate).
        self._client_done = True
        asyncio.StreamReaderProtocol.eof_received(self)  # the reader's EOF
        return True  # half-open: the replies still go out

    def _count_tls_close_before_reply(self) -> None:
        """A TLS client that closed (FIN, close_notify or reset) with its message past the final dot: the message
        goes out, the 250 cannot (unlike plain TCP's half-close), and a client that resends on a missing
        reply sends a second copy: an at-least-once window of its own (docs/delivery.md), counted once."""
        if self.replying and self.tls_up and not self._tls_close_counted:
            self._tls_close_counted = True
            TLS_CLOSED_BEFORE_REPLY.labels(listener=self.listener).inc()

    def connection_lost(self, error: Exception | None) -> None:
        self._count_tls_close_before_reply()  # uvloop's SSLProtocol: no eof_received() first
        self._on_close(self)
        self._release()  # a client gone mid-DATA holds no budget
        super().connection_lost(error)
        # asyncio's StreamReaderProtocol keeps the error (a BrokenPipeError when the client left before our
        # greeting) in its _closed future and marks it seen only in its own __del__; when the garbage
        # collector frees both in one cycle the future may go first and the loop reports "Future exception
        # was never retrieved". Nobody waits on that future here: mark it seen now.
        closed = getattr(self, "_closed", None)
        if isinstance(closed, asyncio.Future) and closed.done() and not closed.cancelled():
            closed.exception()
        task = self._handler_coroutine
        if task is None or task.done():
            self._unlink()
        else:  # cancelled above: it ends at its next turn
            task.add_done_callback(lambda _: self._unlink())

    def _unlink(self) -> None:
        """Drop the session's references to its own bound methods once it is over (connection lost, command
        loop ended): its command tables, the reader's closing check and the connected callback each hold the
        session, so without this every session and what it holds (its transport, task, reader, writer, about
        50 objects) is a reference cycle that only the garbage collector frees: its passes took 3.6-3.7 % of
        the process's CPU with one message per connection, 2.0-2.8 % without these (docs/development/benchmarks.md).
        A session whose task was cancelled (a TLS client gone without QUIT) is still one: the task keeps its
        CancelledError, whose traceback holds the session."""
        self._smtp_methods = {}
        self._auth_methods = {}
        self._client_connected_cb = None
        # The writer holds the session (asyncio's StreamReaderProtocol drops its own copy, aiosmtpd's stays).
        self._writer = None  # type: ignore[assignment]  # nothing writes once the session is over
        # TLS: the handshake holds the SSL protocol, which holds the session as its application.
        self.handshake = None
        self._tls_protocol = None
        self._original_transport = None
        if isinstance(self._reader, CommandReader):
            self._reader.closing = None

    @property
    def command_size_limit(self) -> int:  # type: ignore[override]  # aiosmtpd's is a class attribute
        """The limit aiosmtpd applies to a command line of a session that did not send EHLO (an EHLO session
        gets per-command limits, set in __init__), read once the line is read. AUTH is accepted after HELO,
        so an AUTH line may be long there too; every other command keeps 512 octets, as after EHLO: a 12 KB
        MAIL path would reach aiosmtpd's address parser, which is quadratic on some shapes and recursive
        on nested comments (event-loop CPU for every session of the process)."""
        return AUTH_LINE_LIMIT if cast(CommandReader, self._reader).long_line_was_auth else _COMMAND_LINE_LIMIT

    @property
    def peer(self) -> str:
        peer = self.session.peer if self.session is not None else None
        return peer_text(peer)

    @property
    def proxy_peer(self) -> str | None:
        """Behind a load balancer (proxy_protocol), the one that relayed the session; else None."""
        return balancer_text(self.transport.get_extra_info("proxy_peer") if self.transport is not None else None)

    async def _handle_client(self) -> None:
        # The session task's own context: every line logged by the session, and by the delivery tasks it
        # starts (they copy the context), carries these.
        structlog.contextvars.bind_contextvars(session=self.session_id, peer=self.peer, listener=self.listener)
        balancer = self.proxy_peer
        if balancer is not None:
            # Behind a load balancer: which one relayed the session, when there are several.
            structlog.contextvars.bind_contextvars(proxy_peer=balancer)
        try:
            await super()._handle_client()
        except ConnectionResetError as exc:
            # The end of a half-closed session (or its DATA cut short by the FIN, logged as message_aborted):
            # aiosmtpd closed the transport; nothing is left to report.
            if not (self._client_done or isinstance(exc, ClientDone)):
                raise

    # -- replies -------------------------------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        if self._verb is None and status in _JUNK_LINE_REPLIES and await self._junk_line():
            return
        if isinstance(status, str):
            if status == _LINE_TOO_LONG and cast(CommandReader, self._reader).long_line_was_auth:
                status = str(replies.AUTH_LINE_TOO_LONG)  # RFC 4954 §4; other commands: 500 5.5.2
            if not status.isprintable():  # what _UNPRINTABLE matches is not (Cc, Cs): most lines skip the regex
                status = _UNPRINTABLE.sub("?", status)
            if self._in_ehlo and status.startswith("250-"):
                self._ehlo_lines.append(status)
                return
            if self._in_ehlo and status == "250 HELP":
                # aiosmtpd does not advertise these, though it handles pipelined commands and every
                # reply here carries an enhanced code (RFC 2920, RFC 2034).
                self._ehlo_lines += ("250-PIPELINING", "250-ENHANCEDSTATUSCODES")
            # EHLO/HELO's 250 lines carry no enhanced code; their errors (501 ...) do.
            elif not (self._in_ehlo and status.startswith("250")) and not status.startswith(_LEAVE_ALONE):
                status = _with_code(status)
            self._observe(status)
            if self._ehlo_lines:
                self._ehlo_lines.append(status)
                status = "\r\n".join(self._ehlo_lines)
                self._ehlo_lines.clear()
        data = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") if isinstance(status, str) else status
        if self._verb in _GROUPABLE and data.startswith(b"250 ") and self._command_pending():
            # Pipelined (RFC 2920): the next command is already here, and its reply (every command has one)
            # goes out with this one, in one send, as Postfix does. Only a 250: a refusal may end the session.
            self._held.append(data)
            return
        if self._held:
            data = b"\r\n".join((*self._held, data))
            self._held.clear()
        self._writer.write(data + b"\r\n")
        await self._writer.drain()

    def _command_pending(self) -> bool:
        """A whole command line is already in the reader's buffer (the client pipelines)."""
        return b"\n" in getattr(self._reader, "_buffer", b"")

    def mark_logged(self) -> None:
        """The refusal about to be sent has been logged with its own event (auth_failed, ...)."""
        self._logged = True

    def _observe(self, line: str) -> None:
        """Count (and log, unless logged already) every 4xx/5xx reply."""
        basic = line[:3]
        if line[3:4] == "-" or not basic.isdigit():
            return
        self._last_code = int(basic)
        logged, self._logged = self._logged, False
        if self._last_code < 400:
            return
        REFUSALS.labels(code=replies.codes(line) or basic).inc()
        if not logged:
            log.info("command_refused", command=self._verb, reply=line)

    def say_and_close(self, line: str, *, logged: bool = False) -> None:
        """A last reply written at once (from a timer or the drain, outside the session task), then close."""
        if self.transport is None:
            return
        self._logged = logged
        self._observe(line)
        # A transport on its way out raises whatever its layer does (asyncio's SSL transport: AttributeError).
        with contextlib.suppress(Exception):
            self._writer.write(b"".join(h + b"\r\n" for h in self._held) + line.encode() + b"\r\n")
        self._held.clear()
        self.transport.close()

    # -- limits --------------------------------------------------------------------------------------------

    def _within_call_limit(self, verb: str) -> bool:
        """Count one more `verb`: False past its limit (the caller cuts the session off). Not a coroutine:
        every command passes here."""
        limit = self._call_limits.get(verb)
        if limit is None:
            return True
        used = self._calls.get(verb, 0)
        if used < limit or self.transport is None:
            self._calls[verb] = used + 1
            return True
        return False

    async def _end_for_limit(self, limit: str, commands: int, verb: str, reply: Reply) -> None:
        """A command past one of the session's limits: refused unexecuted, counted, logged, and the session ends."""
        LIMIT_HITS.labels(limit=limit).inc()
        log.info("session_cut_off", limit=limit, commands=commands, command=verb)
        self.mark_logged()
        await self.push(str(reply))
        if self.transport is not None:
            self.transport.close()

    async def _unknown_command(self, verb: str, arg: str | None) -> None:
        """A command line with a verb the session does not know (looked up through _Commands)."""
        self._unknown += 1
        if self._unknown >= UNKNOWN_LIMIT and self.transport is not None:
            # Not the verb: an unknown "command" is often a base64 AUTH line sent on after AUTH was refused
            # (its password, upper-cased), so the log names none, as the reply does (see _UNKNOWN_COMMAND).
            await self._end_for_limit("unknown_commands", self._unknown, "unknown", replies.TOO_MANY_UNKNOWN)
            return
        await self.push(f'500 Error: command "{verb}" not recognized')  # never echoed (see _with_code)

    async def _junk_line(self) -> bool:
        """A line aiosmtpd answered itself, before any command lookup (_JUNK_LINE_REPLIES): an unrecognised
        command for the session's limits, and one towards max_commands_before_data; without this a client
        kept its session slot for ever with one such line per command_timeout. True when the line is not to be
        answered: it ended the session (its reply sent), or the session is ending already."""
        if self.transport is None or self.transport.is_closing():
            return True  # cut off already (a line buffered behind the one that ended it): nothing more is said
        self._unknown += 1
        if self._unknown >= UNKNOWN_LIMIT:
            await self._end_for_limit("unknown_commands", self._unknown, "unknown", replies.TOO_MANY_UNKNOWN)
            return True
        if self._commands >= self._max_commands:
            await self._end_for_limit("max_commands_before_data", self._commands, "unknown", replies.TOO_MANY_COMMANDS)
            return True
        self._commands += 1
        return False

    def _message_accepted(self) -> None:
        """Restart the per-message counts (not the security limits in PER_CONNECTION)."""
        self._unknown = 0
        if self._calls:
            self._calls = {verb: n for verb, n in self._calls.items() if verb in PER_CONNECTION}

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's idle timer (command_timeout), reset by every command and every read of DATA: one timer
        whose deadline moves on, instead of a timer cancelled and a new one armed each time. A timer that
        fires before the deadline it now has waits again, until then."""
        deadline = self._idle_deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is not None and self._idle_armed and not handle.cancelled() and handle.when() <= deadline:
            return
        if handle is not None:
            handle.cancel()
        self._timeout_handle = self.loop.call_at(deadline, self._idle_expired)
        self._idle_armed = True

    def _idle_expired(self) -> None:
        self._idle_armed = False
        if self._idle_deadline - self.loop.time() > _TIMER_SLACK:
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_expired)
            self._idle_armed = True
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        """No command (or no DATA bytes) within command_timeout: say so (Postfix: 421 4.4.2) and close."""
        if self.transport is None or self._in_handshake():
            # A STARTTLS handshake has its own timeout (at most this one) and ends without a plaintext line.
            return
        if self._delivering:
            # The client is not silent, it waits for us: its message is being delivered (inline_budget, then
            # the queue's store), which may take longer than command_timeout. A 421 now would tell it to send
            # again a message whose delivery goes on (a second copy). The timer starts afresh once the
            # delivery has answered (smtp_DATA).
            return
        self._cut_off = "command_timeout"
        LIMIT_HITS.labels(limit="command_timeout").inc()
        balancer = self.proxy_peer
        relayed = {"proxy_peer": balancer} if balancer is not None else {}
        log.info(
            "session_timeout",
            limit="command_timeout",
            timeout=self._timeout_duration,
            in_data=self.in_data,
            # A timer: its context may predate the session task's, so the session's fields are given here.
            session=self.session_id,
            peer=self.peer,
            listener=self.listener,
            **relayed,
        )
        self.say_and_close(str(replies.command_timeout(self.hostname)), logged=True)

    def _data_deadline(self) -> None:
        """DATA not finished within data_timeout, however slowly the bytes kept coming (slowloris)."""
        if self.transport is None:
            return
        self._cut_off = "data_timeout"
        LIMIT_HITS.labels(limit="data_timeout").inc()
        self.say_and_close(
            str(replies.data_timeout(self.hostname, self._data_timeout)),
            logged=True,
        )

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        m = _SIMPLE_PATH.match(arg)
        if m is not None and not self.local_part_limit:
            return m.group(1), m.group(2)
        try:
            result: tuple[str | None, str | None] = super()._getaddr(arg)
        except (IndexError, AttributeError, RecursionError):
            # The stdlib's address parser fails on truncated paths instead of raising HeaderParseError:
            # IndexError past the end of "<" or "<@", AttributeError on an unclosed "[" domain literal
            # (found by tests/test_fuzz_smtp.py), RecursionError on about a thousand nested comments "((("
            # (a command line's limit keeps such paths out; this is the parser's own answer). All are syntax
            # errors, not internal ones.
            return None, None
        return result

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False
            self._ehlo_lines.clear()  # an EHLO that failed half-way sends no half reply

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        self._in_ehlo = bool(hostname)
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._in_ehlo = False

    # -- AUTH ------------------------------------------------------------------------------------------

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str | None) -> None:
        """AUTH as aiosmtpd does it, except: mechanism names in any case (RFC 4954 §4; .NET's SmtpClient and
        several printers send "auth login"), and after HELO as after EHLO (devices that never send EHLO;
        Postfix accepts that too). HELO advertises nothing; EHLO advertises AUTH where it is allowed."""
        assert self.session is not None
        if await self.check_helo_needed("EHLO"):
            return
        if self._auth_require_tls and not self.tls_up:
            await self.push(str(replies.ENCRYPTION_REQUIRED))
            return
        if self.session.authenticated:
            await self.push(str(replies.ALREADY_AUTHENTICATED))
            return
        if self.envelope is not None and self.envelope.mail_from is not None:
            # RFC 4954 §4: AUTH during a mail transaction is refused. On a listener with trusted networks the
            # MAIL was checked as the trusted login (sender policy, rate, quota); a login taking over now
            # would send a message its own checks never saw.
            await self.push(str(replies.AUTH_IN_TRANSACTION))
            return
        args = (arg or "").split()
        if not args:
            await self.push(str(replies.AUTH_SYNTAX))
            return
        if len(args) > 2:
            await self.push(str(replies.AUTH_TOO_MANY_VALUES))
            return
        args[0] = args[0].upper()
        mechanism = self._auth_methods.get(args[0])
        if mechanism is None:
            await self.push(str(replies.AUTH_UNKNOWN_MECHANISM))
            return
        result: AuthResult = await mechanism.method(self, args)
        status: str | None
        if result.success:
            self.session.authenticated = True
            self.session.auth_data = result.auth_data
            status = result.message or str(replies.AUTH_OK)
        else:
            status = None if result.handled else (result.message or str(replies.AUTH_INVALID))
        if status is not None:
            await self.push(status)

    async def challenge_auth(
        self, challenge: str | bytes, encode_to_b64: bool = True, log_client_response: bool = False
    ) -> Any:
        """A 334 challenge and the client's decoded answer, or MISSING when it was answered here already.

        aiosmtpd's own, with the gateway's replies: a response line longer than the reader's limit gets RFC
        4954's 500 5.5.6 (aiosmtpd lets the reader's ValueError escape, which would end as 451 Internal error),
        and an answer that is not base64 the same 501 5.5.2 as a bad initial response (aiosmtpd's text
        differs). The answer is never logged (`log_client_response` is ignored: it may be a password)."""
        raw = challenge.encode() if isinstance(challenge, str) else challenge
        # RFC 4954: the space after 334 is there even for an empty challenge.
        await self.push(b"334 " + (base64.b64encode(raw) if encode_to_b64 else raw))
        try:
            line = await self._reader.readline()
        except ValueError:
            await self.push(str(replies.AUTH_LINE_TOO_LONG))
            return MISSING
        blob = line.strip()
        if blob == b"*":
            await self.push(str(replies.AUTH_ABORTED))
            return MISSING
        try:
            return base64.b64decode(blob, validate=True)
        except binascii.Error:
            await self.push(str(replies.AUTH_BAD_BASE64))
            return MISSING

    # -- STARTTLS --------------------------------------------------------------------------------------

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if self.tls_up or self._implicit_tls:
            # Postfix's answer; the session goes on, still encrypted (aiosmtpd would stack a second TLS
            # layer on the first and drop the connection).
            await self.push(str(replies.TLS_ALREADY_ACTIVE))
            return
        if arg:
            await self.push(str(replies.STARTTLS_SYNTAX))
            return
        if self._tls is None or self.transport is None:
            await self.push(str(replies.TLS_UNAVAILABLE))
            return
        await self.push(str(replies.STARTTLS_READY))
        handshake = self.handshake = self._tls.handshake(self, established=lambda: self.tls_up)
        # The same hand-over aiosmtpd's STARTTLS does, with our handshake protocol in front of SSLProtocol.
        # aiosmtpd's connection_made() (called on success) starts a fresh session and drops any plaintext
        # the client pipelined behind STARTTLS (RFC 3207 §4.2, §6).
        self._original_transport = self.transport
        # aiosmtpd reads `_tls_protocol._extra` when the handshake is done (handshake.py gives it).
        self._tls_protocol = handshake  # type: ignore[assignment]
        self.transport = handshake.app_transport
        self._original_transport.set_protocol(handshake)
        handshake.connection_made(self._original_transport)
        if not await handshake.result:
            # Already reported (info, once per client IP) and closed: end the session quietly.
            self.connection_lost(None)

    # -- envelope ----------------------------------------------------------------------------------------

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if self._draining.is_set():
            await self.push(str(replies.SHUTTING_DOWN))
            if self.transport is not None:
                self.transport.close()
            return
        stripped = (arg or "").strip()
        if stripped[:5].upper() == "FROM:" and stripped[5:].lstrip().startswith("<>"):
            if await self.check_helo_needed():
                return
            # DMDS applies the registered return-path itself; a null-sender bounce has nowhere to go.
            await self.push(str(replies.NULL_SENDER))
            return
        await super().smtp_MAIL(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        """Read the message in large chunks (aiosmtpd reads line by line), tolerating bare LF lines.

        A line's leading dot is unstuffed after CRLF and after a bare LF alike.
        Only CRLF.CRLF ends the data (no bare-LF terminator: avoids SMTP smuggling ambiguities).
        Lines longer than 998 octets are accepted: the message is parsed, not relayed as is.
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push(str(replies.NEED_RCPT))
            return
        if arg:
            await self.push(str(replies.DATA_SYNTAX))
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        envelope = self.envelope
        txn = self.txn = Transaction(self.loop.time())
        self.in_data = True
        # The whole DATA phase has one deadline; bytes trickling in do not extend it (the idle timer, reset
        # by each read, still cuts off a client that stops sending).
        deadline = self.loop.call_later(self._data_timeout, self._data_deadline)
        try:
            content = await self._read_data()
        except BaseException:
            self._summarize(envelope, txn, None)
            raise
        finally:
            deadline.cancel()
            self.in_data = False
        if content is None and self._spill_error is not None:
            txn.receipt.reason = f"DATA could not be written to limits.spill_dir: {self._spill_error}"
            status = str(replies.SPOOL_FULL)
            self._release()
            self._set_post_data_state()  # type: ignore[no-untyped-call]
        elif content is None:
            LIMIT_HITS.labels(limit="max_large_bytes" if self._over_budget else "max_message_size").inc()
            txn.receipt.reason = (
                "too many large messages in this process now (limits.max_large_bytes)"
                if self._over_budget
                else f"larger than max_message_size ({self.data_size_limit} bytes)"
            )
            status = str(replies.LARGE_BUSY if self._over_budget else replies.MESSAGE_TOO_BIG)
            self._release()
            self._set_post_data_state()  # type: ignore[no-untyped-call]
        else:
            txn.size = len(content)
            # aiosmtpd types these as bytes; a bytearray is bytes-like for every reader (see _read_data).
            envelope.content = content  # type: ignore[assignment]
            envelope.original_content = content  # type: ignore[assignment]
            self.replying = True  # cleared once the reply is written (below)
            self._delivering = True
            try:
                status = await self._call_handler_hook("DATA")
            except asyncio.CancelledError as exc:
                self.replying = False
                self._summarize(envelope, txn, None)  # the client left; its delivery goes on and logs
                # The handler's and the pipeline's frames below this one are done: what they held (the message,
                # parsed) goes now, not when the cyclic GC finds this exception's traceback (see _read_data).
                traceback.clear_frames(exc.__traceback__)
                raise
            except Exception as exc:  # a bug: logged with its traceback and counted (handle_exception)
                txn.receipt.reason = "internal error (logged as smtp_unexpected_error)"
                status = await self.handle_exception(exc)
            finally:
                self._delivering = False
                if self.transport is not None:
                    # The idle timer was held off while the delivery ran (_timeout_cb): the client has
                    # command_timeout from here on (its reply is written next; a client that stops reading
                    # it is cut off as ever).
                    self._reset_timeout()
                # The pipeline holds the message as long as its delivery needs it; this session does not, also
                # while its reply is written (a client gone by then leaves this frame to the cyclic GC).
                envelope.content = envelope.original_content = None
                del content
                # Whatever happened, the transaction is over: the next MAIL starts afresh (not "nested MAIL").
                self._release()  # the pipeline took it over (or the hook failed before it could)
                self._set_post_data_state()  # type: ignore[no-untyped-call]
        # The line before the reply (a client holding its reply finds its line); a log that cannot be written
        # drops the line and raises nothing (gateway/ops/logs.py _Sink), so the reply never waits on the log.
        self._summarize(envelope, txn, status)
        # Counted here, where every message whose data was read gets its one reply: the pipeline's, and the
        # session's own (552 too big, 452 over the large-message budget or no room to spill, a quota, 451 a
        # bug), so smtp_gateway_messages_total sums every such reply once. A DATA refused before 354 is no
        # message; one whose client left (or was cut off) before its reply is message_aborted, not counted.
        _MESSAGES_BY_CLASS[status[:1]].inc()
        self.mark_logged()
        try:
            await self.push(status)
        finally:
            self.replying = False

    async def handle_exception(self, error: Exception) -> str:
        """A bug in a command (raised into aiosmtpd's command loop, or by smtp_DATA's hook): logged here once,
        with the command's verb (never its arguments: AUTH's carry a password) and the traceback, and counted;
        the client gets 451 4.3.0, not aiosmtpd's "500 Error: (Type) text". Marked logged, so the 451 gets
        no command_refused line of its own (one without the command: aiosmtpd sends it after _verb is clear)."""
        command = self._verb or self._failed_verb
        self._failed_verb = None
        INTERNAL_ERRORS.labels(where="smtp_session").inc()
        # A bug in a command (its verb, never its arguments: they may carry a password): once with its
        # traceback; the client gets 451 and the session goes on.
        log.error("smtp_unexpected_error", command=command, error_type=type(error).__name__, exc_info=error)
        self.mark_logged()
        return str(replies.INTERNAL_ERROR)

    def take_reservation(self) -> Reservation | None:
        """The pipeline takes the message's share of the budget; it releases it when the attempt ends."""
        reservation, self.reservation = self.reservation, None
        return reservation

    def _release(self) -> None:
        if self.reservation is not None:
            self.reservation.release()
            self.reservation = None

    def _summarize(self, envelope: Any, txn: Transaction, status: str | None) -> None:
        """The transaction's one log line: message_accepted / _deferred / _rejected, or message_aborted
        when the client left (or was cut off) before its reply."""
        auth = self.session.auth_data if self.session is not None else None
        principal = auth if isinstance(auth, Principal) else None
        receipt = txn.receipt
        fields: dict[str, Any] = {
            "login": principal.login if principal else None,
            "account": principal.account if principal else None,
            "sender": envelope.mail_from,
            "rcpts": len(envelope.rcpt_tos),
            "size": txn.size or None,
            "duration": round(self.loop.time() - txn.started, 3),
        }
        if receipt.queue_id:
            fields["queue_id"] = receipt.queue_id
        if receipt.upstream_ids:
            fields["upstream_id"] = receipt.upstream_ids[0]
            if len(receipt.upstream_ids) > 1:
                fields["upstream_ids"] = receipt.upstream_ids
        if receipt.upstream_sent is not None:
            fields["upstream_sent"] = receipt.upstream_sent
        if status is None:
            reason = self._cut_off or (
                "client disconnected during delivery (the delivery goes on)"
                if txn.size
                else "client disconnected during DATA"
            )
            log.info("message_aborted", reason=reason, **fields)
            return
        code = int(status[:3])
        if receipt.reason is not None and code >= 400:
            fields["reason"] = receipt.reason
        # One call per event, so the log events reference (tools/docgen) lists each with its level.
        if code < 400:
            log.info("message_accepted", reply=status, **fields)
        elif code < 500:
            log.warning("message_deferred", reply=status, **fields)
        else:
            log.info("message_rejected", reply=status, **fields)

    async def _read_data(self) -> bytearray | SpillMap | None:
        reader = self._reader
        limit = self.data_size_limit or 0
        # A CRLF stands before the data (the DATA line's own), so the terminator search and the
        # dot-unstuffing below treat the first line like every other line.
        buf = bytearray(b"\r\n")
        kept = 2  # bytes at buf's start that are not data to keep (that CRLF, or the tail of what was spilled)
        spill: SpillFile | None = None
        spilled = 0  # bytes of data (as sent, dot-stuffed) written to the spill file
        too_big = self._over_budget = False
        self._spill_error = None
        if self.budget is not None:
            self.reservation = self.budget.reservation()
        received = 0
        stuffed = False  # a line starting with a dot was seen: unstuffing needs a pass (and a copy)
        try:
            while True:
                start = max(0, len(buf) - len(_END) + 1)
                chunk = await reader.read(_CHUNK)
                if not chunk:
                    raise ConnectionResetError("connection closed during DATA")
                self._reset_timeout()
                buf += chunk
                received += len(chunk)
                end = buf.find(_END, start)
                # Only the new bytes are searched (a scan's megabytes are never walked again on the event loop),
                # and not the terminator's own "\n.".
                stuffed = stuffed or buf.find(b"\n.", start, len(buf) if end == -1 else end + 1) != -1
                if end != -1:
                    break
                # StreamReader.read() returns at once while data is buffered: a fast sender of a big message
                # would keep the event loop in this loop until its last byte. Let other sessions in per chunk.
                await asyncio.sleep(0)
                if self.reservation is not None and not self.reservation.grow(received):
                    # Too many large messages in this process now: read the rest, keep none of it, answer 452.
                    too_big = self._over_budget = True
                    self._release()
                if too_big or (limit and spilled + len(buf) - kept > limit + len(_END)):
                    too_big = True
                    if spill is not None:
                        spill.close()
                        spill = None
                    del buf[: len(buf) - len(_END)]  # keep only what the terminator search needs
                elif self._spill_above and (cut := len(buf) - _SPILL_TAIL) - kept >= (
                    _SPILL_WRITE if spill else max(self._spill_above, _SPILL_TAIL)
                ):
                    # A large message goes to a file while it arrives, in large writes (a write of 256 KiB to the
                    # page cache takes about 0.1 ms): it then waits for its API call outside the heap. The last
                    # bytes stay: they may begin the terminator ("\r\n." of "\r\n.\r\n"), which is not data.
                    spill = spill or self._spill_open()
                    if spill is not None and self._spill_write(spill, buf, kept, cut, stuffed):
                        spilled += cut - kept
                        del buf[: cut - 1]  # the last byte written stays before the rest, for the unstuffing
                        kept = 1
                        stuffed = buf.find(b"\n.") != -1  # from here on: what is still in the buffer
                    else:  # refused (452) once its end has come; the rest is read and dropped meanwhile
                        too_big = True
                        self._release()
                        del buf[: len(buf) - len(_END)]
            leftover = bytes(buf[end + len(_END) :])
            if leftover:
                # Pipelined commands after the final dot belong to the command loop.
                reader._buffer[0:0] = leftover  # type: ignore[attr-defined]
            if too_big:
                return None
            del buf[end + 2 :]
            if limit and spilled + len(buf) - kept > limit:
                return None
            if spill is not None:
                if not self._spill_write(spill, buf, kept, len(buf), stuffed):
                    return None
                del buf[:]
                SPILLED.inc()
                return spill.mapped()
        except BaseException:
            # A session cut off in its DATA (the client gone, a timeout) ends in an exception whose traceback
            # keeps the session's frames, and the data in them, until the cyclic GC finds them, which in a busy
            # process is rarely: clients that left mid-message made its RSS grow by their messages' size.
            del buf[:]
            raise
        finally:
            if spill is not None:
                spill.close()  # a no-op once mapped; else (cut off, too big) the file goes now
        # Undo dot-stuffing after bare LF too: clients that end lines with LF (smtplib with bytes,
        # scripts) stuff the dots of those lines. Only CRLF.CRLF ends the data, so this is unambiguous.
        # Only then is a copy made: base64 never starts a line with a dot, so a scan is not held twice.
        content = buf.replace(b"\n.", b"\n") if stuffed else buf
        del buf
        del content[:2]
        # A bytearray, not bytes: the pipeline empties it once the message is parsed, so a large
        # message's raw copy is not held while its upstream call runs (docs/messages.md, memory).
        return content

    def _spill_open(self) -> SpillFile | None:
        try:
            return SpillFile(self._spill_dir)
        except OSError as exc:
            self._spill_failed(exc)
            return None

    def _spill_write(self, spill: SpillFile, buf: bytearray, kept: int, end: int, stuffed: bool) -> bool:
        """buf[kept:end] into the file, dot-unstuffed if `stuffed` (a line in it starts with a dot)."""
        try:
            if stuffed:
                spill.write(_unstuffed(buf, kept, end))
            else:
                with memoryview(buf) as view:  # released before the buffer is cut
                    spill.write(view[kept:end])
        except OSError as exc:  # the disk is full, the directory gone: the message cannot be kept
            spill.close()
            self._spill_failed(exc)
            return False
        return True

    def _spill_failed(self, exc: OSError) -> None:
        self._spill_error = exc.strerror or type(exc).__name__
        SPILL_FAILURES.inc()
        log.error("data_spill_failed", directory=self._spill_dir or tempfile.gettempdir(), error=str(exc))


def _unstuffed(buf: bytearray, kept: int, end: int) -> memoryview:
    """buf[kept:end] with the dot-stuffing undone: the byte before `kept` comes along, so a "\n." whose
    "\n" was written out with the previous piece is seen (only the bytes from `kept` on are returned)."""
    piece = buf[kept - 1 : end]
    if piece.find(b"\n.") != -1:
        piece = piece.replace(b"\n.", b"\n")
    return memoryview(piece)[1:]


@functools.lru_cache(maxsize=512)
def _with_code(status: str) -> str:
    """A reply line as sent: an enhanced status code added, aiosmtpd's "Error: " prefix dropped. Remembered,
    since most sessions send the same few lines."""
    if _UNKNOWN_COMMAND.match(status):
        status = "500 5.5.2 Command not recognized"
    return _ERROR_PREFIX.sub(lambda m: m.group(1), add_enhanced_code(status), count=1)


def _counted(verb: str, method: FunctionType) -> FunctionType:
    """A command method that counts towards limits.max_commands_before_data (applied once per class)."""

    async def run(self: GatewaySMTP, arg: str | None) -> None:
        if not self._within_call_limit(verb):
            # aiosmtpd's own reply to a command sent too many times
            await self._end_for_limit(
                "command_call_limit", self._calls.get(verb, 0), verb, replies.too_many_calls(verb)
            )
            return
        if verb != "QUIT" and self._commands >= self._max_commands and self.transport is not None:
            # This command would be one too many: refused unexecuted, and the session ends.
            await self._end_for_limit("max_commands_before_data", self._commands, verb, replies.TOO_MANY_COMMANDS)
            return
        self._verb = verb
        try:
            await method(self, arg)
        except Exception:
            # aiosmtpd's command loop hands it to handle_exception, which logs it with this verb.
            self._failed_verb = verb
            raise
        finally:
            self._verb = None
        if verb == "DATA" and self.txn is not None:
            self.txn = None
            self._commands = 0  # a message went through (or was answered): count afresh
            if self._last_code < 400:
                self._message_accepted()
        elif verb != "QUIT" and (verb not in _TRANSACTION or self._last_code >= 400):
            self._commands += 1

    for attr in _SYNTAX_ATTRS:
        if hasattr(method, attr):
            setattr(run, attr, getattr(method, attr))
    return cast(FunctionType, run)


_sanitized_log = aiosmtpd.smtp.sanitized_log
_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO}


def _sanitized_log_if_enabled(func: Callable[..., None], msg: AnyStr, *args: Any, **kwargs: Any) -> None:
    """aiosmtpd's sanitized_log, which it calls twice for every command line (at debug and at info, its
    logger is at ERROR here: gateway/ops/logs.py): the line's AUTH data masked (a regular expression) only
    when its level is logged."""
    logger = getattr(func, "__self__", None)
    level = _LOG_LEVELS.get(getattr(func, "__name__", ""))
    if isinstance(logger, logging.Logger) and level is not None and not logger.isEnabledFor(level):
        return
    _sanitized_log(func, msg, *args, **kwargs)


# aiosmtpd's command loop looks the function up in its module on each call.
aiosmtpd.smtp.sanitized_log = _sanitized_log_if_enabled

_TABLES: dict[type, MethodTables] = {}
