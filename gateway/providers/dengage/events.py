"""dEngage's transactional email report for the return path, by time window and the gateway's tag, each call
through the account's token, HTTP client and rate limiter (the ones its sends use)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog

from gateway.core.events import EventPage, zone
from gateway.providers.dengage import eventwire, wire
from gateway.providers.dengage.config import DengageAccount
from gateway.upstream.response import HttpResponse
from gateway.upstream.shape import Reading

log = structlog.get_logger("gateway.dengage")
T = TypeVar("T")
# One authorized call of the provider: (endpoint, method, path, parse) -> parse(answer).
Call = Callable[[str, str, str, Callable[[HttpResponse], Any]], Awaitable[Any]]


class DengageEvents:
    """The account's EventSource (gateway/core/events.py)."""

    def __init__(self, account: str, settings: DengageAccount, call: Call) -> None:
        self.account = account
        self.settings = settings
        self.call = call
        self.tz = zone(settings.events.timezone)
        self._described = False
        # The window, the next page's number and the rows of the window read before it: the next page's
        # `offset` (pages may hold fewer rows than asked), and the last page's row ids (an offset ignored).
        self._next: tuple[float, float, int, int] | None = None
        self._last: tuple[float, float, int, frozenset[object]] | None = None
        self._repeat_logged = False

    @property
    def max_window(self) -> float:
        return eventwire.MAX_WINDOW

    async def page(self, since: float, until: float, number: int) -> EventPage:
        events = self.settings.events
        known = self._next
        before = 0 if number == 0 else (known[3] if known is not None and known[:3] == (since, until, number) else None)
        # Not known (a window resumed from the cursor by another process): read from the window's start again;
        # rows read twice are harmless (the polls overlap anyway), rows skipped would be lost.
        offset = 0 if before is None else before
        path = eventwire.report_path(since, until, number, events.page_size, events.tag, self.tz, offset)
        data = await self.call("report", "GET", path, lambda r: eventwire.report_data(r, wire.check_status))
        reading = Reading()
        page = eventwire.read_report(data, self.account, self.tz, events.page_size, number, reading, offset)
        self._next = (since, until, number + 1, offset + eventwire.rows_in(page))
        ids, last = eventwire.row_ids(page), self._last
        if page.more and ids and last is not None and last[:3] == (since, until, number - 1) and last[3] == ids:
            # The same rows as the page before: dEngage does not page by `offset`; reading on would never end.
            page.more = False
            if not self._repeat_logged:
                self._repeat_logged = True
                log.warning("dengage_report_page_repeated", account=self.account, page=number)
        self._last = (since, until, number, ids)
        if not self._described and page.events:
            # How the answer was understood, once: the names are unconfirmed (eventwire.REPORT_ANSWERS).
            self._described = True
            log.info("dengage_report_read", account=self.account, read=reading.describe())
        return page
