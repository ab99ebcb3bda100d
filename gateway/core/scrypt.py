"""The scrypt password hashes of configured logins (`smtp-gateway hash-password`): their format, read the
same way by the configuration check and by the login check."""

from __future__ import annotations

import base64
from dataclasses import dataclass

DKLEN = 32  # digest bytes hash-password writes
# What one verification may take (scrypt needs about 128 x N x r bytes).
MAXMEM = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def parse_hash(stored: str) -> ScryptHash:
    """The parts of a hash as `smtp-gateway hash-password` writes it. Raises ValueError saying what is wrong
    with it (cut short when copied, edited, another scheme), never quoting it: it is a secret too."""
    fields = stored.strip().split("$")
    if fields[0] != "scrypt":
        raise ValueError("is not a hash made by `smtp-gateway hash-password` (those start with 'scrypt$')")
    if len(fields) != 6:
        raise ValueError(f"has {len(fields)} of the 6 '$'-separated parts of a hash: it was cut short or edited")
    _, n, r, p, salt, digest = fields
    if (
        not (n.isdigit() and r.isdigit() and p.isdigit())
        or int(n) < 2
        or int(n) & (int(n) - 1)
        or not int(r)
        or not int(p)
    ):
        raise ValueError("has cost parameters that are not scrypt's (N a power of 2, r and p 1 or more)")
    if 128 * int(n) * int(r) > MAXMEM:
        raise ValueError(f"asks for more than {MAXMEM // 2**20} MiB of memory per login (N x r too high)")
    try:
        salt_bytes = base64.b64decode(salt, validate=True)
        digest_bytes = base64.b64decode(digest, validate=True)
    except ValueError:
        raise ValueError("has a salt or digest that is not base64: it was cut short or edited") from None
    if len(digest_bytes) != DKLEN or not salt_bytes:
        raise ValueError(f"has a digest of {len(digest_bytes)} bytes instead of {DKLEN}: it was cut short or edited")
    return ScryptHash(int(n), int(r), int(p), salt_bytes, digest_bytes)
