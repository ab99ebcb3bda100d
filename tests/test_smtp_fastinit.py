"""Canary of the aiosmtpd internal gateway/smtp/fastinit.py relies on: a session built by `init_session` has
exactly the attributes, with the same values, as one built by aiosmtpd's own `SMTP.__init__`."""

from __future__ import annotations

import asyncio
import ssl
from importlib import metadata
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, auth_mechanism

from gateway.smtp.fastinit import MethodTables, init_session
from gateway.smtp.protocol import GatewaySMTP


class Handler:
    def __init__(self) -> None:
        self.auth_data = "an attribute, not a mechanism"  # not auth_*: left out by both

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"

    async def auth_PLAIN(self, server: Any, args: list[str]) -> AuthResult:  # replaces aiosmtpd's builtin
        return AuthResult(success=False)

    @auth_mechanism("X-CUSTOM")
    async def auth_custom(self, server: Any, args: list[str]) -> AuthResult:
        return AuthResult(success=False)


class Plain(SMTP):
    pass


OPTIONS: dict[str, Any] = {
    "hostname": "gw.test",
    "ident": "test ESMTP",
    "data_size_limit": 1000,
    "enable_SMTPUTF8": True,
    "timeout": 30,
    "auth_require_tls": False,
    "auth_exclude_mechanism": ("XOAUTH2",),
    "command_call_limit": {"NOOP": 5, "*": 100},
}


def _normal(value: Any) -> Any:
    """What can be compared between two sessions: bound methods by their function, objects by type."""
    if hasattr(value, "__func__"):
        return ("method", value.__func__.__qualname__)
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # aiosmtpd's _AuthMechAttr
        return tuple(_normal(v) for v in value)
    if isinstance(value, (str, int, float, bool, type(None), frozenset, set, list, tuple)):
        return value
    return ("object", type(value).__name__)


def _state(proto: Any) -> dict[str, Any]:
    return {k: _normal(v) for k, v in vars(proto).items()}


def test_aiosmtpd_is_the_version_the_copy_mirrors() -> None:
    # pyproject pins aiosmtpd below 1.5: a new minor version must be compared again (this file) before use.
    assert metadata.version("aiosmtpd").startswith("1.4.")


@pytest.mark.parametrize("with_tls", [False, True])
async def test_init_session_sets_what_smtp_init_sets(with_tls: bool) -> None:
    loop = asyncio.get_running_loop()
    handler = Handler()
    options = {**OPTIONS, "loop": loop}
    if with_tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        options["tls_context"] = context
    reference = Plain(handler, **options)
    fast = Plain.__new__(Plain)
    init_session(fast, MethodTables(Plain), handler, **options)
    assert _state(fast) == _state(reference)
    # The builtin mechanism is bound to its own session; the handler's are the handler's.
    assert fast._auth_methods["LOGIN"].method.__self__ is fast
    assert fast._auth_methods["LOGIN"].is_builtin
    assert fast._auth_methods["PLAIN"].method.__self__ is handler
    assert "X-CUSTOM" in fast._auth_methods and "XOAUTH2" not in fast._auth_methods
    assert fast._smtp_methods["EHLO"].__self__ is fast


async def test_gateway_session_has_every_command_of_smtp_init_counted() -> None:
    loop = asyncio.get_running_loop()
    handler = Handler()
    session = GatewaySMTP(handler, draining=asyncio.Event(), on_close=lambda s: None, loop=loop, **OPTIONS)
    reference = GatewaySMTP.__new__(GatewaySMTP)
    SMTP.__init__(reference, handler, loop=loop, **OPTIONS)
    assert set(session._smtp_methods) == set(reference._smtp_methods)
    for verb, method in session._smtp_methods.items():
        assert method.__self__ is session
        # Wrapped once per class (commands counted); HELP still finds each command's syntax.
        assert method.__func__.__name__ == "run"
        assert getattr(method, "__smtp_syntax__", None) == getattr(
            reference._smtp_methods[verb], "__smtp_syntax__", None
        )
    assert set(session._auth_methods) == set(reference._auth_methods)
    assert session._handle_hooks == reference._handle_hooks
    # Everything SMTP.__init__ sets is there (the gateway's own attributes come on top).
    assert set(vars(reference)) <= set(vars(session))


def test_command_lines_are_masked_and_logged_only_at_a_logged_level(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiosmtpd logs every command line through its module's sanitized_log (gateway/smtp/protocol.py wraps
    it): at a level its logger writes, the line is masked and logged as before; below it, not even masked."""
    import logging

    import aiosmtpd.smtp

    masked: list[bytes] = []
    original = aiosmtpd.smtp.sanitize

    def counting(text: bytes) -> bytes:
        masked.append(text)
        return original(text)

    monkeypatch.setattr(aiosmtpd.smtp, "sanitize", counting)
    log = logging.getLogger("mail.log")
    line = b"AUTH PLAIN AGJlbmNoAHNlY3JldA==\r\n"
    with caplog.at_level(logging.ERROR, logger="mail.log"):
        aiosmtpd.smtp.sanitized_log(log.info, "%r >> %r", ("127.0.0.1", 1), line)
    assert (masked, caplog.records) == ([], [])
    with caplog.at_level(logging.INFO, logger="mail.log"):
        aiosmtpd.smtp.sanitized_log(log.debug, "readline: %r", line)
        aiosmtpd.smtp.sanitized_log(log.info, "%r >> %r", ("127.0.0.1", 1), line)
    assert masked == [line]
    assert [r.getMessage() for r in caplog.records] == ["('127.0.0.1', 1) >> b'AUTH PLAIN ********\\r\\n'"]
