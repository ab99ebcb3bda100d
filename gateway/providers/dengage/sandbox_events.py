"""The dEngage sandbox's transactional email report, answered from what its sends recorded
(gateway/providers/fates.py), with the names of the gateway's wire table (eventwire.REPORT_WIRE: the
parameters are the vendor's [V], the path and the answer's keys our inference, so the sandbox and the
gateway agree by construction; docs/after-250.md says what dEngage itself may name otherwise).

    GET /rest/transactional/email/report?beginTime=&endTime=&tag=&limit=&offset=
        behind the same allowlist, rate limit and bearer token as the sends; at most 7 days per query,
        limit 100 to 1000 [V]; the events of sends that carried `tag` (any send without one), oldest first
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.providers.dengage.eventwire import MAX_WINDOW, REPORT_WIRE
from gateway.providers.fates import Recorded
from gateway.providers.sandbox import Sandbox, json_response

Entry = Callable[[str, web.Request], dict[str, Any]]
Gate = Callable[[web.Request, dict[str, Any]], web.Response | None]
Refused = Callable[..., web.Response]


def record_send(sandbox: Sandbox, body: dict[str, Any], transactional_id: str) -> None:
    tags = [t for t in body.get("tags") or () if isinstance(t, str)]
    sandbox.state.fates.sent("dengage", transactional_id, [str(body["send"]["to"])], tags)


def _row(e: Recorded) -> dict[str, Any]:
    row: dict[str, Any] = {
        "transactionId": e.upstream_id,
        "email": e.address,
        "eventType": e.name,
        "eventDate": datetime.fromtimestamp(int(e.at), UTC).strftime(REPORT_WIRE["datetime"]),
    }
    if e.detail:
        row["description"] = e.detail
    return row


def _time(text: str | None) -> int | None:
    try:
        return int(datetime.strptime(text or "", REPORT_WIRE["datetime"]).replace(tzinfo=UTC).timestamp())
    except ValueError:
        return None


def install_events(
    sandbox: Sandbox,
    entry_for: Entry,
    gate: Gate,
    authenticated: Callable[[web.Request], bool],
    refused: Refused,
    fault_body: Callable[[str, int], web.Response],
    not_authenticated: str,
) -> None:
    fates = sandbox.state.fates
    sandbox.polls.add(("dengage", "report"))  # read on a timer by the return path

    async def report(request: web.Request) -> web.StreamResponse:
        entry = entry_for("report", request)
        entry["query"] = dict(request.query)
        if (early := await sandbox.apply_fault(request, entry, fault_body)) is not None:
            return early
        if (early := gate(request, entry)) is not None:
            return early
        if not authenticated(request):
            return sandbox.answer(entry, refused(not_authenticated, 401, code=401), error=not_authenticated)
        q = request.query
        since, until = _time(q.get(REPORT_WIRE["since"])), _time(q.get(REPORT_WIRE["until"]))
        try:
            limit, offset = int(q.get(REPORT_WIRE["limit"], "100")), int(q.get(REPORT_WIRE["offset"], "0"))
        except ValueError:
            limit, offset = -1, -1
        if since is None or until is None:
            problem = "beginTime and endTime must be yyyy-MM-dd HH:mm:ss"
        elif until - since > MAX_WINDOW:
            problem = "The date range cannot be longer than 7 days"
        elif not 100 <= limit <= 1000 or offset < 0:
            problem = "limit must be between 100 and 1000, offset at least 0"
        else:
            problem = ""
        if problem:
            return sandbox.answer(entry, refused(problem), error=problem)
        assert since is not None and until is not None
        found = fates.window("dengage", since, until, q.get(REPORT_WIRE["tag"]))
        items = [_row(e) for e in found[offset : offset + limit]]
        entry["events"] = len(items)
        answer = {"code": 0, "message": "Success", "data": {"totalCount": len(found), "items": items}}
        shown = {**answer, "data": {"totalCount": len(found), "items": len(items)}}
        return sandbox.answer(entry, json_response(answer), response_body=shown)

    sandbox.app.router.add_get("/rest" + REPORT_WIRE["report"], report)
