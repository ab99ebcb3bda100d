"""Pure: DMDS' event and contact APIs on the wire: `ver_eventos` by time window, the invalid contacts, the
whitelist. Every name in one table, tagged as in shared/upstream-apis.md ([V] vendor docs, [C] client code,
[S] the seed document only, [I] our inference); answers are read from tables of candidate names, first match
wins, so a correction is one line here (docs/after-250.md says what is unconfirmed)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import tzinfo
from typing import Any
from urllib.parse import quote

from gateway.core.errors import RateLimited, UpstreamUnavailable
from gateway.core.events import EventPage, EventType, add_event, add_unreadable, vendor_stamp
from gateway.providers.dmds.wire import key_refused
from gateway.upstream.response import HttpResponse
from gateway.upstream.shape import Reading, keys, number

EVENT_WIRE = {
    # [V] "ver_eventos ... pages through the events between two date-times; it takes four parameters"; the
    # page and its length are `pagina` and `cantidad`, numeric, "within the JSON" [V]: a JSON body, sent with
    # GET as the seed's other listings are [I]. The path, the two date-times' names and their format are in
    # a screenshot: [I].
    "events": "/v1/ver_eventos/",  # [V] method name; path [I]
    "events_method": "GET",  # [I]
    "since": "desde",  # [I]
    "until": "hasta",  # [I]
    "page": "pagina",  # [V] numeric; from 1 or from 0 [I]: events.py finds out (FIRST_PAGE, first_page)
    "size": "cantidad",  # [V] numeric, at least 10 [V]
    "datetime": "%Y-%m-%d %H:%M:%S",  # [I] the contact events show 2020-10-15T08:25:11 [S]
    "batch": "/v1/eeid/{eeid}",  # [S] path; [V] "the eeid ... can be queried later with a GET": one batch's events
    "invalid": "/v1/contactos/invalidos/",  # [V] GET: the contacts invalidated by bounces or complaints
    "whitelist": "/v1/whitelist/{email}",  # [S] method `whitelist` (GET checks, POST adds, DELETE removes); path [I]
}
FIRST_PAGE = 1  # [I] `pagina` counts from 1 until an answer shows it counts from 0 (first_page)

# The answers' key names (first match wins, letter case ignored).
EVENT_ANSWERS: dict[str, tuple[str, ...]] = {
    "status": ("status",),  # [V] "ok" on every answer shown
    "events": ("eventos", "events", "resultados", "results", "data", "items"),  # [I]; [S] contact answers use eventos
    "type": ("evento", "event", "tipo", "type"),  # [S] contact events: {"evento", "timestamp", "campania"}
    "address": ("email", "contacto", "destinatario", "mail", "to"),  # [I]
    "time": ("timestamp", "fecha_hora", "fecha", "date", "time"),  # [S] timestamp
    "eeid": ("eeid", "envio_efectivo_id", "envio_id", "batch"),  # [I]: the send answer's eeid [V]
    "id": ("id", "evento_id", "event_id", "uuid"),  # [I]
    "detail": ("detalle", "motivo", "razon", "descripcion", "diagnostico", "detail", "reason"),  # [I]
    "total": ("total", "cantidad_total", "cantidad_eventos", "count"),  # [I]
    "contacts": ("contactos", "invalidos", "contacts", "emails", "data", "items"),  # [I]
    "message": ("msg", "message"),  # [S] whitelist: {"status":"ok","msg":"x@y whitelisted"}
}
# Keys an event may have that the gateway does not read (not reported as unexpected).
EVENT_KEYS = ("campania", "campana", "campana_id", "campaign", "nombre", "apellido", "ip", "url", "user_agent")
# DMDS' event names -> the gateway's types (lower case; other names are counted and logged once).
EVENT_TYPES: Mapping[str, EventType] = {
    "envio": "sent",  # [S] contact events
    "envío": "sent",  # [I]
    "rebote-hard": "bounced",  # [V]
    "rebote_hard": "bounced",  # [S]
    "rebote-soft": "soft_bounced",  # [V]
    "rebote_soft": "soft_bounced",  # [S]
    "not-sent": "not_sent",  # [S] Not-Sent: an email to an invalid contact
    "not_sent": "not_sent",  # [I]
    "notsent": "not_sent",  # [I]
    "unknown": "not_sent",  # [S] v1.1 "displayed ... as unknown in the API, and as Not-Sent in the web interface"
    "click": "clicked",  # [V]
    "view": "opened",  # [V]
    "desuscripcion": "unsubscribed",  # [S]
    "desuscripción": "unsubscribed",  # [I]
    "invalidacion": "invalidated",  # [S] Invalidation events exist; the name [I]
    "invalidación": "invalidated",  # [I]
    "revalidacion": "revalidated",  # [S] Revalidation events exist; the name [I]
    "revalidación": "revalidated",  # [I]
    "spam": "complained",  # [I] spam feedback loops invalidate contacts [S]
    "queja": "complained",  # [I]
}


def events_body(
    since: float, until: float, page: int, size: int, tz: tzinfo, first: int = FIRST_PAGE
) -> dict[str, Any]:
    """The JSON body of one `ver_eventos` page (`page` from 0; DMDS counts from `first`)."""
    fmt = EVENT_WIRE["datetime"]
    return {
        EVENT_WIRE["since"]: vendor_stamp(since, tz, fmt),
        EVENT_WIRE["until"]: vendor_stamp(until, tz, fmt),
        EVENT_WIRE["page"]: page + first,
        EVENT_WIRE["size"]: size,
    }


def _check(response: HttpResponse, what: str) -> Any:
    """The JSON body of an answer, or the typed error a poll waits out (nothing here refuses a message)."""
    status = response.status
    key_refused(response, what)
    if status == 429:
        raise RateLimited(f"DMDS rate limit (429) on {what}", retry_after=response.retry_after(0.0))
    if status >= 300:
        # A redirect (not followed: check api_base); 404/405/400: the path or the parameters are not DMDS'
        # (they are unconfirmed: EVENT_WIRE).
        raise UpstreamUnavailable(f"DMDS answered {status} to {what}: {response.text(200)}")
    try:
        data = response.json()
    except ValueError:
        raise UpstreamUnavailable(f"DMDS answered {what} with a body that is not JSON") from None
    if isinstance(data, dict):
        state = Reading().first(data, "status", EVENT_ANSWERS["status"])
        if state is not None and str(state).lower() not in ("ok", "success"):
            raise UpstreamUnavailable(f"DMDS answered {what} with status {state!r}: {response.text(200)}")
    return data


def read_events(
    response: HttpResponse,
    account: str,
    tz: tzinfo,
    size: int,
    number: int = 0,
    reading: Reading | None = None,
    before: int | None = None,
) -> EventPage:
    """Page `number` (from 0) of `ver_eventos`: its events in the gateway's words. Rows without an address or a
    time are unreadable; names no table maps are counted by name. Another page may follow any page with rows:
    DMDS may answer fewer rows than asked (`cantidad` is [V] "at least 10", its ceiling unknown), so a short
    page ends nothing; an empty page, or the answer's total reached by the `before` rows of the window's
    earlier pages (known for page 0, and when the reader counted them), does."""
    reading = reading if reading is not None else Reading()
    data = _check(response, "ver_eventos")
    rows = data if isinstance(data, list) else reading.first(data, "events", EVENT_ANSWERS["events"])
    if rows is None and isinstance(data, dict):
        # Read as an empty page, the cursor would move past whatever events the answer held under a name no
        # table knows: the window is read again at the next poll instead (an empty list is an empty page).
        raise UpstreamUnavailable(f"DMDS answered ver_eventos with no list of events under a known name ({keys(data)})")
    if rows is None:
        rows = []
    if not isinstance(rows, list):
        raise UpstreamUnavailable("DMDS answered ver_eventos without a list of events")
    count = number_of(data)
    before = 0 if number == 0 else before
    more = bool(rows) and (count is None or before is None or before + len(rows) < count)
    page = EventPage(more=more)
    table = {k: v for k, v in EVENT_ANSWERS.items() if k in ("type", "address", "time", "eeid", "id", "detail")}
    for row in rows:
        if not isinstance(row, dict):
            add_unreadable(page, account, row)
            continue
        fields = reading.fields(row, table, "eventos[].", EVENT_KEYS)
        add_event(page, account, fields, EVENT_TYPES, tz, "eeid", str.lower)
    return page


def read_contacts(response: HttpResponse, reading: Reading | None = None) -> list[str]:
    """The invalid contacts' addresses: a list of addresses, or of contacts with an email (any shape above)."""
    reading = reading if reading is not None else Reading()
    data = _check(response, "contactos/invalidos")
    items = data if isinstance(data, list) else reading.first(data, "contacts", EVENT_ANSWERS["contacts"])
    if not isinstance(items, list):
        raise UpstreamUnavailable("DMDS answered contactos/invalidos without a list")
    out = []
    for item in items:
        value = item if isinstance(item, str) else reading.first(item, "address", EVENT_ANSWERS["address"])
        if isinstance(value, str) and "@" in value:
            out.append(value.strip())
    return out


