"""The vendors' event answers read tolerantly from their wire tables (pure: no HTTP): every candidate name, the
vendor's own time zone, unknown event names counted, unreadable rows counted, more pages told by a full page or
a total; stable event ids; and the requests' parameters as the tables name them."""

from __future__ import annotations

from datetime import UTC
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest

from gateway.core.errors import GatewayError, UpstreamAuthFailed, UpstreamUnavailable
from gateway.core.events import event_id, zone
from gateway.providers.dengage import eventwire as dengage
from gateway.providers.dengage import wire as dengage_wire
from gateway.providers.dmds import eventwire as dmds
from gateway.upstream.response import HttpResponse
from gateway.upstream.shape import Reading

BA = zone("America/Argentina/Buenos_Aires")  # UTC-3 all year


def answer(data: object, status: int = 200) -> HttpResponse:
    return HttpResponse(status, orjson.dumps(data), {})


def test_dmds_events_in_either_spelling_and_in_the_vendors_zone() -> None:
    rows = [
        {"evento": "envio", "email": "a@example.com", "timestamp": "2026-01-02T10:00:00", "eeid": "E1"},
        {"Event": "rebote-hard", "Contacto": "b@example.com", "fecha": "2026-01-02 10:00:05", "envio_efectivo_id": "E1",
         "motivo": "550 no such user", "campania": "VIMS"},
        {"tipo": "Not-Sent", "destinatario": "c@example.com", "timestamp": 1767348000},
        {"evento": "unknown", "email": "d@example.com", "timestamp": "2026-01-02T10:00:07"},
        {"evento": "rebote_soft", "email": "e@example.com", "timestamp": "2026-01-02T10:00:08"},
        {"evento": "abuse-report", "email": "f@example.com", "timestamp": "2026-01-02T10:00:09"},
        {"evento": "envio", "timestamp": "2026-01-02T10:00:10"},  # no address
        "not an object",
    ]  # fmt: skip
    reading = Reading()
    page = dmds.read_events(answer({"status": "ok", "eventos": rows}), "acme", BA, 10, reading=reading)
    assert [(e.type, e.address, e.upstream_id) for e in page.events] == [
        ("sent", "a@example.com", "E1"),
        ("bounced", "b@example.com", "E1"),
        ("not_sent", "c@example.com", None),
        ("not_sent", "d@example.com", None),  # v1.1: Not-Sent shows as "unknown" in the API [S]
        ("soft_bounced", "e@example.com", None),
    ]
    assert page.events[0].at == 1767358800.0  # 10:00 in Buenos Aires is 13:00 UTC
    assert page.events[1].detail == "550 no such user" and page.events[1].raw_type == "rebote-hard"
    # A page with rows may be followed by another, short or not: DMDS may answer fewer rows than asked.
    assert page.unknown == {"abuse-report": 1} and page.unreadable == 2 and page.more
    assert "eventos[].address=Contacto" in reading.describe() or "eventos[].address=email" in reading.describe()
    # A bare list answers too; a full page says another may follow, a total says exactly.
    full = [{"evento": "view", "email": f"{n}@example.com", "timestamp": "2026-01-02T10:00:00"} for n in range(10)]
    assert dmds.read_events(answer(full), "acme", UTC, 10).more
    assert not dmds.read_events(answer({"eventos": full, "total": 10}), "acme", UTC, 10).more
    assert dmds.read_events(answer({"eventos": full[:5], "total": 25}), "acme", UTC, 10, number=1).more
    # The total counts rows, not pages of the asked size: 5 read before and 5 now of 10 ends the window.
    assert not dmds.read_events(answer({"eventos": full[:5], "total": 10}), "acme", UTC, 10, 1, before=5).more
    assert dmds.read_events(answer({"eventos": full[:5], "total": 25}), "acme", UTC, 10, 1, before=5).more


