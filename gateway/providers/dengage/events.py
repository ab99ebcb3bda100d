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

    @property
    def max_window(self) -> float:
        return eventwire.MAX_WINDOW

    async def page(self, since: float, until: float, number: int) -> EventPage:
        events = self.settings.events
        path = eventwire.report_path(since, until, number, events.page_size, events.tag, self.tz)
        data = await self.call("report", "GET", path, lambda r: eventwire.report_data(r, wire.check_status))
        reading = Reading()
        page = eventwire.read_report(data, self.account, self.tz, events.page_size, number, reading)
        if not self._described and page.events:
            # How the answer was understood, once: the names are unconfirmed (eventwire.REPORT_ANSWERS).
            self._described = True
            log.info("dengage_report_read", account=self.account, read=reading.describe())
        return page
