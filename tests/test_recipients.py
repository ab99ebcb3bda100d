"""The envelope decides who receives: RCPT TO mapped onto DMDS calls (gateway/providers/dmds/legs.py)."""

from __future__ import annotations

from typing import Any

from gateway.core.model import Address
from gateway.providers.dmds.legs import Leg, plan_legs
from tests.devices_util import captured_logs, events
from tests.harness import Running
from tests.ops_util import sample
from tests.smtputil import message, send, session


def recipients_of(body: dict[str, Any]) -> list[str]:
    contacts = body.get("contactos") or [body["contacto"]]
    return (
        [c["email"] for c in contacts]
        + [c["cc_email"] for c in body.get("copia", [])]
        + [c["bcc_email"] for c in body.get("copia_oculta", [])]
    )


def deliver(gateway: Running, headers: str, rcpts: list[str]) -> tuple[int, str, list[dict[str, Any]]]:
    raw = (f"From: billing@acme.example\r\n{headers}Subject: rcpt\r\n\r\nbody\r\n").encode()
    with session(gateway) as client:
        code, text = send(client, raw, rcpts)
    return code, text, [r["body"] for r in gateway.sent]


def test_to_cc_bcc_each_get_one_copy(gateway: Running) -> None:
    code, text, bodies = deliver(
        gateway,
        "To: Ann Smith <ann@example.com>\r\nCc: Carl <carl@example.com>\r\n",
        ["ann@example.com", "carl@example.com", "hidden@example.com"],
    )
    assert code == 250, text
    [body] = bodies
    assert body["contacto"] == {"email": "ann@example.com", "nombre": "Ann", "apellido": "Smith"}
    assert body["copia"] == [{"cc_email": "carl@example.com", "cc_nombre": "Carl"}]
    assert body["copia_oculta"] == [{"bcc_email": "hidden@example.com"}]
    assert text == f"2.0.0 Ok: queued as {gateway.sent[0]['upstream_id']}"


def test_header_only_addresses_get_nothing(gateway: Running) -> None:
    code, text, bodies = deliver(
        gateway, "To: ann@example.com, bob@example.com\r\nCc: carl@example.com\r\n", ["bob@example.com"]
    )
    assert code == 250, text
    assert [recipients_of(b) for b in bodies] == [["bob@example.com"]]


def test_several_to_use_a_second_call_in_the_same_batch(gateway: Running) -> None:
    code, text, bodies = deliver(
        gateway,
        "To: a@example.com, b@example.com, c@example.com\r\nCc: d@example.com\r\n",
        ["a@example.com", "b@example.com", "c@example.com", "d@example.com", "e@example.com"],
    )
    assert code == 250, text
    first, second = bodies
    assert first["contacto"]["email"] == "a@example.com"
    assert first["copia"] == [{"cc_email": "d@example.com"}]
    assert first["copia_oculta"] == [{"bcc_email": "e@example.com"}]
    assert "reuse_eeid" not in first
    assert [c["email"] for c in second["contactos"]] == ["b@example.com", "c@example.com"]
    first_eeid = gateway.sent[0]["upstream_id"]
    assert (second["reuse_eeid"], second["eeid"]) == (True, first_eeid)
    # Bcc never rides on a call whose contacts could see it, and no address gets two copies.
    assert "copia" not in second
    assert "copia_oculta" not in second
    everyone = recipients_of(first) + recipients_of(second)
    assert sorted(everyone) == sorted(set(everyone))
    assert text == f"2.0.0 Ok: queued as {first_eeid}"
    assert [r["path"] for r in gateway.sent] == ["/v1/envio/send_one_inline/", "/v1/envio/send_many_inline/"]


def test_several_to_without_cc_is_one_call(gateway: Running) -> None:
    code, text, bodies = deliver(gateway, "To: a@example.com, b@example.com\r\n", ["a@example.com", "b@example.com"])
    assert code == 250, text
    [body] = bodies
    assert [c["email"] for c in body["contactos"]] == ["a@example.com", "b@example.com"]


def test_no_to_in_envelope_makes_each_copy_private(gateway: Running) -> None:
    code, text, bodies = deliver(
        gateway, "To: list@example.com\r\nCc: carl@example.com\r\n", ["carl@example.com", "blind@example.com"]
    )
    assert code == 250, text
    [body] = bodies
    assert [c["email"] for c in body["contactos"]] == ["carl@example.com", "blind@example.com"]
    assert "copia" not in body
    assert "copia_oculta" not in body


def test_no_header_recipients_at_all(gateway: Running) -> None:
    with session(gateway) as client:
        code, text = send(client, message().replace(b"To: client@example.com\r\n", b""), ["x@example.com"])
    assert code == 250, text
    assert gateway.sent[0]["body"]["contacto"] == {"email": "x@example.com"}


def test_repeated_rcpt_gets_one_copy(gateway: Running) -> None:
    code, text, bodies = deliver(gateway, "To: a@example.com\r\n", ["a@example.com", "A@example.com"])
    assert code == 250, text
    assert [recipients_of(b) for b in bodies] == [["a@example.com"]]