def test_an_event_read_twice_has_the_same_id_and_the_vendors_id_wins() -> None:
    row = {"evento": "envio", "email": "A@Example.com", "timestamp": "2026-01-02T10:00:00", "eeid": "E1"}
    first = dmds.read_events(answer([row]), "acme", UTC, 10).events[0]
    again = dmds.read_events(answer([{**row, "email": "a@example.com"}]), "acme", UTC, 10).events[0]
    assert first.id == again.id
    other = dmds.read_events(answer([row]), "other-account", UTC, 10).events[0]
    assert other.id != first.id
    named = dmds.read_events(answer([{**row, "id": 99}]), "acme", UTC, 10).events[0]
    assert named.id == event_id("acme", "id", 99)


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (403, {"status": "err", "on": "APIKEY invalida"}, UpstreamAuthFailed),
        (404, {"detail": "Not Found"}, UpstreamUnavailable),
        (302, [], UpstreamUnavailable),  # a redirect (not followed) is no page, however its body reads
        (200, {"status": "err", "on": "pagina y cantidad deben ser numericos"}, UpstreamUnavailable),
        (200, {"status": "ok", "eventos": "none"}, UpstreamUnavailable),
        # a list under a name no table knows: not an empty page (the cursor would move past its events)
        (200, {"status": "ok", "registros": [{"evento": "rebote-hard"}]}, UpstreamUnavailable),
        (200, {"status": "ok"}, UpstreamUnavailable),
    ],
)
def test_dmds_answers_a_poll_waits_out(status: int, body: object, error: type[GatewayError]) -> None:
    with pytest.raises(error):
        dmds.read_events(answer(body, status), "acme", UTC, 10)


def test_an_unrecognised_event_page_says_the_keys_it_had_and_an_empty_list_is_an_empty_page() -> None:
    with pytest.raises(UpstreamUnavailable, match="keys: registros, status"):
        dmds.read_events(answer({"status": "ok", "registros": []}), "acme", UTC, 10)
    with pytest.raises(UpstreamUnavailable, match="keys: filas, total"):
        dengage.read_report({"code": 0, "data": {"filas": [], "total": 0}}, "crm", UTC, 100)
    with pytest.raises(UpstreamUnavailable, match="keys: code, filas"):
        dengage.read_report({"code": 0, "filas": []}, "crm", UTC, 100)
    with pytest.raises(UpstreamUnavailable, match="keys: message"):
        dengage.read_report({"message": "Success"}, "crm", UTC, 100)  # no code: nothing says it succeeded
    for page in (
        # The envelope alone, code 0 (report_data checked it): no rows anywhere, an empty page (review vendors3 F9).
        dengage.read_report({"code": 0, "message": "Success"}, "crm", UTC, 100),
        dengage.read_report({"code": 0, "data": None}, "crm", UTC, 100),
        dengage.read_report({"Code": 0, "Data": None, "Message": "ok"}, "crm", UTC, 100),
        dmds.read_events(answer({"status": "ok", "eventos": []}), "acme", UTC, 10),
        dmds.read_events(answer([]), "acme", UTC, 10),
        dengage.read_report({"code": 0, "data": {"items": [], "totalCount": 0}}, "crm", UTC, 100),
        dengage.read_report({"code": 0, "data": []}, "crm", UTC, 100),
    ):
        assert page.events == [] and not page.more


def test_the_dmds_request_names_the_window_and_page_as_the_table_says() -> None:
    body = dmds.events_body(1767358800.0, 1767362400.0, 0, 50, BA)
    assert body == {"desde": "2026-01-02 10:00:00", "hasta": "2026-01-02 11:00:00", "pagina": 1, "cantidad": 50}


def test_dmds_contacts_and_whitelist_in_the_shapes_seen() -> None:
    assert dmds.read_contacts(answer({"status": "ok", "contactos": [{"email": "a@x.com"}, "b@x.com", {"x": 1}]})) == [
        "a@x.com",
        "b@x.com",
    ]
    assert dmds.read_contacts(answer([{"Email": "c@x.com", "invalido": True}])) == ["c@x.com"]
    assert dmds.read_whitelisted(answer({"status": "ok", "msg": "a@x.com whitelisted"}), "a@x.com")
    assert not dmds.read_whitelisted(answer({"status": "ok", "msg": "a@x.com not whitelisted"}), "a@x.com")
    assert not dmds.read_whitelisted(answer({"status": "err", "msg": "a@x.com not found"}, 404), "a@x.com")
    with pytest.raises(UpstreamUnavailable):
        dmds.read_whitelisted(answer({"status": "ok"}), "a@x.com")


