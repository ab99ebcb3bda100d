"""aiosmtpd's SMTP protocol, adjusted: enhanced status codes on every reply, a fast DATA reader, our AUTH
prompts and rules (any case, after HELO too, long lines), our TLS handshakes for STARTTLS."""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import Callable
from typing import Any, cast

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, syntax

from gateway import replies
from gateway.replies import add_enhanced_code
from gateway.smtp.handshake import ListenerTls, TlsHandshake

# Replies that never carry an enhanced code (RFC 2034 §3: not the greeting, not EHLO/HELO lines) and
# intermediate replies whose text is protocol data (334 challenges, 354).
_LEAVE_ALONE = ("220", "334", "354")
_CHUNK = 64 * 1024
# The common "<local@domain> PARAMS" form; anything else (quoted local parts, comments, source routes)
# goes to aiosmtpd's full RFC 5322 parser, which costs ~40 us per call (it defines a class each time).
_SIMPLE_PATH = re.compile(r"\s*<([^<>\s\"\\()@,;:\[\]]+@[^<>\s\"\\()@,;:]+)>(.*)\Z", re.DOTALL)
_END = b"\r\n.\r\n"
# RFC 4954 §4: an AUTH command line (with its initial response) and each line answering a 334 challenge may
# be 12288 octets long; aiosmtpd's default of 512 (and 1001 for any line it reads) refuses a long password.
AUTH_LINE_LIMIT = 12288
# aiosmtpd's reply to a line that is no command quotes the (upper-cased) first word back to the client. A
# client whose AUTH was refused goes on with its base64 username and password lines: never echo those.
_UNKNOWN_COMMAND = re.compile(r'500 Error: command ".*" not recognized\Z', re.DOTALL)


