"""Pure: an upstream's HTTP answer as the providers' wire modules read it (no HTTP client imported)."""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

# The longest an upstream's Retry-After is honoured for (seconds). A 429 pauses the whole account, the
# inline calls of every session included, for as long as it asks: one `Retry-After: 86400` (a proxy's
# misconfiguration, a vendor's daily quota page) would otherwise stop the account for a day. Past this, the
# account tries again and a second 429 pauses it again.
MAX_RETRY_AFTER = 300.0


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes
    headers: dict[str, str]  # lower-cased names

    def json(self) -> Any:
        """The body as JSON. Raises ValueError when it is not JSON."""
        return orjson.loads(self.body)

    def text(self, limit: int = 300) -> str:
        return self.body[:limit].decode("utf-8", "replace")

    def retry_after(self, now: float) -> float | None:
        """Seconds from `now` the upstream asks us to wait (Retry-After: seconds or an HTTP date), at most
        MAX_RETRY_AFTER (the rate limiter logs when it meets a pause that long)."""
        value = self.headers.get("retry-after", "").strip()
        if not value:
            return None
        if value.isdigit():
            return min(float(value), MAX_RETRY_AFTER)
        try:
            return min(max(0.0, parsedate_to_datetime(value).timestamp() - now), MAX_RETRY_AFTER)
        except (TypeError, ValueError, OverflowError):
            return None
