"""Per-login quotas through real SMTP sessions: messages and bytes per hour and per day, answered at MAIL (and at
the end of DATA) with the time the window resets; counted across instances on one queue (SQLite file or
PostgreSQL) with no message past a quota; a message that is not accepted after all is not counted; /metrics."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config.logins import Quota
from gateway.core import quota
from gateway.core.errors import SpoolUnavailable
from gateway.core.quota import Counts, Window
from gateway.limits.quotas import LocalCounts, QuotaTracker
from gateway.ops.metrics import REGISTRY
from tests.configs import listener
from tests.devices_util import captured_logs, events, raw_send
from tests.harness import CAMPAIGNS, PASSWORD, PASSWORD_HASH, Running
from tests.ops_util import sample
from tests.smtputil import RECIPIENT, SENDER, RawClient, message
from tests.spool_helpers import wait_for

Factory = Callable[..., Running]
METERED = "metered"


def metered(**limits: int) -> dict[str, Any]:
    return {"username": METERED, "password_hash": PASSWORD_HASH, "campaign": 22, "quota": limits}


def resets(window: str) -> str:
    now = int(time.time())
    length = 3600 if window == "hour" else 86400
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(now - now % length + length))


def session(gw: Running, listener_: str = "plain") -> RawClient:
    client = RawClient(gw, listener_)
    client.cmd("EHLO client.test")
    assert client.login(METERED, PASSWORD).startswith("235 ")
    return client


def sized(size: int, subject: str = "sized") -> bytes:
    """A message of exactly `size` bytes as the gateway counts them."""
    base = message(subject=subject, body="")
    return message(subject=subject, body="x" * (size - len(base)))


def used(window: str, unit: str) -> float:
    return sample("smtp_gateway_login_quota_used", account="acme", login=METERED, window=window, unit=unit)


def test_messages_per_hour_then_452_at_mail_with_the_reset_time(gateway_factory: Factory) -> None:
    gw = gateway_factory(extra_users=[metered(messages_per_hour=2, messages_per_day=100)])
    before = sample("smtp_gateway_login_refusals_total", account="acme", login=METERED, reason="quota_messages")
    with captured_logs() as logs, session(gw) as client:
        for n in range(2):
            assert raw_send(client, message(subject=f"m{n}")).startswith("250 2.0.0 ")
        assert client.cmd(f"MAIL FROM:<{SENDER}>") == (
            f"452 4.7.1 Message quota of {METERED} reached (2 messages per hour); resets at {resets('hour')}"
        )
    assert len(gw.sent) == 2
    [line] = events(logs, "quota_reached")
    assert (line["window"], line["unit"], line["limit"]) == ("hour", "messages", 2)
    assert sample("smtp_gateway_login_refusals_total", account="acme", login=METERED, reason="quota_messages") == (
        before + 1
    )
    assert used("hour", "messages") == 2 and used("day", "messages") == 2
    labels = {"account": "acme", "login": METERED, "window": "hour", "unit": "messages"}
    assert sample("smtp_gateway_login_quota_limit", **labels) == 2
    hour = int(time.time()) // 3600 * 3600 + 3600
    assert sample(
        "smtp_gateway_login_quota_resets_timestamp_seconds", account="acme", login=METERED, window="hour"
    ) == (hour)
    # Another login is not affected.
    with RawClient(gw) as other:
        other.cmd("EHLO client.test")
        assert other.login().startswith("235 ")
        assert raw_send(other, message(subject="other")).startswith("250 2.0.0 ")


def test_bytes_per_day_at_mail_size_and_at_the_end_of_data(gateway_factory: Factory) -> None:
    gw = gateway_factory(extra_users=[metered(bytes_per_day=3000)])
    with session(gw) as client:
        # Larger than the whole quota: it can never be sent as it is (permanent).
        assert client.cmd(f"MAIL FROM:<{SENDER}> SIZE=5000") == (
            f"552 5.3.4 Message larger than the byte quota of {METERED} (3000 bytes per day)"
        )
        assert client.cmd(f"MAIL FROM:<{SENDER}> SIZE=2000").startswith("250 ")
        assert client.cmd(f"RCPT TO:<{RECIPIENT}>").startswith("250 ")
        assert client.cmd("DATA").startswith("354 ")
        client.write(sized(2000) + b".\r\n")
        assert client.reply()[-1].startswith("250 2.0.0 ")
        byte_quota = f"452 4.7.1 Byte quota of {METERED} reached (3000 bytes per day); resets at {resets('day')}"
        assert client.cmd(f"MAIL FROM:<{SENDER}> SIZE=1500") == byte_quota
        # Without a SIZE= the message is refused once its size is known, at the end of DATA.
        with captured_logs() as logs:
            assert raw_send(client, sized(1500)) == byte_quota
        [summary] = events(logs, "message_deferred")
        assert summary["reason"] == "quota: 3000 bytes per day" and not events(logs, "quota_reached")
        assert raw_send(client, sized(1000)).startswith("250 2.0.0 ")  # exactly the 3000
    assert len(gw.sent) == 2 and used("day", "bytes") == 3000


def test_a_message_not_accepted_after_all_is_not_counted(gateway_factory: Factory) -> None:
    gw = gateway_factory(extra_users=[metered(messages_per_hour=1)])
    with session(gw) as client:
        # Refused at the end of DATA (this login may not choose a campaign): counted, then taken back.
        refused = raw_send(client, message(subject="no", extra="X-Gateway-Campaign: 23\r\n"))
        assert refused.startswith("550 5.7.1 "), refused
        wait_for(lambda: used("hour", "messages") == 0, 10, "the refused message taken back")
        assert raw_send(client, message(subject="yes")).startswith("250 2.0.0 ")
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("452 4.7.1 ")
    assert [r["body"]["asunto"] for r in gw.sent] == ["yes"]


def test_a_resend_answered_with_the_first_messages_250_is_not_counted_again(gateway_factory: Factory) -> None:
    # A client that lost its 250 resends the message: it gets the first one's 250 and nothing is sent again,
    # so its quota is charged once (it was counted at the end of DATA, before the resend was recognised).
    gw = gateway_factory(extra_users=[metered(messages_per_day=2)])
    keyed = "X-Gateway-Idempotency-Key: invoice-4711\r\n"
    with session(gw) as client:
        first = raw_send(client, message(subject="invoice 4711", extra=keyed))
        assert first.startswith("250 2.0.0 ")
        assert raw_send(client, message(subject="invoice 4711", extra=keyed)) == first
        wait_for(lambda: used("day", "messages") == 1, 10, "the resend given back")
        # One message sent of the two allowed: the next one fits.
        assert raw_send(client, message(subject="invoice 4712")).startswith("250 2.0.0 ")
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("452 4.7.1 ")
    assert [r["body"]["asunto"] for r in gw.sent] == ["invoice 4711", "invoice 4712"]


def send_as(gw: Running, login: str, password: str = CAMPAIGNS[23]) -> str:
    """One message by `login` in a session of its own: the final reply, or the first refusal."""
    with RawClient(gw) as client:
        client.cmd("EHLO client.test")
        auth = client.login(login, password)
        if not auth.startswith("235 "):
            return auth
        mail = client.cmd(f"MAIL FROM:<{SENDER}>")  # (a quota or rate used up refuses here)
        if not mail.startswith("250 "):
            return mail
        assert client.cmd(f"RCPT TO:<{RECIPIENT}>").startswith("250 ")
        assert client.cmd("DATA").startswith("354 ")
        client.write(message(subject=f"as {login}") + b".\r\n")
        return client.reply()[-1]


# Each of them logged in as campaign 23 with its key, a login of its own with a fresh quota and rate: int()
# drops leading zeros and reads every script's digits (\d matched them), `$` matched before a final newline.
SPELLINGS = ["acme-023", "acme-000000000023", "acme-\u0662\u0663", "acme-23\n"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_a_campaign_login_has_one_spelling_and_so_one_quota(gateway_factory: Factory, spelling: str) -> None:
    gw = gateway_factory(accounts={"acme": {"quota": {"messages_per_day": 1}}})
    assert send_as(gw, "acme-23").startswith("250 2.0.0 ")
    assert send_as(gw, "acme-23").startswith("452 4.7.1 Message quota of acme-23 reached")
    # The campaign's key with another spelling of its login: no login (a wrong password's reply).
    assert send_as(gw, spelling).startswith("535 5.7.8 "), spelling
    assert len(gw.sent) == 1


def test_a_campaign_login_has_one_spelling_and_so_one_rate(gateway_factory: Factory) -> None:
    gw = gateway_factory(limits={"messages_per_minute": 1})
    assert send_as(gw, "acme-23").startswith("250 2.0.0 ")
    assert send_as(gw, "acme-23").startswith("451 4.7.1 Message rate limit reached for acme-23")
    assert send_as(gw, "acme-0023").startswith("535 5.7.8 ")
    assert len(gw.sent) == 1


@pytest.mark.parametrize(("fault", "counted"), [({}, 1), ({"status": 400, "reason": "contenido invalido"}, 0)])
def test_a_client_gone_during_delivery_is_counted_by_the_outcome(
    gateway_factory: Factory, fault: dict[str, Any], counted: int
) -> None:
    # The client hangs up after its final dot; the delivery goes on. Delivered: the message counts (leaving
    # early is no way around a quota). Refused by the upstream: taken back, as for a client that waited.
    gw = gateway_factory(extra_users=[metered(messages_per_hour=1)])
    gw.fault(delay=2.0, count=1, **fault)
    verdict = "delivered" if counted else "refused"
    before = _gone(verdict)
    with session(gw) as client:
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("250 ")
        assert client.cmd(f"RCPT TO:<{RECIPIENT}>").startswith("250 ")
        assert client.cmd("DATA").startswith("354 ")
        client.write(message(subject="gone") + b".\r\n")
        # Gone once the call is on its way (the sandbox has taken the fault): the message was counted and
        # handed over; the call's answer comes 2 s later.
        wait_for(lambda: not gw.sandbox.state.faults, 10, "the upstream call")
        client.reset_on_close()
    # The outcome is recorded (client_gone_during_delivery) once the call has ended; the quota is settled then.
    wait_for(lambda: _gone(verdict) > before and used("hour", "messages") == counted, 10, "settled")
    with session(gw) as client:
        reply = client.cmd(f"MAIL FROM:<{SENDER}>")
        assert reply.startswith("452 4.7.1 " if counted else "250 "), reply


def _gone(verdict: str) -> float:
    return REGISTRY.get_sample_value("smtp_gateway_client_gone_total", {"verdict": verdict}) or 0.0


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_instances_on_one_queue_share_the_count(
    gateway_factory: Factory, tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    """Two gateways on one queue: together they take exactly the quota. The second instance's view at MAIL is
    behind (it has not seen the first's messages), so the one past the quota is refused at the end of DATA."""
    delivery: dict[str, Any] = {"spool_path": str(tmp_path / "shared.sqlite3")}
    if backend == "postgresql":
        delivery["queue_url"] = request.getfixturevalue("pg_cluster").new_database()
    users = [metered(messages_per_hour=3)]
    first = gateway_factory(extra_users=users, delivery=delivery, listeners=[listener()])
    second = gateway_factory(extra_users=users, delivery=delivery, listeners=[listener()], sandbox=first.sandbox)
    with session(second) as client:
        assert raw_send(client, message(subject="b0")).startswith("250 2.0.0 ")  # its view: 1 of 3
    with session(first) as client:
        for n in range(2):
            assert raw_send(client, message(subject=f"a{n}")).startswith("250 2.0.0 ")
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("452 4.7.1 ")
    with session(second) as client:
        assert raw_send(client, message(subject="b1")).startswith("452 4.7.1 Message quota of metered reached")
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("452 4.7.1 ")  # its view has caught up
    assert sorted(r["body"]["asunto"] for r in first.sent) == ["a0", "a1", "b0"]


def _stored_today(gw: Running) -> int:
    """The login's messages today in the shared store (what every instance counts against)."""
    assert gw.app.store is not None
    windows = quota.windows(time.time(), (0, 0), (2, 0))
    counts = gw.loop.run(gw.app.store.quota_counts(f"acme/{METERED}", windows))
    return counts[windows[0].key].messages


def test_a_quota_given_back_by_another_instance_frees_mail_here(gateway_factory: Factory, tmp_path: Path) -> None:
    """A view that refuses is read again from the store: a message given back by another instance frees MAIL
    here at once (before the fix the second instance kept answering 452 from its view until the day ended)."""
    delivery = {"spool_path": str(tmp_path / "shared.sqlite3")}
    users = [metered(messages_per_day=2)]
    first = gateway_factory(extra_users=users, delivery=delivery, listeners=[listener()])
    second = gateway_factory(extra_users=users, delivery=delivery, listeners=[listener()], sandbox=first.sandbox)
    with session(first) as client:
        assert raw_send(client, message(subject="a0")).startswith("250 2.0.0 ")
    # a1 is counted (2 of 2), then refused by the upstream and given back (1 of 2).
    first.fault(delay=2.0, count=1, status=400, reason="contenido invalido")
    replies: list[str] = []

    def send_a1() -> None:
        with session(first) as client:
            replies.append(raw_send(client, message(subject="a1")))

    sender = threading.Thread(target=send_a1)
    sender.start()
    wait_for(lambda: not first.sandbox.state.faults, 10, "a1's upstream call under way")
    with session(second) as client:
        # documented: while a1 is counted, a MAIL of the login may get 452 too early
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("452 4.7.1 ")
    sender.join(30)
    assert replies and not replies[0].startswith("2"), replies
    wait_for(lambda: _stored_today(first) == 1, 10, "a1 given back in the shared store")
    with session(second) as client:
        reply = client.cmd(f"MAIL FROM:<{SENDER}>")
    assert reply.startswith("250 "), reply


class Unreachable:
    async def quota_take(
        self, login: str, windows: tuple[Window, ...], size: int
    ) -> tuple[quota.Verdict, dict[str, Counts]]:
        raise SpoolUnavailable("queue down")

    async def quota_return(self, login: str, windows: tuple[Window, ...], size: int) -> None:
        raise SpoolUnavailable("queue down")

    async def quota_counts(self, login: str, windows: tuple[Window, ...]) -> dict[str, Counts]:
        raise SpoolUnavailable("queue down")


async def test_without_its_store_a_process_counts_on_its_own() -> None:
    tracker = QuotaTracker(Unreachable())
    limits = Quota(messages_per_hour=2)
    with captured_logs() as logs:
        assert (await tracker.check("acme", METERED, limits, 0)).ok
        verdicts = [(await tracker.take("acme", METERED, limits, 10))[0] for _ in range(3)]
    assert [v.ok for v in verdicts] == [True, True, False]
    assert not (await tracker.check("acme", METERED, limits, 0)).ok
    assert len(events(logs, "quota_store_unavailable")) == 1  # said once, not per message


class Gated(LocalCounts):
    """This process's own counts, whose take waits for `go`: a shared store's transaction in progress."""

    def __init__(self) -> None:
        super().__init__(time.time)
        self.go = asyncio.Event()
        self.started = asyncio.Event()
        self.returned = asyncio.Event()

    async def quota_take(
        self, login: str, windows: tuple[Window, ...], size: int
    ) -> tuple[quota.Verdict, dict[str, Counts]]:
        self.started.set()
        await self.go.wait()
        return await super().quota_take(login, windows, size)

    async def quota_return(self, login: str, windows: tuple[Window, ...], size: int) -> None:
        await super().quota_return(login, windows, size)
        self.returned.set()


async def test_a_take_cancelled_while_the_store_counts_is_given_back() -> None:
    # The client leaves at the end of DATA while its message is being counted: the count completes (a
    # transaction is not cut in half) and is taken back, the message having been sent nowhere.
    store = Gated()
    tracker = QuotaTracker(store)
    limits = Quota(messages_per_hour=1)
    taking = asyncio.create_task(tracker.take("acme", METERED, limits, 10))
    await store.started.wait()
    taking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await taking
    store.go.set()
    async with asyncio.timeout(10):  # a guard: without the return this would wait for ever
        await store.returned.wait()
    counts = await store.quota_counts(f"acme/{METERED}", tracker.windows(limits))
    assert all(c.messages == 0 and c.bytes == 0 for c in counts.values()), counts
    verdict, taken = await tracker.take("acme", METERED, limits, 10)
    assert verdict.ok and taken is not None  # the one message of the hour is still free


class BrokenReturn:
    """Counts at once when `counting` is set; its give-back fails (a bug)."""

    def __init__(self) -> None:
        self.counting = asyncio.Event()
        self.asked = asyncio.Event()
        self.local = LocalCounts()

    async def quota_take(
        self, login: str, windows: tuple[Window, ...], size: int
    ) -> tuple[quota.Verdict, dict[str, Counts]]:
        self.asked.set()
        await self.counting.wait()
        return await self.local.quota_take(login, windows, size)

    async def quota_return(self, login: str, windows: tuple[Window, ...], size: int) -> None:
        raise RuntimeError("a bug in the store")

    async def quota_counts(self, login: str, windows: tuple[Window, ...]) -> dict[str, Counts]:
        return await self.local.quota_counts(login, windows)


async def test_a_late_give_back_that_fails_is_logged_and_counted() -> None:
    """The caller left while the store counted: the give-back runs in a task nobody awaits; what it raises is
    logged and counted as quota_return_failed (as after a reply), not left as "Task exception was never
    retrieved"."""
    store = BrokenReturn()
    tracker = QuotaTracker(store)
    loop = asyncio.get_running_loop()
    unexpected: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unexpected.append(context))
    errors = REGISTRY.get_sample_value("smtp_gateway_internal_errors_total", {"where": "quota_return"}) or 0.0
    try:
        with captured_logs() as logs:
            taking = asyncio.ensure_future(tracker.take("acme", METERED, Quota(messages_per_hour=2), 10))
            await store.asked.wait()
            taking.cancel()  # the client gone while the store counts
            with pytest.raises(asyncio.CancelledError):
                await taking
            store.counting.set()
            for _ in range(100):  # a few loop turns: the counting ends, then the give-back is scheduled
                if tracker._late:
                    break
                await asyncio.sleep(0)
            assert tracker._late, "no give-back scheduled"
            await asyncio.wait(set(tracker._late))
        assert len(events(logs, "quota_return_failed")) == 1
        assert REGISTRY.get_sample_value("smtp_gateway_internal_errors_total", {"where": "quota_return"}) == errors + 1
        gc.collect()
        assert unexpected == []
    finally:
        loop.set_exception_handler(None)


