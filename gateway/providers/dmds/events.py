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
from gateway.upstream.response import HttpResponse
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
        # The number of DMDS' first page (eventwire.FIRST_PAGE is a guess: None until an answer tells).
        self._first: int | None = None
        # The window, the next page's number and the rows of the window read before it (the total's check),
        # and the last page's row ids (a DMDS that ignores `pagina` answers the same rows again).
        self._next: tuple[float, float, int, int] | None = None
        self._last: tuple[float, float, int, frozenset[object]] | None = None
        self._repeat_logged = False
        self._dropped_logged = False

    @property
    def max_window(self) -> float:
        return MAX_WINDOW

    async def _ask(self, since: float, until: float, pagina: int) -> HttpResponse:
        """One `ver_eventos` call for `pagina` as DMDS numbers it."""
        size = self.settings.events.page_size
        body = orjson.dumps(eventwire.events_body(since, until, pagina, size, self.tz, first=0))
        return await self.http.request(
            "ver_eventos",
            eventwire.EVENT_WIRE["events_method"],
            eventwire.EVENT_WIRE["events"],
            headers=self.headers,
            content=body,
            limiter=self.limiter,
        )

    async def first_page(self, since: float, until: float) -> tuple[int | None, EventPage, Reading]:
        """Which number DMDS gives a window's first page (None: cannot tell, the window has no rows), with that
        page as read: pagina=1 (the guess), then pagina=0 for the same window (eventwire.first_page)."""
        size = self.settings.events.page_size
        reading = Reading()
        one = eventwire.read_events(await self._ask(since, until, 1), self.account, self.tz, size, 0, reading)
        answer = await self._ask(since, until, 0)
        if eventwire.refused(answer):
            return 1, one, reading
        if answer.status >= 500 or answer.status in (401, 403, 429):
            # No word on pagina=0 (a failure of the moment): this window is read as pagina=1 says, and the
            # next window asks again.
            return None, one, reading
        zeros = Reading()
        zero = eventwire.read_events(answer, self.account, self.tz, size, 0, zeros)
        first = eventwire.first_page(one, zero)
        if first is None and eventwire.rows_in(zero):
            # The answers overlap without being the same rows: undecided, and both read (the next page asked
            # is pagina=2, which skips nothing whichever way DMDS counts).
            return None, eventwire.merged(one, zero), reading
        return (first, zero, zeros) if first == 0 else (first, one, reading)

    async def _decide(self, since: float, until: float) -> tuple[int | None, EventPage, Reading]:
        first, page, reading = await self.first_page(since, until)
        if first is not None:
            self._first = first
            log.info(
                "dmds_events_page_numbering",
                account=self.account,
                first=first,
                note="ver_eventos' pagina counts from this number (eventwire.FIRST_PAGE is the guess)",
            )
        return first, page, reading

    def _before(self, since: float, until: float, number: int) -> int | None:
        """The rows of the window read before page `number` (None: not known here, e.g. a window resumed
        from the cursor by another process)."""
        if number == 0:
            return 0
        known = self._next
        return known[3] if known is not None and known[:3] == (since, until, number) else None

    def _paged(self, since: float, until: float, number: int, page: EventPage) -> None:
        """Remember the rows read so far in the window, and stop a window whose pages repeat."""
        before = self._before(since, until, number)
        self._next = None if before is None else (since, until, number + 1, before + eventwire.rows_in(page))
        ids = eventwire.row_ids(page)
        last = self._last
        if page.more and ids and last is not None and last[:3] == (since, until, number - 1) and last[3] == ids:
            # DMDS answered the page before again: it does not page by `pagina` (or pages end on a repeat).
            # Reading on would never end; the window ends here and says so once.
            page.more = False
            if not self._repeat_logged:
                self._repeat_logged = True
                log.warning("dmds_events_page_repeated", account=self.account, page=number)
        self._last = (since, until, number, ids)

    async def page(self, since: float, until: float, number: int) -> EventPage:
        size = self.settings.events.page_size
        if number == 0 and self._first is None:
            # Until an answer shows how DMDS numbers its pages, each window's first page is asked both ways:
            # guessed wrong, pagina=1 of a DMDS counting from 0 is its second page, and the first would be
            # skipped (silently: a window shorter than a page reads as empty).
            first, page, reading = await self._decide(since, until)
        else:
            first = eventwire.FIRST_PAGE if self._first is None else self._first
            reading = Reading()
            response = await self._ask(since, until, number + first)
            before = self._before(since, until, number)
            page = eventwire.read_events(response, self.account, self.tz, size, number, reading, before)
            if number == 1 and first == 0 and self._repeats_first(since, until, page):
                page = await self._renumbered(since, until, size, reading, before)
        self._paged(since, until, number, page)
        if not self._described and page.events:
            # How the answer was understood, once: the names are unconfirmed (eventwire.EVENT_WIRE).
            self._described = True
            log.info("dmds_events_read", account=self.account, read=reading.describe())
        return page

    def _repeats_first(self, since: float, until: float, page: EventPage) -> bool:
        """Whether pagina=1 answered the rows pagina=0 did in this window: DMDS counts from 1 and clamps 0."""
        ids = eventwire.row_ids(page)
        last = self._last
        return bool(ids) and last is not None and last[:3] == (since, until, 0) and last[3] == ids

    async def _renumbered(
        self, since: float, until: float, size: int, reading: Reading, before: int | None
    ) -> EventPage:
        """Counting from 0 was a wrong decision (pagina=1 repeats pagina=0, review today8b F2): it is dropped
        (the next window decides again) and this window goes on from DMDS' page 2, its page 1 read already."""
        self._first = None
        if not self._dropped_logged:
            self._dropped_logged = True
            log.warning(
                "dmds_events_numbering_dropped",
                account=self.account,
                note="pagina=1 answered what pagina=0 did: ver_eventos counts from 1; the numbering is decided again",
            )
        response = await self._ask(since, until, 1 + eventwire.FIRST_PAGE)
        return eventwire.read_events(response, self.account, self.tz, size, 1, reading, before)

    async def invalid(self) -> list[str]:
        response = await self.http.request(
            "contactos_invalidos", "GET", eventwire.EVENT_WIRE["invalid"], headers=self.headers, limiter=self.limiter
        )
        return eventwire.read_contacts(response)

    async def whitelisted(self, address: str) -> bool:
        key = address.strip().lower()
        return await self._whitelist.get(key, lambda: self._look_up(key))

    async def _look_up(self, address: str) -> Fresh[bool]:
        path = eventwire.whitelist_path(address)
        response = await self.http.request("whitelist", "GET", path, headers=self.headers, limiter=self.limiter)
        return Fresh(eventwire.read_whitelisted(response, address), WHITELIST_TTL)
