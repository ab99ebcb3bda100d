"""gateway/limits/clients.py with a controlled clock: the per-IP key, the AUTH failure window (delays that grow and
stop growing, the lockout and its end), the memory bound under a flood from many addresses, the per-login
token bucket and the log sampler."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.config import LimitsSettings
from gateway.core import authcount
from gateway.core.authcount import Verdict
from gateway.limits.budget import ByteBudget
from gateway.limits.clients import NOTHING_HELD_FOR, AuthGuard, LoginRates, LogSampler, SessionCounter, client_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # a dual-stack listener's view of an IPv4 client
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("not-an-ip", "not-an-ip"),
    ],
)
def test_client_key(ip: str, key: str) -> None:
    assert client_key(ip) == key


def test_session_counter() -> None:
    counter = SessionCounter()
    assert counter.admit("a", 2) and counter.admit("a", 2) and not counter.admit("a", 2)
    assert counter.admit("b", 2)
    counter.release("a")
    assert counter.open("a") == 1 and counter.admit("a", 2)
    counter.release("a"), counter.release("a")
    assert counter.open("a") == 0


def guard(clock: Clock, **limits: float) -> AuthGuard:
    return AuthGuard(LimitsSettings(**limits), clock)  # type: ignore[arg-type]


async def fail(g: AuthGuard, key: str) -> bool:
    """One AUTH attempt that fails: True when it starts a lockout (False too when refused unchecked)."""
    ticket, _ = await g.begin(key)
    return ticket is not None and await g.end(ticket, failed=True)


async def test_failures_slow_then_lock_out_then_expire() -> None:
    clock = Clock()
    g = guard(
        clock,
        auth_failures_per_ip=3,
        auth_delay_max=8,
        auth_lockout_failures=9,
        auth_failure_window=300,
        auth_lockout_time=900,
    )
    delays = []
    for _ in range(8):
        delays.append(g.before("ip").delay)
        assert not await fail(g, "ip")
        clock.now += 1
    # Free until the 3rd failure; then 1 s, doubling, at most auth_delay_max.
    assert delays == [0, 0, 0, 1, 2, 4, 8, 8]
    assert await fail(g, "ip")  # the 9th: locked out
    verdict = g.before("ip")
    assert verdict.locked_for == 900 and verdict.delay == 0
    assert not await fail(g, "ip")  # attempts while locked are refused unchecked: it is not extended
    clock.now += 900
    assert g.before("ip").locked_for == 0 and g.before("ip").delay == 0
    assert len(g) == 0  # forgotten once nothing is recent


async def test_failures_leave_the_window() -> None:
    clock = Clock()
    g = guard(clock, auth_failures_per_ip=2, auth_failure_window=60, auth_lockout_failures=3)
    await fail(g, "ip")
    clock.now += 50
    await fail(g, "ip")
    assert g.before("ip").delay == 1
    clock.now += 11  # the window that began with the first failure is over
    assert g.before("ip").delay == 0
    assert not await fail(g, "ip")  # one failure in the new window, not three: no lockout


async def test_attempts_in_flight_count_toward_the_lockout() -> None:
    """Parallel guesses: while their checks run, they count with the failures, so no more may start than the
    lockout allows; one that ends well frees its place."""
    clock = Clock()
    g = guard(clock, auth_failures_per_ip=2, auth_lockout_failures=4)
    assert not await fail(g, "ip")
    tickets = [(await g.begin("ip"))[0] for _ in range(3)]
    assert all(t is not None for t in tickets)
    refused, verdict = await g.begin("ip")  # one failure and three in flight: the lockout's four
    assert refused is None and verdict.locked_for > 0
    first, second, third = tickets
    assert first is not None and second is not None and third is not None
    assert not await g.end(first, failed=False)  # a login that worked
    again, _ = await g.begin("ip")
    assert again is not None
    assert not await g.end(second, failed=True) and not await g.end(third, failed=True)
    assert await g.end(again, failed=True)  # the fourth failure: locked out, no fifth guess ever ran


async def test_memory_stays_bounded_under_a_flood_from_many_addresses() -> None:
    clock = Clock()
    g = guard(clock, max_tracked_ips=100)
    for n in range(10_000):
        await fail(g, f"198.51.{n // 256}.{n % 256}")
    assert len(g) <= 100
    # The most recent ones are the ones remembered.
    assert g.before("198.51.39.15").failures == 1


def test_lockout_threshold_cannot_be_below_the_delay_threshold() -> None:
    with pytest.raises(ValueError, match="auth_lockout_failures"):
        LimitsSettings(auth_failures_per_ip=10, auth_lockout_failures=5)


def test_session_timeout_is_the_older_name_of_command_timeout() -> None:
    assert LimitsSettings(session_timeout=42).command_timeout == 42
    assert LimitsSettings(session_timeout=42, command_timeout=7).command_timeout == 7
    assert LimitsSettings().command_timeout == 300


def test_login_rates_token_bucket() -> None:
    clock = Clock()
    rates = LoginRates(LimitsSettings(messages_per_minute=60, message_burst=3), clock)
    assert [rates.take("a") for _ in range(3)] == [0, 0, 0]
    assert rates.take("a") == pytest.approx(1.0)  # one token a second
    assert rates.take("b") == 0  # per login
    clock.now += 1
    assert rates.take("a") == 0
    assert rates.take("a") > 0
    unlimited = LoginRates(LimitsSettings(), clock)
    assert all(unlimited.take("a") == 0 for _ in range(1000))


def test_a_reload_keeps_what_each_login_used_of_its_burst() -> None:
    """Review limits2 F3: a reload that cut messages_per_minute refilled every login's burst (the buckets were
    cleared), the flooding login's first. Each login keeps what it used, counted in the new interval."""
    clock = Clock()
    rates = LoginRates(LimitsSettings(messages_per_minute=600, message_burst=3), clock)
    assert [rates.take("flood") for _ in range(3)] == [0, 0, 0]  # its burst spent
    assert rates.take("calm") == 0  # one of three
    rates.configure(LimitsSettings(messages_per_minute=60, message_burst=3))  # cut to one a second
    assert rates.take("flood") == pytest.approx(1.0)  # still spent: the next token one new interval away
    assert [rates.take("calm") for _ in range(2)] == [0, 0]  # the two it had left, no more
    assert rates.take("calm") == pytest.approx(1.0)
    rates.configure(LimitsSettings(messages_per_minute=60, message_burst=1))  # the burst alone cut
    assert rates.take("flood") == pytest.approx(3.0)  # three tokens used, one at a time now
    clock.now += 3
    assert rates.take("flood") == 0
    rates.configure(LimitsSettings())  # unlimited
    assert all(rates.take("flood") == 0 for _ in range(10))


