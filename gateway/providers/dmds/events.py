"""DMDS' events and contacts for the return path: `ver_eventos` pages by time window, the invalid contacts and
the whitelist, each call through the account's HTTP client and rate limiter (the ones its sends use)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import orjson
import structlog

from gateway.core.cache import AsyncCache, Fresh
from gateway.core.events import EventPage, zone
from gateway.providers.dmds import eventwire
from gateway.providers.dmds.config import DmdsAccount
from gateway.upstream.client import HttpClient
from gateway.upstream.ratelimit import RateLimiter
from gateway.upstream.shape import Reading

log = structlog.get_logger("gateway.dmds")

# DMDS documents no longest window; a day keeps each window's pages few.
MAX_WINDOW = 24 * 3600.0
# How long a whitelist answer is kept: a bounce storm of one address asks DMDS once.
WHITELIST_TTL = 3600.0
WHITELIST_CACHED = 10_000


class DmdsEvents:
    """The account's EventSource (gateway/core/events.py) and Contacts."""

    def __init__(
        self,
        account: str,
        settings: DmdsAccount,
        http: HttpClient,
        limiter: RateLimiter,
        headers: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.account = account
        self.settings = settings
        self.http = http
        self.limiter = limiter
        self.headers = dict(headers)
        self.tz = zone(settings.events.timezone)
        self._whitelist: AsyncCache[str, bool] = AsyncCache(WHITELIST_CACHED, clock=clock)
        self._described = False

    @property
    def max_window(self) -> float:
        return MAX_WINDOW

    async def page(self, since: float, until: float, number: int) -> EventPage:
        size = self.settings.events.page_size
        body = orjson.dumps(eventwire.events_body(since, until, number, size, self.tz))
        response = await self.http.request(
            "ver_eventos",
            eventwire.EVENT_WIRE["events_method"],
            eventwire.EVENT_WIRE["events"],
            headers=self.headers,
            content=body,
            limiter=self.limiter,
        )
        reading = Reading()
        page = eventwire.read_events(response, self.account, self.tz, size, number, reading)
        if not self._described and page.events:
            # How the answer was understood, once: the names are unconfirmed (eventwire.EVENT_WIRE).
            self._described = True
            log.info("dmds_events_read", account=self.account, read=reading.describe())
        return page

    async def invalid(self) -> list[str]:
        response = await self.http.request(
            "contactos_invalidos", "GET", eventwire.EVENT_WIRE["invalid"], headers=self.headers, limiter=self.limiter
        )
        return eventwire.read_contacts(response)

    async def whitelisted(self, address: str) -> bool:
        key = address.strip().lower()
        return await self._whitelist.get(key, lambda: self._look_up(key))

    async def _look_up(self, address: str) -> Fresh[bool]:
        path = eventwire.EVENT_WIRE["whitelist"].format(email=address)
        response = await self.http.request("whitelist", "GET", path, headers=self.headers, limiter=self.limiter)
        return Fresh(eventwire.read_whitelisted(response, address), WHITELIST_TTL)
