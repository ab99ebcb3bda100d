"""Dependencies as declared: every imported package is in pyproject.toml, the aiosmtpd internals the gateway
relies on are still there (and the bound that protects them is in place)."""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import socket
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import aiosmtpd
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-") for req in requirements}


def _imported(directory: Path) -> set[str]:
    """Top-level modules imported anywhere under ``directory`` (absolute imports only)."""
    modules = set()
    for path in directory.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.partition(".")[0])
    return modules


def _undeclared(directory: Path, declared: set[str], local: set[str]) -> dict[str, set[str]]:
    distributions = metadata.packages_distributions()
    missing = {}
    for module in sorted(_imported(directory) - set(sys.stdlib_module_names) - local):
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
        assert dists, f"{module} (imported under {directory.name}/) is not installed by any distribution"
        if not dists & declared:
            missing[module] = dists
    return missing


def test_every_package_the_gateway_imports_is_a_dependency() -> None:
    declared = _names(PROJECT["dependencies"])
    assert _undeclared(ROOT / "gateway", declared, {"gateway"}) == {}


def test_every_package_the_tests_import_is_declared() -> None:
    """And the developer tools' (tools/docgen) and the benchmark's (tests/test_bench.py imports its scripts),
    which run in the test environment."""
    declared = _names(PROJECT["dependencies"]) | _names(PROJECT["optional-dependencies"]["test"])
    # bench/ is no package: its scripts import each other, and the tests import them, as top-level modules.
    bench = {"bench"} | {path.stem for path in (ROOT / "bench").glob("*.py")}
    assert _undeclared(ROOT / "tests", declared, {"gateway", "tests", "tools", *bench}) == {}
    assert _undeclared(ROOT / "tools", declared, {"gateway", "tools"}) == {}
    assert _undeclared(ROOT / "bench", declared, {"gateway", "tests", *bench}) == {}


def test_pytest_asyncio_bound_closes_its_loops() -> None:
    """pytest-asyncio 0.23 stops with INTERNALERROR on asyncio_default_fixture_loop_scope (added in 0.24);
    0.24 and 0.25 leave a fresh unclosed loop behind each async test, whose sockets fail whichever later
    test drops it (CI's minimum-versions run, test_dependencies, 2026-11-25). 1.0 closes its loops."""
    bound = next(r for r in PROJECT["optional-dependencies"]["test"] if r.startswith("pytest-asyncio"))
    lower = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", bound)[1].split("."))  # type: ignore[index]
    assert lower >= (1, 0)


# ---- aiosmtpd internals ----------------------------------------------------------------------------------

# What gateway/smtp uses of aiosmtpd beyond its documented handler API: (name, parameters it is called with).
SMTP_METHODS = {
    "_getaddr": ["arg"],  # protocol.py: fast path for plain <a@b>, falls back to it
    "_set_post_data_state": [],  # protocol.py: after our own DATA reader
    "_call_handler_hook": ["command"],  # protocol.py: our DATA reader calls handle_DATA through it
    "_reset_timeout": [],  # protocol.py: our DATA reader keeps the session alive
    # Overridden in protocol.py: were they renamed, our versions would silently never run.
    "_handle_client": [],  # binds the session's log context
    "_timeout_cb": [],  # 421 4.4.2, the command_timeout limit metric and log line
    "challenge_auth": ["challenge"],  # handler.py: AUTH LOGIN prompts
    "check_helo_needed": [],  # protocol.py
    "check_auth_needed": ["caller_method"],  # protocol.py
    "push": ["status"],  # protocol.py: enhanced status codes on every reply
    "smtp_EHLO": ["hostname"],
    "smtp_HELO": ["hostname"],
    "smtp_MAIL": ["arg"],
    "smtp_DATA": ["arg"],
    "connection_lost": ["error"],
}
SMTP_INIT = [
    "hostname",
    "ident",
    "data_size_limit",
    "enable_SMTPUTF8",
    "decode_data",
    "tls_context",
    "require_starttls",
    "auth_require_tls",
    "auth_required",
    "timeout",
    "command_call_limit",
    "loop",
]
# set on the instance by connection_made (server.py writes to _writer while draining; _reader is our DATA reader's)
SMTP_INSTANCE = ["_reader", "_writer", "session", "envelope", "transport", "local_part_limit", "data_size_limit"]
WHERE = "gateway/smtp uses it; aiosmtpd is bounded <1.5 in pyproject.toml for this reason: adapt the gateway first"


def test_aiosmtpd_private_methods_are_there() -> None:
    for name, params in SMTP_METHODS.items():
        method = getattr(SMTP, name, None)
        assert callable(method), f"aiosmtpd {aiosmtpd.__version__}: SMTP.{name} is gone ({WHERE})"
        signature = list(inspect.signature(method).parameters)[1:]
        assert signature[: len(params)] == params, (
            f"aiosmtpd {aiosmtpd.__version__}: SMTP.{name}{inspect.signature(method)} changed ({WHERE})"
        )
    init = inspect.signature(SMTP.__init__).parameters
    missing = [p for p in SMTP_INIT if p not in init]
    assert missing == [], f"aiosmtpd {aiosmtpd.__version__}: SMTP() no longer takes {missing} ({WHERE})"
    assert {"success", "handled", "message", "auth_data"} <= set(inspect.signature(AuthResult).parameters)
    assert {"content", "original_content", "mail_from", "rcpt_tos", "mail_options", "rcpt_options"} <= set(
        vars(Envelope())
    )
    loop = asyncio.new_event_loop()
    try:
        assert "auth_data" in vars(Session(loop=loop))
    finally:
        loop.close()


async def test_aiosmtpd_instance_internals_are_there() -> None:
    """A real SMTP protocol on a real connection: the attributes connection_made sets."""

    class Handler:
        pass

    closed = asyncio.Event()

    class Probe(SMTP):  # type: ignore[misc]
        def connection_lost(self, error: Exception | None) -> None:
            super().connection_lost(error)
            closed.set()

    loop = asyncio.get_running_loop()
    server_sock, client_sock = socket.socketpair()
    protocol = Probe(Handler(), hostname="gw.test", loop=loop)
    with client_sock:
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, server_sock)
        try:
            missing = [name for name in SMTP_INSTANCE if not hasattr(protocol, name)]
            assert missing == [], f"aiosmtpd {aiosmtpd.__version__}: SMTP instances lack {missing} ({WHERE})"
            # protocol.py puts pipelined bytes back into the reader's buffer (asyncio.StreamReader internals)
            assert isinstance(protocol._reader, asyncio.StreamReader)
            assert isinstance(protocol._reader._buffer, bytearray)
        finally:
            transport.close()
            await asyncio.wait_for(closed.wait(), 10)


def test_installed_aiosmtpd_is_within_the_declared_bound() -> None:
    bound = next(r for r in PROJECT["dependencies"] if r.startswith("aiosmtpd"))
    assert "<1.5" in bound, "keep the upper bound while gateway/smtp uses aiosmtpd internals"
    major, minor = (int(x) for x in metadata.version("aiosmtpd").split(".")[:2])
    assert (major, minor) < (1, 5)
