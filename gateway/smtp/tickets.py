"""TLS session-ticket keys shared by the worker processes of `serve --workers N`.

OpenSSL gives every SSLContext random ticket keys of its own, so a ticket one worker issued cannot be read by
another: with N workers behind one port (SO_REUSEPORT), a client's next connection resumes its TLS session
only when the kernel happens to give it to the same worker (about 1 in N). The supervisor makes one secret,
hands it to each worker through a pipe, and each worker sets keys derived from it (per TLS profile) on every
server context it builds, so any worker resumes any worker's sessions.

Python's ssl module has no call for ticket keys: this sets them with OpenSSL's SSL_CTX_ctrl
(SSL_CTRL_SET_TLSEXT_TICKET_KEYS) through ctypes, on the SSL_CTX that CPython's SSLContext object holds right
after its object header. tests/test_tls_tickets.py checks that a session issued under one context resumes
under another with the same keys, and not without, so a Python or OpenSSL that lays this out otherwise is
caught there; where the call is not available the contexts keep OpenSSL's own keys (resumption per worker).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import ssl

# OpenSSL's ssl.h: SSL_CTRL_SET_TLSEXT_TICKET_KEYS and the keys' size (16 name + 32 HMAC + 32 AES).
_SET_TICKET_KEYS = 59
_GET_TICKET_KEYS = 58
KEYS_SIZE = 80
SECRET_SIZE = 32

_secret: bytes | None = None


class TicketKeysUnavailable(Exception):
    """This Python or OpenSSL does not let the keys be set."""


def _ssl_ctx_ctrl() -> ctypes._NamedFuncPointer:
    import _ssl  # the extension module linked against the libssl in use: its symbols resolve through it

    ctrl = ctypes.CDLL(_ssl.__file__).SSL_CTX_ctrl
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    ctrl.restype = ctypes.c_long
    return ctrl


def _ctx_pointer(context: ssl.SSLContext) -> int:
    """The SSL_CTX* of a CPython SSLContext: its first field after the object header."""
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer:
        raise TicketKeysUnavailable("no SSL_CTX in the SSLContext object")
    return pointer


def set_keys(context: ssl.SSLContext, keys: bytes) -> None:
    """Encrypt and accept this context's session tickets with `keys` (80 bytes)."""
    if len(keys) != KEYS_SIZE:
        raise ValueError(f"ticket keys are {KEYS_SIZE} bytes")
    try:
        ctrl = _ssl_ctx_ctrl()
    except (OSError, AttributeError) as exc:
        raise TicketKeysUnavailable(str(exc)) from None
    buffer = ctypes.create_string_buffer(keys, KEYS_SIZE)
    if ctrl(_ctx_pointer(context), _SET_TICKET_KEYS, KEYS_SIZE, buffer) != 1:
        raise TicketKeysUnavailable("SSL_CTX_ctrl refused the ticket keys")


def get_keys(context: ssl.SSLContext) -> bytes:
    """The context's ticket keys (for the tests)."""
    buffer = ctypes.create_string_buffer(KEYS_SIZE)
    if _ssl_ctx_ctrl()(_ctx_pointer(context), _GET_TICKET_KEYS, KEYS_SIZE, buffer) != 1:
        raise TicketKeysUnavailable("SSL_CTX_ctrl did not give the ticket keys")
    return buffer.raw


def derive(secret: bytes, label: str) -> bytes:
    """The keys of one kind of context (a TLS profile) from the shared secret."""
    return hashlib.shake_256(b"smtp-gateway tls tickets\0" + label.encode() + b"\0" + secret).digest(KEYS_SIZE)


def new_secret() -> bytes:
    return os.urandom(SECRET_SIZE)


def share(secret: bytes | None) -> None:
    """This process's contexts use keys derived from `secret` from now on (None: OpenSSL's own)."""
    global _secret
    _secret = secret


def apply(context: ssl.SSLContext, label: str) -> bool:
    """Set the shared keys on a new server context when this process has a secret; False when it has none
    or the keys cannot be set (the context then keeps OpenSSL's own: resumption on this process only)."""
    if _secret is None:
        return False
    try:
        set_keys(context, derive(_secret, label))
    except TicketKeysUnavailable:
        return False
    return True


def read_secret(fd: int) -> bytes:
    """The secret the supervisor wrote into the pipe `fd` (closed after)."""
    with os.fdopen(fd, "rb") as pipe:
        secret = pipe.read(SECRET_SIZE + 1)
    if len(secret) != SECRET_SIZE:
        raise ValueError(f"the ticket secret from the supervisor has {len(secret)} bytes, not {SECRET_SIZE}")
    return secret


def write_secret(secret: bytes) -> int:
    """A pipe holding `secret` for a new worker: the read end (inheritable), the write end closed."""
    read, write = os.pipe()
    try:
        os.write(write, secret)
    finally:
        os.close(write)
    os.set_inheritable(read, True)
    return read
