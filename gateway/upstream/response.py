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
# The shortest pause a positive Retry-After gives (seconds): what the rate limiter pauses for a 429 naming
# none. A Retry-After of 0, or an HTTP date now or past (a proxy's "try again now", a skewed clock), names
# no pause at all and reads as absent: taken at its word, every queued retry of the message was due again at
# once, and a message was sent as fast as the upstream answered 429, for its whole lifetime.
MIN_RETRY_AFTER = 1.0
# A send's statuses that come after the request was sent and do not say it was not acted on: a 500 (the
# upstream failed somewhere in handling the call, perhaps after sending the mail; the drivers take a 500 in
# the vendor's own error JSON as "failed, not sent" first, review today8b F4), and a gateway's or load
# balancer's 502 and 504 (it forwarded the request and lost or timed out on the answer). Resending such a
# call may deliver a second copy: the ambiguous case (AnswerLost). A 503 (and a 429) is the server saying it
# did not take the request: safe to resend.
AMBIGUOUS_STATUSES = frozenset({500, 502, 504})


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
        """Seconds from `now` the upstream asks us to wait (Retry-After: seconds or an HTTP date), between
        MIN_RETRY_AFTER and MAX_RETRY_AFTER (the rate limiter logs when it meets a pause that long); None when
        it names no pause: no header, an unreadable one, 0, or a date now or past (the caller's own pause
        applies: the limiter's second, the queue's retry_schedule)."""
        value = self.headers.get("retry-after", "").strip()
        if not value:
            return None
        try:
            seconds = float(value) if value.isdigit() else parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, OverflowError):
            return None
        return bounded(seconds)


def bounded(retry_after: float | None) -> float | None:
    """An asked pause between MIN_RETRY_AFTER and MAX_RETRY_AFTER; None when it asks for none (None, 0, <0)."""
    if retry_after is None or not retry_after > 0:
        return None
    return min(max(retry_after, MIN_RETRY_AFTER), MAX_RETRY_AFTER)