def whitelist_path(address: str) -> str:
    """The whitelist check's path for `address`, percent-encoded: `#`, `?`, `/` and `%` are legal in a local
    part (RFC 5321 atext) and would cut the path short or change it (DMDS asked about another resource)."""
    return EVENT_WIRE["whitelist"].format(email=quote(address, safe="@"))


def read_whitelisted(response: HttpResponse, address: str) -> bool:
    """The whitelist check: `{"status":"ok","msg":"<address> whitelisted"}` or `"... not whitelisted"` [S]; a
    404 in DMDS' own JSON (with a `status`) is "not on it" [I]. Any other 404 (a page, an empty body, a
    framework's JSON) says the path is wrong ([I]): unknown, so that nothing is suppressed meanwhile."""
    if response.status == 404 and _dmds_json(response):
        return False
    data = _check(response, "whitelist")
    text = Reading().first(data, "message", EVENT_ANSWERS["message"]) if isinstance(data, dict) else None
    if isinstance(data, dict) and isinstance(data.get("whitelisted"), bool):
        return bool(data["whitelisted"])  # [I] a boolean answer
    if not isinstance(text, str):
        raise UpstreamUnavailable(f"DMDS answered the whitelist check of {address} in a shape not recognised")
    words = text.lower()
    return "whitelisted" in words and "not whitelisted" not in words


