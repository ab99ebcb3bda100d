"""Shared fixtures: a real gateway and sandbox upstream on loopback for every end-to-end test."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import procs
from tests.harness import LoopThread, Running, start, stop
from tests.pgserver import PgCluster, new_cluster

pytest_plugins = ["tests.conftest_dns"]

# The shared MIME corpus (400 messages from public parsers' test suites, not part of this repository): CI
# has it beside the clone. Tests that read it carry @pytest.mark.corpus; without it they are skipped, or
# fail under CI=true, with one line saying where it was looked for.
CORPUS = Path(os.environ.get("SMTP_GATEWAY_CORPUS") or Path(__file__).resolve().parents[2] / "shared" / "corpus")
CORPUS_MISSING = (
    f"the shared MIME test corpus is not at {CORPUS} (MANIFEST.tsv missing): put it beside this repository "
    "as ../shared/corpus, as CI does, or point SMTP_GATEWAY_CORPUS at it"
)

# Tests that run the `smtp-gateway` console script get the one installed beside the Python running the tests
# (the documented `.venv/bin/python -m pytest` does not put .venv/bin on PATH), never another install's.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("corpus") is not None and not (CORPUS / "MANIFEST.tsv").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(CORPUS_MISSING)
        pytest.skip(CORPUS_MISSING)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto`: two workers per core up to four workers, then one per core. Most of the suite's time is spent
    waiting on sockets, subprocesses and servers, so one worker per core left a third of two cores idle (CI
    on two cores: the README's run took 441 s with two workers, the minimum-versions run of nearly the same
    2,100 tests 328 s with four). None leaves PYTEST_XDIST_AUTO_NUM_WORKERS to pytest-xdist's own hook."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    cores = len(os.sched_getaffinity(0)) or 1
    return max(cores, min(2 * cores, 4))


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test() -> Iterator[None]:
    """Torn down after the test's own fixtures: whatever tests.procs.spawn started and is still running."""
    yield
    procs.reap()


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_thread_any(request: pytest.FixtureRequest) -> Iterator[LoopThread]:
    """The stdlib loop and uvloop (what `serve` runs: the test id names the loop). Whatever the loop would
    report through its exception handler (asyncio's "SSL handshake failed" traceback, uvloop's "Fatal error on
    transport" or "handler is closed" RuntimeError of a task nobody awaited) fails the test."""
    import uvloop

    lt = LoopThread(uvloop.new_event_loop() if request.param == "uvloop" else None)
    unexpected: list[dict[str, Any]] = []
    lt.loop.call_soon_threadsafe(lt.loop.set_exception_handler, lambda loop, context: unexpected.append(context))
    yield lt
    lt.close()
    gc.collect()  # "Task exception was never retrieved" is reported when the task is freed
    assert unexpected == []


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One private PostgreSQL cluster per test session (skipped, or failed under CI, without the server)."""
    cluster = new_cluster()
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def gateway_factory(loop_thread: LoopThread, tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Start a gateway with config overrides: gateway_factory(delivery={"mode": "passthrough"})."""
    started: list[Running] = []

    def factory(**overrides: Any) -> Running:
        running = start(loop_thread, tmp_path / f"gw{len(started)}", **overrides)
        started.append(running)
        return running

    yield factory
    for running in started:
        stop(running)


@pytest.fixture
def gateway(gateway_factory: Callable[..., Running]) -> Running:
    return gateway_factory()


# Lines a test wants in the terminal summary whatever -s says (the corpus counts): (title, lines).
SUMMARY_KEY = pytest.StashKey[list[tuple[str, list[str]]]]()


@pytest.fixture
def terminal_summary(request: pytest.FixtureRequest) -> list[tuple[str, list[str]]]:
    return request.config.stash.setdefault(SUMMARY_KEY, [])


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for title, lines in config.stash.get(SUMMARY_KEY, []):
        terminalreporter.section(title)
        for line in lines:
            terminalreporter.write_line(line)
