"""aiosmtpd's `SMTP.__init__` for a new connection without its introspection: the method tables it builds
with `inspect.getmembers` and `dir` on every connection are computed once per protocol class and handler.

It sets exactly the attributes aiosmtpd 1.4's `SMTP.__init__` sets, to the same values (its AUTH mechanism
table, its hook table, its command table, its call limits); tests/test_smtp_fastinit.py builds a session both
ways and compares them, so an aiosmtpd upgrade that changes its constructor fails there first. What it leaves
out is the per-connection "Available AUTH mechanisms" debug line of aiosmtpd's logger.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import ssl
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import FunctionType, MethodType
from typing import Any
from warnings import warn

from aiosmtpd.smtp import CALL_LIMIT_DEFAULT, DATA_SIZE_DEFAULT, login_always_fail
from aiosmtpd.smtp import __ident__ as AIOSMTPD_IDENT
from aiosmtpd.smtp import _AuthMechAttr as AuthMechAttr

# aiosmtpd's own logger: its warnings about a TLS context that verifies clients go where they always went.
_aiosmtpd_log = logging.getLogger("mail.log")

# A command method's wrapper (applied once per class): takes the function, returns the function to bind.
Wrap = Callable[[str, FunctionType], FunctionType]


@dataclass(frozen=True, slots=True)
class _HandlerTables:
    hooks: dict[str, Callable[..., Any]]
    ehlo_version: str | None
    # mechanism -> the handler's bound method (is_builtin False), or the protocol class's function to bind
    # to each session (is_builtin True)
    auth: dict[str, tuple[Any, bool]]


def _mechanism(name: str, member: Any) -> str:
    return str(getattr(member, "__auth_mechanism_name__", name.replace("auth_", "").replace("__", "-")))


def _methods(cls: type, prefix: str) -> list[tuple[str, Any]]:
    """The class's attributes named `prefix...`, as an instance would see them (functions unbound)."""
    return [(name, getattr(cls, name)) for name in dir(cls) if name.startswith(prefix)]


def _handler_tables(cls: type, handler: Any) -> _HandlerTables:
    hooks = {name.replace("handle_", ""): getattr(handler, name) for name in dir(handler) if name.startswith("handle_")}
    ehlo = hooks.get("EHLO")
    version: str | None = None
    if ehlo is not None:
        count = len(inspect.signature(ehlo).parameters)
        if count == 4:
            version = "old"
            warn(
                "Use the 5-argument handle_EHLO() hook instead of the 4-argument handle_EHLO() hook; "
                "support for the 4-argument handle_EHLO() hook will be removed in version 2.0",
                DeprecationWarning,
                stacklevel=3,
            )
        elif count == 5:
            version = "new"
        else:
            raise RuntimeError("Unsupported EHLO Hook")
    # As aiosmtpd: the protocol's own mechanisms first, the handler's replace those of the same name.
    auth: dict[str, tuple[Any, bool]] = {
        _mechanism(name, member): (member, True) for name, member in _methods(cls, "auth_")
    }
    auth.update(
        {
            _mechanism(name, member): (member, False)
            for name, member in inspect.getmembers(handler)
            if name.startswith("auth_")
        }
    )
    return _HandlerTables(hooks, version, auth)


class MethodTables:
    """The tables of one protocol class, per handler (weakly: a handler replaced by a reload goes)."""

    def __init__(self, cls: type, wrap: Wrap | None = None) -> None:
        self.cls = cls
        commands = []
        for name, member in _methods(cls, "smtp_"):
            verb = name.replace("smtp_", "")
            if wrap is not None and isinstance(member, FunctionType):
                member = wrap(verb, member)
            commands.append((verb, member))
        self.commands: tuple[tuple[str, Any], ...] = tuple(commands)
        self._handlers: weakref.WeakKeyDictionary[Any, _HandlerTables] = weakref.WeakKeyDictionary()
        self._by_id: dict[int, _HandlerTables] = {}  # handlers that cannot be weakly referenced (tests' objects)

    def for_handler(self, handler: Any) -> _HandlerTables:
        try:
            found = self._handlers.get(handler)
        except TypeError:
            found = self._by_id.get(id(handler))
            if found is None:
                found = self._by_id[id(handler)] = _handler_tables(self.cls, handler)
            return found
        if found is None:
            found = self._handlers[handler] = _handler_tables(self.cls, handler)
        return found


def _bind(member: Any, proto: Any) -> Any:
    return MethodType(member, proto) if isinstance(member, FunctionType) else member