def _dmds_json(response: HttpResponse) -> bool:
    """Whether an answer is DMDS' own JSON: an object with a `status` (every answer shown has one [V])."""
    try:
        data = response.json()
    except ValueError:
        return False
    return Reading().first(data, "status", EVENT_ANSWERS["status"]) is not None


def number_of(data: Any) -> int | None:
    """The window's count of events, when the answer says it."""
    return number(Reading().first(data, "total", EVENT_ANSWERS["total"])) if isinstance(data, dict) else None


def rows_in(page: EventPage) -> int:
    """How many rows a page held: its events, its unreadable rows and those of unknown names."""
    return len(page.events) + page.unreadable + sum(page.unknown.values())


def row_ids(page: EventPage) -> frozenset[object]:
    """A page's rows by their stable ids, to tell two answers apart (the same rows, or others)."""
    return frozenset([*(e.id for e in page.events), *page.unreadable_ids, *page.unknown_ids])


def first_page(one: EventPage, zero: EventPage | None) -> int | None:
    """The number DMDS gives a window's first page, from its answers to `pagina` 1 and 0 for the same window
    (`zero` None: pagina=0 was refused, so DMDS counts from 1); None while they cannot tell.
    A DMDS counting from 1 answers pagina=0 with nothing or with page 1 again (a clamp); one counting from 0
    answers it with rows that pagina=1 (its second page) does not have, none of them. Two answers sharing some
    rows but not all tell nothing (review today8b F2): a clamp while an event landed in the window between the
    two calls, or rows of equal times in no stable order, looks so; taken as "from 0", every later window
    would be read one page deep. Undecided, the window is read from both answers (`merged`)."""
    if zero is None:
        return 1
    ones, zeros = row_ids(one), row_ids(zero)
    if not zeros:
        return 1 if ones else None
    if zeros == ones:
        return 1
    return 0 if zeros.isdisjoint(ones) else None


def merged(one: EventPage, zero: EventPage) -> EventPage:
    """The rows of both answers to a window's first page, each once (by its id), for a window whose numbering
    is undecided: pagina=0 and pagina=1 together are its first page or its first two, and the next page asked
    (pagina=2) skips nothing either way. Rows read twice are recorded once anyway (events by id, the poller's
    counts by id): this only keeps the page itself free of repeats."""
    page = EventPage(more=one.more or zero.more)
    seen: set[str] = set()
    for event in (*zero.events, *one.events):
        if event.id not in seen:
            seen.add(event.id)
            page.events.append(event)
    page.unreadable_ids = list(dict.fromkeys((*zero.unreadable_ids, *one.unreadable_ids)))
    page.unreadable = len(page.unreadable_ids)
    page.unknown_ids = list(dict.fromkeys((*zero.unknown_ids, *one.unknown_ids)))
    for name, _ in page.unknown_ids:
        page.unknown[name] = page.unknown.get(name, 0) + 1
    return page


def refused(response: HttpResponse) -> bool:
    """Whether an answer refuses the request's parameters (a 4xx but 401, 403 and 429, or DMDS' own status
    other than ok in a 2xx): pagina=0 refused, where pagina=1 of the same window was answered, says `pagina`
    counts from 1. The account's failures and a rate limit say nothing of it."""
    if 400 <= response.status < 500 and response.status not in (401, 403, 429):
        return True
    if 200 <= response.status < 300:
        try:
            data = response.json()
        except ValueError:
            return False
        state = Reading().first(data, "status", EVENT_ANSWERS["status"]) if isinstance(data, dict) else None
        return state is not None and str(state).lower() not in ("ok", "success")
    return False
