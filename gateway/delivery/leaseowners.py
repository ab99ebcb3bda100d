"""Lease owners: how a process names itself in the queue's and the ledger's leases, and which owners are gone."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import secrets
import socket
from collections.abc import Iterable
from pathlib import Path

# Where a pid means the same process: the same kernel boot and the same pid namespace (a container has its
# own), on a host of the same name. Two machines or two containers given one `instance_name` (a shared config)
# must never judge each other's pids: pid 1 of one container is not pid 1 of the other, and ending a live
# owner's leases has its messages sent twice.
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_PID_NAMESPACE = "/proc/self/ns/pid"


@functools.cache
def place() -> str:
    """8 hex digits naming this process's pid namespace on this boot of this host."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):  # not Linux: the host name alone
        parts += [_BOOT_ID.read_text().strip(), os.readlink(_PID_NAMESPACE)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


def owner_id(instance: str = "") -> str:
    """This process as a lease owner, `<instance>:<pid>:<place>-<nonce>`: instance (host) name, pid, where
    the pid means this process, and a nonce (a restarted process is a new owner)."""
    return f"{instance or socket.gethostname()}:{os.getpid()}:{place()}-{secrets.token_hex(4)}"


def dead_local_owners(me: str, owners: Iterable[str]) -> list[str]:
    """The lease owners among `owners` that are processes of this place that are gone (killed, crashed):
    their leases may end now rather than after their time. Owners elsewhere (another machine or container,
    whatever its instance name; or a version that did not name its place) are left to their leases: their
    processes cannot be seen from here."""
    name, _, mine = split(me)
    here = mine.partition("-")[0]
    dead = []
    for other in owners:
        other_name, other_pid, nonce = split(other)
        where, dash, _ = nonce.partition("-")
        if other == me or other_name != name or other_pid is None or not dash or where != here:
            continue
        # Our own pid with another nonce, here, is an earlier incarnation.
        if other_pid == os.getpid() or not _alive(other_pid):
            dead.append(other)
    return dead


def split(owner: str) -> tuple[str, int | None, str]:
    """(instance name, pid, nonce) of an owner."""
    rest, _, nonce = owner.rpartition(":")
    name, _, pid = rest.rpartition(":")
    return name, int(pid) if pid.isdigit() else None, nonce


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