class GatewaySMTP(SMTP):
    # Many printers and scanners expect exactly these prompts (aiosmtpd's defaults differ).
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"
    # The StreamReader's line limit: must hold an AUTH line (and is the buffer's flow-control unit).
    line_length_limit = AUTH_LINE_LIMIT + 2
    # aiosmtpd applies this one limit to every line of a session that did not send EHLO (an EHLO session
    # gets per-command limits, set in __init__). AUTH is accepted after HELO, so its limit applies there.
    command_size_limit = AUTH_LINE_LIMIT

    def __init__(
        self,
        handler: Any,
        *,
        draining: asyncio.Event,
        on_close: Callable[[GatewaySMTP], None],
        tls: ListenerTls | None = None,
        implicit_tls: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, tls_context=tls.context if tls and not implicit_tls else None, **kwargs)
        # Per session: aiosmtpd's own dict is a class attribute that every EHLO adds to.
        self.command_size_limits = collections.defaultdict(lambda: 512, AUTH=AUTH_LINE_LIMIT)
        self._in_ehlo = False
        self._draining = draining
        self._on_close = on_close
        self._tls = tls
        self._implicit_tls = implicit_tls
        # True once the session is encrypted (implicit TLS, or after STARTTLS).
        self.tls_up = False
        self.in_data = False
        # The TLS handshake of the session (implicit TLS: before connection_made(); or STARTTLS's).
        self.handshake: TlsHandshake | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if transport.get_extra_info("ssl_object") is not None:
            self.tls_up = True
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
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        cast(asyncio.WriteTransport, transport).write(str(replies.SHUTTING_DOWN).encode() + b"\r\n")
        transport.close()

    def abort(self) -> None:
        """Hard close, for a client that did not complete the graceful one in time."""
        if self._in_handshake():
            assert self.handshake is not None
            self.handshake.abort()
        elif self.transport is not None:
            cast(asyncio.WriteTransport, self.transport).abort()

    def _in_handshake(self) -> bool:
        # tls_up: connection_made() of a successful handshake runs before the handshake's result is set.
        return self.handshake is not None and not self.handshake.result.done() and not self.tls_up

    def connection_lost(self, error: Exception | None) -> None:
        self._on_close(self)
        super().connection_lost(error)

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            if self._in_ehlo and status == "250 HELP":
                # aiosmtpd does not advertise these, though it handles pipelined commands and every
                # reply here carries an enhanced code (RFC 2920, RFC 2034).
                await super().push("250-PIPELINING")
                await super().push("250-ENHANCEDSTATUSCODES")
            # EHLO/HELO's 250 lines carry no enhanced code; their errors (501 ...) do.
            elif not (self._in_ehlo and status.startswith("250")) and not status.startswith(_LEAVE_ALONE):
                if _UNKNOWN_COMMAND.match(status):
                    status = "500 5.5.2 Command not recognized"
                status = add_enhanced_code(status)
        await super().push(status)  # type: ignore[type-var]

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        m = _SIMPLE_PATH.match(arg)
        if m is not None and not self.local_part_limit:
            return m.group(1), m.group(2)
        result: tuple[str | None, str | None] = super()._getaddr(arg)
        return result

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False

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
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if self.session.authenticated:
            await self.push("503 5.5.1 Already authenticated")
            return
        args = (arg or "").split()
        if not args:
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        if len(args) > 2:
            await self.push("501 5.5.4 Too many values")
            return
        args[0] = args[0].upper()
        mechanism = self._auth_methods.get(args[0])
        if mechanism is None:
            await self.push("504 5.5.4 Unrecognized authentication type")
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
        """aiosmtpd's 334 challenge, answering a response line longer than the reader's limit with RFC 4954's
        500 5.5.6 (aiosmtpd lets the reader's ValueError escape, which would end as 451 Internal error)."""
        try:
            return await super().challenge_auth(challenge, encode_to_b64, log_client_response)
        except ValueError:
            await self.push("500 5.5.6 Authentication exchange line is too long")
            return MISSING

    # -- STARTTLS --------------------------------------------------------------------------------------

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if self.tls_up or self._implicit_tls:
            # Postfix's answer; the session goes on, still encrypted (aiosmtpd would stack a second TLS
            # layer on the first and drop the connection).
            await self.push("554 5.5.1 TLS already active")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        if self._tls is None or self.transport is None:
            await self.push("454 4.7.0 TLS not available")
            return
        await self.push("220 Ready to start TLS")
        handshake = self.handshake = self._tls.handshake(self, established=lambda: self.tls_up)
        # The same hand-over aiosmtpd's STARTTLS does, with our handshake protocol in front of SSLProtocol.
        # aiosmtpd's connection_made() (called on success) starts a fresh session and drops any plaintext
        # the client pipelined behind STARTTLS (RFC 3207 §4.2, §6).
        self._original_transport = self.transport
        self._tls_protocol = handshake.tls
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
            await self.push("553 5.7.1 Null sender <> not accepted: this gateway does not relay bounces")
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
            await self.push("503 5.5.1 Need RCPT command first")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self.in_data = True
        try:
            content = await self._read_data()
        finally:
            self.in_data = False
        if content is None:
            await self.push(str(replies.MESSAGE_TOO_BIG))
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        # aiosmtpd types these as bytes; a bytearray is bytes-like for every reader (see _read_data).
        self.envelope.content = content  # type: ignore[assignment]
        self.envelope.original_content = content  # type: ignore[assignment]
        try:
            status = await self._call_handler_hook("DATA")
        finally:
            # Whatever happened, the transaction is over: the next MAIL starts afresh (not "nested MAIL").
            self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)

    async def _read_data(self) -> bytearray | None:
        reader = self._reader
        limit = self.data_size_limit or 0
        # A CRLF stands before the data (the DATA line's own), so the terminator search and the
        # dot-unstuffing below treat the first line like every other line.
        buf = bytearray(b"\r\n")
        too_big = False
        while True:
            start = max(0, len(buf) - len(_END) + 1)
            chunk = await reader.read(_CHUNK)
            if not chunk:
                raise ConnectionResetError("connection closed during DATA")
            self._reset_timeout()
            buf += chunk
            end = buf.find(_END, start)
            if end != -1:
                break
            if limit and len(buf) > limit + 2 + len(_END):
                too_big = True
                del buf[: len(buf) - len(_END)]  # keep only what the terminator search needs
        leftover = bytes(buf[end + len(_END) :])
        if leftover:
            # Pipelined commands after the final dot belong to the command loop.
            reader._buffer[0:0] = leftover  # type: ignore[attr-defined]
        if too_big:
            return None
        del buf[end + 2 :]
        if limit and len(buf) - 2 > limit:
            return None
        # Undo dot-stuffing after bare LF too: clients that end lines with LF (smtplib with bytes,
        # scripts) stuff the dots of those lines. Only CRLF.CRLF ends the data, so this is unambiguous.
        content = buf.replace(b"\n.", b"\n")
        del buf
        del content[:2]
        # A bytearray, not bytes: the pipeline empties it once the message is parsed, so a large
        # message's raw copy is not held while its upstream call runs (bench/README.md, memory).
        return content
