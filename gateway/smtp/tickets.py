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

Rotation: a ticket (TLS 1.2's above all) carries its session's master secret encrypted under these keys, so
whoever reads them from a worker's memory can decrypt every recorded session that got a ticket under them.
The supervisor keeps each worker's pipe open and, on every SIGHUP it passes on, writes a fresh secret into
each pipe first; the contexts the worker's reload builds take it (and so do workers started later). Tickets
issued before a rotation no longer resume (a full handshake instead), as after a single process's reload,
whose new contexts have new random keys.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import ssl
import threading

# OpenSSL's ssl.h: SSL_CTRL_SET_TLSEXT_TICKET_KEYS and the keys' size (16 name + 32 HMAC + 32 AES).
_SET_TICKET_KEYS = 59
_GET_TICKET_KEYS = 58
KEYS_SIZE = 80
SECRET_SIZE = 32

_secret: bytes | None = None
_previous: bytes | None = None  # the secret before the last rotation
_updates: int | None = None  # the supervisor's pipe: a fresh secret comes through it before each SIGHUP
_lock = threading.Lock()  # contexts are built on worker threads (a reload's to_thread)


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


def share(secret: bytes | None, updates: int | None = None) -> None:
    """This process's contexts use keys derived from `secret` from now on (None: OpenSSL's own), and the
    fresh secrets that come through the pipe `updates` (see `follow`)."""
    global _secret, _previous, _updates
    with _lock:
        _secret, _previous, _updates = secret, None, updates


def apply(context: ssl.SSLContext, label: str) -> bool:
    """Set the shared keys on a new server context when this process has a secret (the newest the supervisor
    sent); False when it has none or the keys cannot be set (the context then keeps OpenSSL's own:
    resumption on this process only)."""
    secret = _newest()
    if secret is None:
        return False
    try:
        set_keys(context, derive(secret, label))
    except TicketKeysUnavailable:
        return False
    return True


def shared_secrets() -> tuple[bytes, ...]:
    """The secrets this worker shares with the others, the newest the supervisor sent first, then the one
    before it (none in a single process): the keys of the console's one-time passwords too
    (gateway/auth/onetime.py), which any worker must verify, also one issued just before a rotation."""
    newest = _newest()
    with _lock:
        return tuple(s for s in (newest, _previous) if s is not None)


def _newest() -> bytes | None:
    """This process's secret, after taking the last of those the supervisor has sent since (a rotation)."""
    global _secret, _previous, _updates
    with _lock:
        while _updates is not None:
            try:
                # Each secret is one write of fewer than PIPE_BUF bytes, so it arrives whole: a read of a
                # multiple of its size holds whole secrets only.
                chunk = os.read(_updates, SECRET_SIZE * 32)
            except BlockingIOError:
                break  # nothing new
            if len(chunk) < SECRET_SIZE:  # the supervisor is gone: no more rotations
                os.close(_updates)
                _updates = None
                break
            if chunk[-SECRET_SIZE:] != _secret:
                _previous, _secret = _secret, chunk[-SECRET_SIZE:]
        return _secret


def follow(fd: int) -> None:
    """Use the secret the supervisor wrote into the pipe `fd`, and the fresh ones it writes there later."""
    secret = read_secret(fd)
    os.set_blocking(fd, False)
    share(secret, fd)


def read_secret(fd: int) -> bytes:
    """The first secret the supervisor wrote into the pipe `fd` (left open: more may follow)."""
    secret = b""
    while len(secret) < SECRET_SIZE:
        chunk = os.read(fd, SECRET_SIZE - len(secret))
        if not chunk:
            break
        secret += chunk
    if len(secret) != SECRET_SIZE:
        raise ValueError(f"the ticket secret from the supervisor has {len(secret)} bytes, not {SECRET_SIZE}")
    return secret


def secret_pipe(secret: bytes) -> tuple[int, int]:
    """A pipe holding `secret` for a new worker: its read end (inheritable, for the worker) and its write end
    (the supervisor's, non-blocking, for the rotations: `send`)."""
    read, write = os.pipe()
    os.write(write, secret)
    os.set_inheritable(read, True)
    os.set_blocking(write, False)
    return read, write


def send(write: int, secret: bytes) -> bool:
    """A fresh secret into a worker's pipe; False when the worker is gone or not reading (its pipe full)."""
    with contextlib.suppress(BlockingIOError, BrokenPipeError):
        return os.write(write, secret) == len(secret)
    return False
