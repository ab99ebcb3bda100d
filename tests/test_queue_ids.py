"""Local queue ids: drawn from a pool of OS random bytes, each used once, never shared with a forked worker."""

from __future__ import annotations

import os
import re

from gateway.delivery.owner import new_id


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
