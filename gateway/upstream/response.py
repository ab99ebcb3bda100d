"""Pure: an upstream's HTTP answer as the providers' wire modules read it (no HTTP client imported)."""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import orjson


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
        """Seconds from `now` the upstream asks us to wait (Retry-After: seconds or an HTTP date)."""
        value = self.headers.get("retry-after", "").strip()
        if not value:
            return None
        if value.isdigit():
            return float(value)
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - now)
        except (TypeError, ValueError):
            return None