def init_session(
    proto: Any,
    tables: MethodTables,
    handler: Any,
    *,
    data_size_limit: int | None = DATA_SIZE_DEFAULT,
    enable_SMTPUTF8: bool = False,
    decode_data: bool = False,
    hostname: str | None = None,
    ident: str | None = None,
    tls_context: ssl.SSLContext | None = None,
    require_starttls: bool = False,
    timeout: float = 300,
    auth_required: bool = False,
    auth_require_tls: bool = True,
    auth_exclude_mechanism: Iterable[str] | None = None,
    auth_callback: Callable[[str, bytes, bytes], bool] | None = None,
    command_call_limit: int | dict[str, int] | None = None,
    authenticator: Any = None,
    proxy_protocol_timeout: float | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
    reader: type[asyncio.StreamReader] = asyncio.StreamReader,
) -> None:
    """What `SMTP.__init__(proto, handler, **options)` does, with the tables from `tables` (and the session's
    StreamReader of class `reader`)."""
    proto.__ident__ = ident or AIOSMTPD_IDENT
    proto.loop = loop if loop else asyncio.get_event_loop()
    asyncio.StreamReaderProtocol.__init__(
        proto,
        reader(loop=proto.loop, limit=proto.line_length_limit),
        client_connected_cb=proto._cb_client_connected,
        loop=proto.loop,
    )
    proto.event_handler = handler
    assert data_size_limit is None or isinstance(data_size_limit, int)
    proto.data_size_limit = data_size_limit
    proto.enable_SMTPUTF8 = enable_SMTPUTF8
    proto._decode_data = decode_data
    proto.hostname = hostname if hostname else socket.getfqdn()
    proto.tls_context = tls_context
    if tls_context:
        if tls_context.verify_mode not in {ssl.CERT_NONE, ssl.CERT_OPTIONAL}:
            _aiosmtpd_log.warning(
                "tls_context.verify_mode not in {CERT_NONE, CERT_OPTIONAL}; this might cause client connection problems"
            )
        elif tls_context.check_hostname:
            _aiosmtpd_log.warning("tls_context.check_hostname == True; this might cause client connection problems")
    proto.require_starttls = tls_context and require_starttls
    proto._timeout_duration = timeout
    proto._timeout_handle = None
    proto._tls_handshake_okay = True
    proto._tls_protocol = None
    proto._original_transport = None
    proto.session = None
    proto.envelope = None
    proto.transport = None
    proto._handler_coroutine = None
    if not auth_require_tls and auth_required:
        warn("Requiring AUTH while not requiring TLS can lead to security vulnerabilities!", stacklevel=2)
        _aiosmtpd_log.warning("auth_required == True but auth_require_tls == False")
    proto._auth_require_tls = auth_require_tls
    if proxy_protocol_timeout is not None:
        if proxy_protocol_timeout <= 0:
            raise ValueError("proxy_protocol_timeout must be > 0")
        if proxy_protocol_timeout < 3.0:
            _aiosmtpd_log.warning("proxy_protocol_timeout < 3.0")
    proto._proxy_timeout = proxy_protocol_timeout
    if authenticator is not None:
        proto._authenticator = authenticator
        proto._auth_callback = None
    else:
        proto._auth_callback = auth_callback or login_always_fail
        proto._authenticator = None
    proto._auth_required = auth_required

    found = tables.for_handler(handler)
    excluded = set(auth_exclude_mechanism or ())
    proto._auth_methods = {
        name: AuthMechAttr(_bind(member, proto) if builtin else member, builtin)
        for name, (member, builtin) in found.auth.items()
        if name not in excluded
    }
    proto._handle_hooks = dict(found.hooks)
    proto._ehlo_hook_ver = found.ehlo_version
    proto._smtp_methods = {verb: _bind(member, proto) for verb, member in tables.commands}

    if command_call_limit is None:
        proto._enforce_call_limit = False
    else:
        proto._enforce_call_limit = True
        if isinstance(command_call_limit, int):
            proto._call_limit_base = {}
            proto._call_limit_default = command_call_limit
        elif isinstance(command_call_limit, dict):
            if not all(isinstance(v, int) for v in command_call_limit.values()):
                raise TypeError("All command_call_limit values must be int")
            proto._call_limit_base = command_call_limit
            proto._call_limit_default = command_call_limit.get("*", CALL_LIMIT_DEFAULT)
        else:
            raise TypeError("command_call_limit must be int or Dict[str, int]")