class Flaky(LocalCounts):
    """A shared store's counts that can be cut off (`down`): an outage of the queue store."""

    def __init__(self) -> None:
        super().__init__(time.time)
        self.down = False
        self.returns = 0  # give-backs the store took

    def _check(self) -> None:
        if self.down:
            raise SpoolUnavailable("queue down")

    async def quota_take(
        self, login: str, windows: tuple[Window, ...], size: int
    ) -> tuple[quota.Verdict, dict[str, Counts]]:
        self._check()
        return await super().quota_take(login, windows, size)

    async def quota_return(self, login: str, windows: tuple[Window, ...], size: int) -> None:
        self._check()
        await super().quota_return(login, windows, size)
        self.returns += 1

    async def quota_counts(self, login: str, windows: tuple[Window, ...]) -> dict[str, Counts]:
        self._check()
        return await super().quota_counts(login, windows)


async def test_a_message_is_given_back_where_it_was_counted() -> None:
    """Counted by this process alone during an outage, then given back after it: the shared count is not
    touched (it never had the message). Counted by the store, then given back during an outage: the shared
    count stays one too high until its window ends (it refuses early, never lets a login past its quota), said
    in the log, and this process's own counts are left alone."""
    store = Flaky()
    tracker = QuotaTracker(store)
    limits = Quota(messages_per_hour=5)
    windows = tracker.windows(limits)
    key = f"acme/{METERED}"
    with captured_logs() as logs:
        store.down = True
        _, alone = await tracker.take("acme", METERED, limits, 10)
        store.down = False
        assert alone is not None and not alone.shared
        await tracker.give_back(alone)
        assert store.returns == 0  # the store never counted it: nothing taken from its count
        assert (await tracker._local.quota_counts(key, windows))[windows[0].key] == Counts()

        _, shared = await tracker.take("acme", METERED, limits, 10)
        assert shared is not None and shared.shared
        store.down = True
        await tracker.give_back(shared)
        store.down = False
        assert (await store.quota_counts(key, windows))[windows[0].key] == Counts(1, 10)
        assert (await tracker._local.quota_counts(key, windows))[windows[0].key] == Counts()
    assert len(events(logs, "quota_return_skipped")) == 1