def test_plan_legs_table() -> None:
    to = (Address("a@x.example", "A"), Address("b@x.example"))
    cc = (Address("c@x.example", "C"),)
    legs = plan_legs(["a@x.example", "b@x.example", "c@x.example", "z@x.example"], to, cc)
    assert legs == (
        Leg(0, (Address("a@x.example", "A"),), (Address("c@x.example", "C"),), (Address("z@x.example"),)),
        Leg(1, (Address("b@x.example"),)),
    )
    assert plan_legs([], to, cc) == ()
    # A Bcc address that also appears in To/Cc by name is still only that one copy.
    assert plan_legs(["c@x.example"], (), cc) == (Leg(0, (Address("c@x.example", "C"),)),)


def test_plan_legs_one_contact_per_call() -> None:
    to = (Address("a@x.example", "A"), Address("b@x.example"), Address("d@x.example"))
    cc = (Address("c@x.example", "C"),)
    legs = plan_legs(["a@x.example", "b@x.example", "c@x.example", "d@x.example"], to, cc, one_contact_per_call=True)
    assert legs == (
        Leg(0, (Address("a@x.example", "A"),), (Address("c@x.example", "C"),)),
        Leg(1, (Address("b@x.example"),)),
        Leg(2, (Address("d@x.example"),)),
    )
    assert plan_legs(["c@x.example", "z@x.example"], (), cc, one_contact_per_call=True) == (
        Leg(0, (Address("c@x.example", "C"),)),
        Leg(1, (Address("z@x.example"),)),
    )


def test_reply_to_goes_only_on_send_one_calls(gateway: Running) -> None:
    # DMDS documents reply-to for send_one_inline/send_one_uri: a message with a Reply-To gives every contact
    # a send_one call of its own, all in the first call's batch.
    code, text, bodies = deliver(
        gateway,
        "Reply-To: support@acme.example\r\nTo: a@example.com, b@example.com, c@example.com\r\n",
        ["a@example.com", "b@example.com", "c@example.com"],
    )
    assert code == 250, text
    assert {r["path"] for r in gateway.sent} == {"/v1/envio/send_one_inline/"}
    assert sorted(b["contacto"]["email"] for b in bodies) == ["a@example.com", "b@example.com", "c@example.com"]
    assert all(b["reply-to"] == "support@acme.example" for b in bodies)
    first = gateway.sent[0]
    assert "reuse_eeid" not in first["body"]
    assert [(b["reuse_eeid"], b["eeid"]) for b in bodies[1:]] == [(True, first["upstream_id"])] * 2
    assert text.endswith(first["upstream_id"])


def test_without_reply_to_several_contacts_stay_one_call(gateway: Running) -> None:
    code, text, bodies = deliver(gateway, "To: a@example.com, b@example.com\r\n", ["a@example.com", "b@example.com"])
    assert code == 250, text
    assert [r["path"] for r in gateway.sent] == ["/v1/envio/send_many_inline/"]
    assert "reply-to" not in bodies[0]


def test_extra_reply_to_and_from_addresses_are_not_sent_and_that_is_recorded(gateway: Running) -> None:
    # Both APIs take one reply-to and one sender address: the first is sent; the others are not lost in
    # silence but logged (message_repaired) and counted (fields_not_sent).
    def not_sent(field: str) -> float:
        return sample("smtp_gateway_fields_not_sent_total", account="acme", field=field)

    before = {field: not_sent(field) for field in ("reply_to_addresses", "from_addresses")}
    raw = (
        b"From: Billing <billing@acme.example>, Other <someone@other.example>\r\n"
        b"Reply-To: tickets@acme.example, Ana <ana@acme.example>\r\nTo: a@example.com\r\nSubject: two\r\n\r\nbody\r\n"
    )
    with captured_logs() as logs, session(gateway) as client:
        code, text = send(client, raw, ["a@example.com"])
    assert code == 250, text
    [body] = [r["body"] for r in gateway.sent]
    assert (body["reply-to"], body["remitente"]) == ("tickets@acme.example", "billing@acme.example")
    [repaired] = events(logs, "message_repaired")
    assert repaired["defects"] == [
        "several_addresses: From has 2 addresses, only the first is sent",
        "several_addresses: Reply-To has 2 addresses, only the first is sent",
    ]
    assert {field: not_sent(field) - before[field] for field in before} == {
        "reply_to_addresses": 1,
        "from_addresses": 1,
    }


def test_one_reply_to_address_records_nothing(gateway: Running) -> None:
    before = sample("smtp_gateway_fields_not_sent_total", account="acme", field="reply_to_addresses")
    with captured_logs() as logs:
        code, text, _ = deliver(gateway, "Reply-To: tickets@acme.example\r\nTo: a@example.com\r\n", ["a@example.com"])
    assert code == 250, text
    assert not events(logs, "message_repaired")
    assert sample("smtp_gateway_fields_not_sent_total", account="acme", field="reply_to_addresses") == before