@pytest.mark.parametrize(
    "response",
    [
        HttpResponse(404, b"<h1>Not Found</h1>", {"content-type": "text/html"}),
        HttpResponse(404, b"", {}),
        answer({"detail": "Not Found"}, 404),
        answer({}, 404),
    ],
)
def test_dmds_whitelist_404_that_is_no_dmds_answer_is_unknown_not_not_whitelisted(response: HttpResponse) -> None:
    """The whitelist path is [I]: a wrong one answers 404 to every check. Read as "not on it", a whitelisted
    contact that bounced would be suppressed (the gateway refusing mail DMDS would send); unknown instead,
    so nothing is suppressed until the check can be read (docs/unconfirmed.md)."""
    with pytest.raises(UpstreamUnavailable, match="404"):
        dmds.read_whitelisted(response, "a@x.com")


def test_dengage_report_rows_in_either_envelope_and_spelling() -> None:
    rows = [
        {"transactionId": "T1", "email": "a@example.com", "eventType": "Delivered", "eventDate": "2026-01-02 10:00:00"},
        {"TrackingId": "T2", "ToEmail": "b@example.com", "Status": "Bounced", "EventTime": "2026-01-02T10:00:05Z",
         "BounceReason": "mailbox unknown"},
        {"transactionId": "T3", "email": "c@example.com", "eventType": "Soft Bounce",
         "eventDate": "2026-01-02 10:01:00"},
        {"transactionId": "T4", "email": "d@example.com", "eventType": "Forwarded", "eventDate": "2026-01-02 10:01:00"},
        {"transactionId": "T5", "eventType": "Clicked", "eventDate": "2026-01-02 10:01:00"},
    ]  # fmt: skip
    page = dengage.read_report({"code": 0, "data": {"items": rows, "totalCount": 5}}, "crm", UTC, 100)
    assert [(e.type, e.address, e.upstream_id) for e in page.events] == [
        ("delivered", "a@example.com", "T1"),
        ("bounced", "b@example.com", "T2"),
        ("soft_bounced", "c@example.com", "T3"),
    ]
    assert page.events[1].detail == "mailbox unknown" and page.events[1].at == 1767348005.0
    assert page.unknown == {"Forwarded": 1} and page.unreadable == 1 and not page.more
    assert dengage.read_report({"code": 0, "data": rows}, "crm", UTC, 5).more  # a bare list, full
    assert dengage.read_report(rows, "crm", UTC, 100).events  # no envelope at all


def test_dengage_report_request_and_its_failures() -> None:
    path = dengage.report_path(1767358800.0, 1767362400.0, 2, 100, "smtp-gateway", UTC)
    parts = urlsplit(path)
    assert parts.path == "/transactional/email/report"
    assert parse_qs(parts.query) == {
        "beginTime": ["2026-01-02 13:00:00"],
        "endTime": ["2026-01-02 14:00:00"],
        "limit": ["100"],
        "offset": ["200"],
        "tag": ["smtp-gateway"],
    }
    assert "tag=" not in dengage.report_path(0, 1, 0, 100, "", UTC)
    with pytest.raises(UpstreamUnavailable):
        dengage.report_data(answer({"code": 5, "message": "range too long"}), dengage_wire.check_status)
    with pytest.raises(UpstreamUnavailable):
        dengage.report_data(answer({"Code": 5, "Message": "range too long"}), dengage_wire.check_status)
    with pytest.raises(UpstreamAuthFailed):
        dengage.report_data(answer({"message": "Not auhenticated"}, 401), dengage_wire.check_status)
