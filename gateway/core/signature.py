"""Pure: a webhook delivery's signature, `X-Gateway-Signature: t=<unix time>,v1=<hex>`, the HMAC-SHA256 of
`<t>.<body>` under the webhook's secret (docs/after-250.md#webhooks has the receiver's check)."""

from __future__ import annotations

import hashlib
import hmac

HEADER = "X-Gateway-Signature"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def header(secret: bytes, timestamp: int, body: bytes) -> str:
    """The header's value for a delivery made at `timestamp`."""
    return f"t={timestamp},v1={sign(secret, timestamp, body)}"


def valid(secret: bytes, value: str, body: bytes) -> bool:
    """Whether a header's value signs `body` under `secret` (the sandbox's receiver checks it so)."""
    fields = dict(part.split("=", 1) for part in value.split(",") if "=" in part)
    stamp = fields.get("t", "")
    if not stamp.isdigit() or "v1" not in fields:
        return False
    return hmac.compare_digest(sign(secret, int(stamp), body), fields["v1"])
