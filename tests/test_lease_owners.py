"""Which lease owners a process may declare dead: only its own place's (same boot, pid namespace and host
name), whatever instance names are configured. Two machines or containers sharing an `instance_name` once
ended each other's live leases (pid 1 in both containers read as "an earlier incarnation of me"), and the
messages leased were sent twice."""

from __future__ import annotations

import os
import subprocess
import sys

from gateway.delivery.leaseowners import dead_local_owners, owner_id, place, split


def _dead_pid() -> int:
    """A pid that was this machine's and is gone."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    return int(child.stdout)


def test_an_owner_names_its_place() -> None:
    me = owner_id("gw")
    name, pid, nonce = split(me)
    assert (name, pid) == ("gw", os.getpid())
    assert nonce.partition("-")[0] == place() and len(place()) == 8


def test_a_gone_process_of_this_place_is_dead_and_a_live_one_is_not() -> None:
    me = owner_id("gw")
    gone = f"gw:{_dead_pid()}:{place()}-0badf00d"
    live = f"gw:{os.getppid()}:{place()}-0badf00d"
    earlier_me = f"gw:{os.getpid()}:{place()}-0badf00d"  # a restart that got this pid again
    assert dead_local_owners(me, [me, gone, live, earlier_me]) == [gone, earlier_me]


def test_another_places_owners_are_left_to_their_leases_whatever_their_name() -> None:
    """The same instance name on another machine or container: its pids, even ours (pid 1 in containers),
    mean other processes."""
    me = owner_id("gw")
    elsewhere = "f00dface" if place() != "f00dface" else "deadbeef"
    others = [f"gw:{_dead_pid()}:{elsewhere}-0badf00d", f"gw:{os.getpid()}:{elsewhere}-0badf00d"]
    assert dead_local_owners(me, others) == []


def test_owners_of_another_instance_name_or_without_a_place_are_left_alone() -> None:
    me = owner_id("gw")
    pid = _dead_pid()
    assert dead_local_owners(me, [f"other:{pid}:{place()}-0badf00d", f"gw:{pid}:0badf00d"]) == []
