"""Golden JSON for gateway.upstream.dmds.build_payload: every wire name checked in one place.

Regenerate after a deliberate wire change: UPDATE_GOLDEN=1 python -m pytest tests/test_dmds_payload.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gateway.core.model import Address, Attachment, Message, Principal, Submission
from gateway.providers.dmds.data import DmdsLogin, DmdsParams
from gateway.providers.dmds.legs import Leg
from gateway.providers.dmds.wire import build_payload

FIXTURES = Path(__file__).parent / "fixtures" / "dmds"
PRINCIPAL = Principal(account="acme", login="scanner", extra=DmdsLogin(campaign=22))


def submission(legs: tuple[Leg, ...] = (), archive: bool = False, **kwargs: object) -> Submission:
    """A DMDS submission; `legs` is for the caller's bookkeeping (legs are planned from the envelope)."""
    message = Message(
        subject=str(kwargs.pop("subject", "Invoice 42")),
        from_=Address("billing@acme.example", "Acme Billing"),
        sender=None,
        reply_to=kwargs.pop("reply_to", None),  # type: ignore[arg-type]
        to=(),
        cc=(),
        html="<p>Hello</p>",
        text="Hello",
        attachments=kwargs.pop("attachments", ()),  # type: ignore[arg-type]
    )
    return Submission(
        principal=PRINCIPAL,
        mail_from="billing@acme.example",
        rcpt_tos=(),
        message=message,
        params=DmdsParams(campaign=22, archive=archive, batch=None),
    )


ANN = Address("ann@example.com", "Ann Smith")
Case = tuple[Submission, tuple[Leg, ...], int, "str | None"]


def case(legs: tuple[Leg, ...], leg_index: int, batch: str | None, **kwargs: object) -> Case:
    return submission(legs, **kwargs), legs, leg_index, batch  # type: ignore[arg-type]


CASES: dict[str, Case] = {
    "one_recipient": case((Leg(0, (ANN,)),), 0, None, reply_to=Address("support@acme.example")),
    "many": case((Leg(0, (ANN, Address("bob@example.com"), Address("cy@example.com", "Cy"))),), 0, None),
    "cc_bcc": case(
        (
            Leg(
                0,
                (ANN,),
                (Address("carl@example.com", "Carl"), Address("dee@example.com")),
                (Address("hidden@example.com"),),
            ),
        ),
        0,
        None,
    ),
    "attachment": case(
        (Leg(0, (ANN,)),),
        0,
        None,
        attachments=(
            Attachment("invoice.pdf", "application/pdf", b"%PDF-1.4"),
            Attachment("logo.png", "image/png", b"\x89PNG", content_id="logo@acme", inline=True),
        ),
    ),
    "batch_archive": case(
        (Leg(0, (ANN,)), Leg(1, (Address("bob@example.com"), Address("cy@example.com")))),
        1,
        "3abc993d-8i88-45e8-a6c9-e879378abba5",
        archive=True,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_build_payload_matches_golden(name: str) -> None:
    sub, legs, leg_index, batch = CASES[name]
    payload = build_payload(sub, legs[leg_index], batch)
    path = FIXTURES / f"{name}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    assert payload == json.loads(path.read_text(encoding="utf-8"))


def test_payload_is_json_serializable_and_has_no_empty_fields() -> None:
    sub, legs, _, _ = CASES["one_recipient"]
    payload = build_payload(sub, legs[0], None)
    assert json.loads(json.dumps(payload)) == payload
    assert all(value not in (None, "", [], {}) for value in payload.values())