def test_log_sampler() -> None:
    clock = Clock()
    sampler = LogSampler(interval=60, max_keys=10, clock=clock)
    assert sampler.allow("k") == 0
    assert sampler.allow("k") is None and sampler.allow("k") is None
    clock.now += 60
    assert sampler.allow("k") == 2  # what it held back meanwhile
    for n in range(100):
        sampler.allow(n)
    assert len(sampler._seen) <= 10


class SharedRecords:
    """One record per client as the queue store keeps it for every process (gateway.core.authcount under its
    lock), in memory; `auth_end` waits at `gate` once it is closed, as a write to the store can take a while."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.records: dict[str, authcount.Record] = {}
        self.gate = asyncio.Event()
        self.gate.set()
        self.writing = asyncio.Event()

    async def auth_begin(self, client: str, rules: authcount.Rules) -> tuple[authcount.Record, Verdict, float]:
        record, verdict = authcount.begin(self.records.get(client, authcount.NEW), self.clock(), rules)
        self.records[client] = record
        return record, verdict, self.clock()

    async def auth_end(
        self, client: str, rules: authcount.Rules, failed: bool, in_flight: bool
    ) -> tuple[authcount.Record, bool, float]:
        self.writing.set()
        await self.gate.wait()
        now = self.clock()
        record, locked = authcount.end(
            self.records.get(client, authcount.NEW), now, rules, failed=failed, in_flight=in_flight
        )
        self.records[client] = record
        return record, locked, now

    async def auth_lift(self, client: str, rules: authcount.Rules) -> bool:
        return self.records.pop(client, None) is not None

    async def auth_peek(self, client: str) -> tuple[authcount.Record, float] | None:
        record = self.records.get(client)
        return None if record is None else (record, self.clock())

    async def auth_held(
        self, limit: int, *, prefix: str = "", besides: Sequence[str] = ()
    ) -> list[tuple[str, authcount.Record, float]]:
        held = [c for c in self.records if c.startswith(prefix) and not c.startswith(tuple(besides))]
        return [(client, self.records[client], self.clock()) for client in held[:limit]]


async def test_no_second_unreserved_attempt_while_the_first_ones_failure_is_written() -> None:
    """With a shared record, one attempt at a time per process goes unreserved (counted nowhere until it
    ends). While its failure is being written, a new attempt of the same client must be reserved in the shared
    record: else a process could make a guess past the lockout for every such write (tests/test_auth_shared.py
    saw three past it with two workers)."""
    clock = Clock()
    shared = SharedRecords(clock)
    g = AuthGuard(LimitsSettings(auth_lockout_failures=10), clock, shared=shared)  # type: ignore[call-arg]
    first, _ = await g.begin("192.0.2.7")
    assert first is not None and first.where == "unreserved"
    shared.gate.clear()
    ending = asyncio.ensure_future(g.end(first, failed=True))
    await shared.writing.wait()  # the failure is on its way to the shared record
    second, _ = await g.begin("192.0.2.7")
    assert second is not None and second.where == "shared"
    assert shared.records["192.0.2.7"].in_flight == 1  # counted toward the lockout while it runs
    shared.gate.set()
    assert await ending is False
    assert await g.end(second, failed=True) is False
    assert shared.records["192.0.2.7"].failures == 2


async def test_check_reads_the_shared_record_a_lockout_made_or_lifted_by_another_process() -> None:
    """`check` (at every AUTH) brings this process's memory up to date from the shared record: a lockout made by
    another process refuses here though nothing was seen here, and a lift on another process ends it here."""
    clock = Clock()
    shared = SharedRecords(clock)
    limits = LimitsSettings(auth_failures_per_ip=2, auth_lockout_failures=2)  # type: ignore[call-arg]
    here, other = AuthGuard(limits, clock, shared=shared), AuthGuard(limits, clock, shared=shared)
    for _ in range(2):
        ticket, _ = await other.begin("192.0.2.8")
        assert ticket is not None
        await other.end(ticket, failed=True)
    assert not here.before("192.0.2.8").locked_for  # nothing in this process's memory
    assert (await here.check("192.0.2.8")).locked_for > 0
    assert here.before("192.0.2.8").locked_for > 0  # remembered now
    assert await other.lift("192.0.2.8")
    assert not (await here.check("192.0.2.8")).locked_for
    ticket, verdict = await here.begin("192.0.2.8")
    assert ticket is not None and not verdict.locked_for


async def test_check_takes_an_empty_shared_record_as_empty_for_a_second() -> None:
    """A client with nothing against it (a printer opening a connection per message) costs one store read a
    second, not one per AUTH; a lockout another process makes meanwhile refuses here once that second is up.
    A key with a record is read at every check (a lift elsewhere is seen at once)."""
    clock = Clock()
    shared = SharedRecords(clock)
    reads: list[str] = []
    peek = shared.auth_peek

    async def counted(client: str) -> tuple[authcount.Record, float] | None:
        reads.append(client)
        return await peek(client)

    shared.auth_peek = counted  # type: ignore[method-assign]
    limits = LimitsSettings(auth_failures_per_ip=2, auth_lockout_failures=2)  # type: ignore[call-arg]
    here, other = AuthGuard(limits, clock, shared=shared), AuthGuard(limits, clock, shared=shared)
    for _ in range(5):
        assert not (await here.check("192.0.2.9")).locked_for
    assert len(reads) == 1
    for _ in range(2):
        ticket, _ = await other.begin("192.0.2.9")
        assert ticket is not None
        await other.end(ticket, failed=True)
    assert not (await here.check("192.0.2.9")).locked_for  # within the second: not read again
    clock.now += NOTHING_HELD_FOR
    assert (await here.check("192.0.2.9")).locked_for > 0
    assert (await here.check("192.0.2.9")).locked_for > 0
    assert len(reads) == 3  # the record held: read at each check


def test_a_released_share_is_never_grown_again() -> None:
    """A text body's share is grown on a parser thread (gateway/pipeline.py): if its message's task was
    cancelled meanwhile and released the share, that growth would be held by nobody, for good."""
    budget = ByteBudget(limit=10_000, threshold=100)
    share = budget.reservation()
    assert share.grow(1_000) and budget.used == 1_000
    share.release()
    assert not share.grow(5_000)
    assert budget.used == 0 and share.held == 0
    share.release()  # idempotent
    assert budget.used == 0
    assert budget.reservation().fits(10_000) and not budget.reservation().fits(10_001)
