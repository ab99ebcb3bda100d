"""Password hashes for logins listed in config: scrypt (stdlib), self-describing, never stored in clear."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections import Counter

from gateway.core.scrypt import DKLEN, MAXMEM, parse_hash

# scrypt cost: n=2**14, r=8, p=1 (tens of milliseconds of CPU). Verification runs in a thread and its
# result is cached, so the cost is paid once per credential per cache TTL, not per connection.
_N, _R, _P = 2**14, 8, 1


def hash_password(password: str, *, n: int = _N, r: int = _R, p: int = _P) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=DKLEN)
    return "$".join(("scrypt", str(n), str(r), str(p), _b64(salt), _b64(digest)))


def decoy_hash(like: list[str]) -> str:
    """A hash no password matches (random salt and digest) with the cost parameters most of `like` use (the
    default cost when none parse): verified for a login that does not exist, so that it is refused after as
    much work as a wrong password, and its timing does not tell which logins exist."""
    costs: Counter[tuple[int, int, int]] = Counter()
    for stored in like:
        try:
            parsed = parse_hash(stored)
        except ValueError:
            continue
        costs[(parsed.n, parsed.r, parsed.p)] += 1
    n, r, p = costs.most_common(1)[0][0] if costs else (_N, _R, _P)
    return "$".join(("scrypt", str(n), str(r), str(p), _b64(os.urandom(16)), _b64(os.urandom(DKLEN))))


def verify_password(password: str, stored: str) -> bool:
    try:
        parsed = parse_hash(stored)
        actual = hashlib.scrypt(
            password.encode("utf-8"),
            salt=parsed.salt,
            n=parsed.n,
            r=parsed.r,
            p=parsed.p,
            dklen=len(parsed.digest),
            maxmem=MAXMEM,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, parsed.digest)


def verify_any(password: str, stored: list[str]) -> int | None:
    """The index of the first hash in `stored` that `password` matches, or None."""
    for index, one in enumerate(stored):
        if verify_password(password, one):
            return index
    return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
