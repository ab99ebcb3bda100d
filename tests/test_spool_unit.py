"""The spool's parts without a server: codec round trip, per-leg settlement, retry schedule."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from gateway.model import Address, Attachment, Leg, Message, Principal, Submission
from gateway.spool import codec
from gateway.spool.store import LegRow, RetryPolicy, SpoolStore

POLICY = RetryPolicy((10.0, 20.0), 0.0, 100.0)


def submission() -> Submission:
    msg = Message(
        subject="Ünïcode subject", from_=Address("billing@acme.example", "Billing"), sender=None,
        reply_to=Address("help@acme.example"), to=(Address("a@example.com", "A"), Address("b@example.com")),
        cc=(Address("c@example.com", "C"),), html="<p>hi</p>", text="hi",
        attachments=(Attachment("x.bin", "application/octet-stream", bytes(range(256)), "cid1", True),),
        options={"archive": "yes"}, message_id="<m@x>",
    )
    return Submission(
        principal=Principal("acme", "scanner", 22, allowed_senders=("@acme.example",)),
        mail_from="billing@acme.example", rcpt_tos=("a@example.com", "b@example.com", "c@example.com"),
        message=msg, campaign=22,
        legs=(Leg(0, (Address("a@example.com", "A"),), (Address("c@example.com", "C"),)),
              Leg(1, (Address("b@example.com"),))),
        archive=True, batch_eeid=None,
    )


def test_codec_round_trip() -> None:
    s = submission()
    assert codec.decode(codec.encode(s)) == s


def test_codec_refuses_corrupt_record() -> None:
    with pytest.raises(codec.CodecError):
        codec.decode(b'{"v": 1}')
    with pytest.raises(codec.CodecError):
        codec.decode(b"not json")


def _insert(store: SpoolStore, msg_id: str, legs: list[LegRow], now: float, state: str = "queued") -> None:
    store.insert(msg_id=msg_id, account="acme", state=state, created=now, expires=now + 100, next_attempt=now,
                 attempts=1, batch_eeid=None, mail_from="a@acme.example", subject="s",
                 submission=codec.encode(submission()), legs=legs, last_error="boom")


def test_delivered_legs_are_never_claimed_again(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "s.db")
    now = time.time()
    _insert(store, "M1", [LegRow(0, "a", "pending"), LegRow(1, "b", "pending")], now)
    [claimed] = store.claim("acme", now, 10)
    assert claimed.done == {}
    assert store.claim("acme", now, 10) == []  # in flight: not claimed twice
    assert store.settle("M1", {0: "E1"}, {}, "500", now, POLICY) == "queued"
    row = store.show("M1")
    assert row is not None and row["batch_eeid"] == "E1" and row["attempts"] == 2
    assert row["next_attempt"] == pytest.approx(now + 20.0)  # second entry of the schedule
    [claimed] = store.claim("acme", now + 21, 10)
    assert claimed.done == {0: "E1"} and claimed.batch_eeid == "E1"
    assert store.settle("M1", {1: "E1"}, {}, None, now, POLICY) == "done"
    assert store.show("M1") is None


def test_refused_leg_and_expiry_become_dead_letters(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "s.db")
    now = time.time()
    _insert(store, "M2", [LegRow(0, "a", "done", "E"), LegRow(1, "b", "pending")], now)
    store.claim("acme", now, 1)
    assert store.settle("M2", {}, {1: "invalid email"}, "invalid email", now, POLICY) == "dead"
    dead = store.show("M2")
    assert dead is not None and "invalid email" in dead["dead_reason"]
    _insert(store, "M3", [LegRow(0, "a", "pending")], now)
    store.claim("acme", now, 1)
    assert store.settle("M3", {}, {}, "DMDS answered 500", now + 101, POLICY) == "dead"
    expired = store.show("M3")
    assert expired is not None and expired["dead_reason"].startswith("expired") and "500" in expired["dead_reason"]
    assert [r["id"] for r in store.list(["dead"])] == ["M2", "M3"]
    assert store.requeue("M2", now, 100)
    assert [leg["state"] for leg in store.show("M2")["legs"]] == ["done", "pending"]  # type: ignore[index]


def test_recover_turns_inflight_into_due(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "s.db")
    now = time.time()
    _insert(store, "M4", [LegRow(0, "a", "pending")], now + 50, state="inflight")
    assert store.recover(now) == [("M4", None)]
    assert [c.id for c in store.claim("acme", now, 5)] == ["M4"]


def test_retry_policy_schedule_and_jitter() -> None:
    policy = RetryPolicy((60, 300), 0.2, 1000)
    rng = random.Random(1)
    delays = [policy.delay(n, rng) for n in (1, 2, 3, 9)]
    assert 48 <= delays[0] <= 72 and all(240 <= d <= 360 for d in delays[1:])
