"""Local queue ids: drawn from a pool of OS random bytes, each used once, never shared with a forked worker."""

from __future__ import annotations

import os
import re

import pytest
import structlog

from gateway.delivery import owner
from gateway.delivery.owner import InlineAttempt, new_id


def test_ids_are_sixteen_hex_digits_and_never_repeat() -> None:
    ids = [new_id() for _ in range(5000)]  # many refills of the pool
    assert all(re.fullmatch(r"[0-9A-F]{16}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_worker_draws_ids_its_parent_never_does() -> None:
    new_id()  # the pool holds ids now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first ids, to the parent
        try:
            os.write(write, " ".join(new_id() for _ in range(8)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    os.waitpid(pid, 0)
    parent = {new_id() for _ in range(8)}
    assert len(child) == 8 and not child & parent


@pytest.mark.parametrize(
    ("upstream_id", "named"),
    [
        ("7f3c0c2e-1b2a-4c5d-9e8f-0a1b2c3d4e5f", True),
        ("x" * 200, True),
        ("x" * 201, False),  # a reply line holds at most 512 octets
        ("id with spaces", False),
        ("id\r\n250 forged", False),
        ("idé", False),  # outside printable ASCII
    ],
)
def test_an_upstream_id_unfit_for_a_reply_line_gives_way_to_the_local_id(upstream_id: str, named: bool) -> None:
    """Review vendors3 F8: the 250 names the upstream's id only when it is short printable ASCII; else the
    local queue id (the upstream's is kept whole in the queue and ledger), logged once per problem."""
    owner._unreplyable_logged.clear()
    local = new_id()
    attempt = InlineAttempt(local, None, None, structlog.get_logger("test"))  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        reply = attempt.queued(upstream_id)
        attempt.queued(upstream_id)
    expected = upstream_id if named else local
    assert reply.text == f"Ok: queued as {expected}" and attempt.reply_id == expected
    assert len(str(reply)) <= 512
    assert [e["event"] for e in logs].count("upstream_id_not_in_reply") == (0 if named else 1)
