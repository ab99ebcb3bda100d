"""The reference pages (docs/reference/) are what the code says: tools/docgen regenerates them and the committed
pages must match; what the pages read from the code is complete (every key described, every reply, metric and
option explained, every log event listable); the check fails, with a diff and the command, when a page is stale."""

from __future__ import annotations

import ast
import datetime
import inspect
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import aiosmtpd.smtp
import pytest
from pydantic import BaseModel

from gateway.cli import build_parser
from gateway.cli.exits import Exit
from gateway.providers import registry
from gateway.providers.dengage.config import DengageAccount
from gateway.providers.dmds.config import DmdsAccount
from gateway.smtp.handler import GatewayHandler
from gateway.smtp.protocol import GatewaySMTP, _with_code
from tests.docs_blocks import ROOT, commands, doc_blocks
from tests.test_third_provider import SPEC as TINYMAIL
from tools.docgen import COMMAND, PAGES, cli, config, logevents, metrics, replies
from tools.docgen.notes import NotesError, load


def _docgen(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.docgen", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_reference_pages_are_current() -> None:
    """In a fresh process, as the page says to run it (a test run's own registrations cannot leak in)."""
    [block] = doc_blocks("test_reference_pages_are_current")
    assert [c for c, _ in commands(block)] == [COMMAND, f"{COMMAND} --check"]
    result = _docgen(ROOT, "--check")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert {page.path.name for page in PAGES} == {
        p.name for p in (ROOT / "docs" / "reference").glob("*.md") if p.name != "index.md"
    }


def test_a_stale_page_fails_the_check_with_its_diff_and_the_command(tmp_path: Path) -> None:
    for part in ("gateway", "tools", "docs"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    page = tmp_path / "docs" / "reference" / "metrics.md"
    page.write_text(page.read_text().replace("smtp_gateway_sessions_active", "smtp_gateway_sessions_open"))
    result = _docgen(tmp_path, "--check")
    assert result.returncode == 1
    assert '-| <a id="smtp_gateway_sessions_open">' in result.stdout
    assert '+| <a id="smtp_gateway_sessions_active">' in result.stdout
    assert "docs/reference/metrics.md is not what the code says" in result.stderr
    assert f"run `{COMMAND}` and commit the pages" in result.stderr
    # The command without --check writes it back, and then the check passes.
    assert _docgen(tmp_path).returncode == 0
    assert "smtp_gateway_sessions_active" in page.read_text()
    assert _docgen(tmp_path, "--check").returncode == 0


# ---- the code is complete enough to document -----------------------------------------------------------


def _models(model: type[BaseModel], seen: set[type[BaseModel]]) -> None:
    seen.add(model)
    for field in model.model_fields.values():
        inner = config._model_in(field.annotation)
        if inner is not None and inner not in seen:
            _models(inner, seen)


def test_every_configuration_key_has_a_description() -> None:
    seen: set[type[BaseModel]] = set()
    for section in config.sections():
        _models(section.model, seen)
    missing = [
        f"{model.__module__}.{model.__name__}.{name}"
        for model in seen
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert missing == [], "give these fields Field(description=...): " + ", ".join(sorted(missing))
    assert {DmdsAccount, DengageAccount} <= seen


def test_account_models_come_from_the_provider_registry() -> None:
    """A provider registered (here by a test) is on the page with its keys; the built-in ones come first."""
    registry.register(TINYMAIL)
    try:
        models = config.account_models()
    finally:
        registry.unregister(TINYMAIL.kind)
    assert models[:2] == [DmdsAccount, DengageAccount]
    assert TINYMAIL.account_model in models
    assert TINYMAIL.account_model not in config.account_models()


def test_every_reply_in_the_table_says_when_it_is_sent() -> None:
    entries = replies.entries()
    assert {"AUTH_INVALID", "queued()", "TLS_UNAVAILABLE"} <= {e.name for e in entries}
    missing = [e.name for e in entries if not e.doc.strip()]
    assert missing == [], "add a docstring under these entries of gateway/core/replies.py: " + ", ".join(missing)


def test_a_reply_built_per_use_is_shown_with_its_placeholders() -> None:
    shown = {e.name: e.reply for e in replies.entries()}
    assert str(shown["queued()"]) == "250 2.0.0 Ok: queued as <queue_id>"
    assert shown["data_timeout()"].text == "<hostname> Error: DATA not completed within <seconds> s, closing connection"


def test_replies_link_to_the_troubleshooting_section_that_lists_them() -> None:
    spans = replies._troubleshooting_spans()
    shown = {e.name: e.reply for e in replies.entries()}
    assert replies.fix_section(shown["AUTH_INVALID"], spans) == "TLS and AUTH"
    assert replies.fix_section(shown["SENDER_NOT_OWNED"], spans) == "The envelope: MAIL and RCPT"
    assert replies.fix_section(shown["MESSAGE_TOO_BIG"], spans) == "The message: end of DATA"
    assert replies.fix_section(shown["NEED_RCPT"], spans) == "The envelope: MAIL and RCPT"  # a cell's second reply
    assert replies.fix_section(shown["AUTH_OK"], spans) is None


# aiosmtpd replies the gateway's listeners never send, and why (each is still checked to exist in aiosmtpd).
UNSENT_LIBRARY_REPLIES = {
    "554 5.0.0 Command refused due to lack of security": "require_starttls is off on every listener",
    "530 5.7.0 Must issue a STARTTLS command first": "require_starttls is off on every listener",
    "501 5.5.4 SMTPUTF8 disabled": "SMTPUTF8 is enabled on every listener",
    "500 5.5.2 strict ASCII mode": "SMTPUTF8 is enabled, so a command's argument is never decoded as strict ASCII",
    "500 5.5.2 (<x>) <x>": "GatewaySMTP.handle_exception answers 451 4.3.0 Internal error instead",
    "500 5.5.2 Cannot describe error": "only if GatewaySMTP.handle_exception itself failed",
}


def _library_replies() -> set[str]:
    """aiosmtpd's own refusals (4xx, 5xx) as the gateway sends them (enhanced code added, rewordings applied),
    read from its source; `<x>` stands for what is filled in per use. A method the gateway's session or handler
    replaces without calling aiosmtpd's own (AUTH, STARTTLS, DATA, auth_PLAIN, ...) sends none of them."""
    found = set()
    for function in ast.walk(ast.parse(inspect.getsource(aiosmtpd.smtp))):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        own = GatewaySMTP.__dict__.get(function.name) or GatewayHandler.__dict__.get(function.name)
        if own is not None and f"super().{function.name}(" not in inspect.getsource(own):
            continue
        inside_fstrings = {id(v) for n in ast.walk(function) if isinstance(n, ast.JoinedStr) for v in n.values}
        for node in ast.walk(function):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inside_fstrings:
                text = node.value
            elif isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "<x>" for v in node.values)
            else:
                continue
            if isinstance(node, ast.Constant) and any(
                isinstance(b, ast.BinOp) and b.left is node for b in ast.walk(function)
            ):
                text += "<x>"  # '502 Could not VRFY ' + arg
            if re.match(r"[45]\d\d[ -]", text):
                found.add(_with_code(text.replace("{}", "<x>")).rstrip())
    return found


def _listed(sent: str, spans: list[replies._Span]) -> bool:
    """A reply as a client gets it is in a Troubleshooting table: the same codes, and the start of each of
    its literal parts (what is filled in per use aside)."""
    codes, text = re.fullmatch(r"(\d{3} [245]\.\d+\.\d+ )(.*)", sent).groups()  # type: ignore[union-attr]
    pieces = [p.strip()[:24].lower() for p in re.split(r"<[a-z_]+>", text) if p.strip()]
    return any(s.text.startswith(codes) and all(p in s.text.lower() for p in pieces) for s in spans)


def test_troubleshooting_lists_every_refusal_a_client_can_get() -> None:
    """Troubleshooting promises every SMTP reply a client can get: every 4xx and 5xx reply of the reply table
    has a section there (the reference links to it), and so has every refusal of the SMTP library's own."""
    spans = replies._troubleshooting_spans()
    unlinked = [
        e.name for e in replies.entries() if e.reply.code >= 400 and not replies.fix_section(replies.as_sent(e), spans)
    ]
    assert unlinked == [], "replies of gateway/core/replies.py not in docs/troubleshooting.md's tables: " + ", ".join(
        unlinked
    )
    library = _library_replies()
    assert {
        "503 5.5.1 Need MAIL command first",
        "555 5.5.4 MAIL FROM parameters not recognized or not implemented",
    } <= library
    assert set(UNSENT_LIBRARY_REPLIES) <= library, "aiosmtpd no longer sends these: drop them from the list"
    missing = sorted(r for r in library - set(UNSENT_LIBRARY_REPLIES) if not _listed(r, spans))
    assert missing == [], "aiosmtpd's replies not in docs/troubleshooting.md's tables: " + ", ".join(missing)


def test_every_metric_has_help_and_the_collectors_are_there() -> None:
    found = {m.exposed: m for m in metrics.collect()}
    assert {"smtp_gateway_sessions_total", "smtp_gateway_upstream_seconds", "smtp_gateway_queue_messages"} <= set(found)
    assert found["smtp_gateway_upstream_seconds"].labels == ("account", "endpoint", "outcome")
    assert found["smtp_gateway_upstream_seconds"].buckets[-1] == float("inf")
    assert [name for name, m in found.items() if not m.help.strip()] == []


def test_every_option_has_help() -> None:
    missing = [
        f"smtp-gateway {command.name} {action.option_strings or action.dest}"
        for command in cli.commands()
        for action in cli._arguments(command.parser)
        if not action.help
    ]
    assert missing == [], "give these a help text (or help=argparse.SUPPRESS): " + ", ".join(missing)


def test_a_type_the_reference_cannot_name_stops_it() -> None:
    """Rather than a page that shows a Python repr such as `<class 'complex'>`."""
    assert config.type_text(datetime.date | None) == "date"
    with pytest.raises(TypeError, match="no words for the type"):
        config.type_text(complex)


def test_the_synopsis_writes_each_argument_as_the_commands_own_usage_does() -> None:
    """A positional that takes one, one or none, or several values reads as argparse writes it in --help."""
    shapes = set()
    for command in cli.commands():
        usage = " ".join(command.parser.format_usage().split())
        for action in cli._arguments(command.parser):
            if not action.option_strings:
                assert cli._usage(action) in usage, (command.name, cli._usage(action), usage)
                shapes.add(str(action.nargs))
    assert {"None", "?", "+"} <= shapes  # the shapes the commands have today: each one checked


def test_commands_return_their_exit_status_from_the_table() -> None:
    """No `return 1` in the command line: every status is a member of Exit, so the page lists them all."""
    bare = []
    for path in sorted((ROOT / "gateway" / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            values = [node.value] if isinstance(node, ast.Return) and node.value is not None else []
            if values and isinstance(values[0], ast.IfExp):  # `return Exit.OK if ok else 1`
                values = [values[0].body, values[0].orelse]
            bare += [
                f"{path.relative_to(ROOT)}:{node.lineno}"
                for v in values
                if isinstance(v, ast.Constant) and isinstance(v.value, int) and not isinstance(v.value, bool)
            ]
    assert bare == [], "return a member of gateway.cli.exits.Exit: " + ", ".join(bare)


def test_a_usage_error_exits_with_the_tables_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["queue", "list", "--no-such-option"])
    assert exc.value.code == Exit.USAGE == 2
    assert "smtp-gateway: error: unrecognized arguments: --no-such-option" in capsys.readouterr().err


# ---- log events ----------------------------------------------------------------------------------------


def test_log_events_are_found_with_their_levels_fields_and_context() -> None:
    events, context = logevents.scan()
    by_name = {e.name: e for e in events}
    assert by_name["message_deferred"].levels == ["warning"]
    assert by_name["message_accepted"].levels == ["info"]
    assert {"reply", "queue_id", "duration"} <= set(by_name["message_accepted"].fields)
    # A **dict built in the same function, and keys a bound logger carries.
    assert {"account", "domain", "return_path"} <= set(by_name["sender_domain_ok"].fields)
    assert {"login", "account", "size", "rcpts", "defects"} <= set(by_name["message_repaired"].fields)
    assert (
        by_name["delivery_internal_error"].sites[0].traceback or by_name["delivery_internal_error"].sites[1].traceback
    )
    assert "library_log" in by_name  # a library's record written as our line
    assert {c.name for c in context} == {"session", "peer", "proxy_peer", "listener", "worker"}


def _package(tmp_path: Path, code: str) -> Path:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "mod.py").write_text(textwrap.dedent(code))
    return package


def test_an_event_name_that_is_not_a_literal_cannot_be_listed(tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        """
        import structlog
        log = structlog.get_logger()

        def f(code: int) -> None:
            event = "a" if code else "b"
            log.info(event, code=code)
        """,
    )
    with pytest.raises(logevents.ScanError, match=r"pkg/mod.py:7: the event name is not a string literal"):
        logevents.scan(package)


def test_a_log_method_given_a_name_cannot_hide_its_events(tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        """
        import structlog
        log = structlog.get_logger()

        def f(bad: bool) -> None:
            report = log.error if bad else log.warning
            report("hidden_event", bad=bad)
        """,
    )
    with pytest.raises(logevents.ScanError, match=r"pkg/mod.py:6: a log method given a name hides its events"):
        logevents.scan(package)


def test_comments_above_a_call_describe_it_and_unknown_fields_are_marked(tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        """
        import structlog
        log = structlog.get_logger()

        def f(bound, extra: dict) -> None:
            # The thing happened.
            log.warning("thing_happened", count=1, **extra)
            bound.info("thing_done")
            (log.warning if extra else log.info)("thing_checked")
        """,
    )
    events, _ = logevents.scan(package)
    happened, done, checked = sorted(
        events, key=lambda e: ["thing_happened", "thing_done", "thing_checked"].index(e.name)
    )
    assert (happened.sites[0].comment, happened.fields, happened.sites[0].more) == (
        "The thing happened.",
        ["count"],
        True,
    )
    assert done.sites[0].more  # a logger bound by the caller
    assert checked.levels == ["info", "warning"]


# ---- notes ---------------------------------------------------------------------------------------------


def test_notes_merge_an_introduction_and_one_paragraph_per_item(tmp_path: Path) -> None:
    (tmp_path / "page.md").write_text(
        "<!-- what this file is -->\nIntro with a [link](../x.md).\n\n## auth_failed\nA note\non two lines.\n"
    )
    notes = load("page", tmp_path)
    assert notes.intro == "Intro with a [link](../x.md)."
    assert notes.item("auth_failed") == "A note on two lines."
    notes.check_used()


def test_a_note_on_nothing_or_of_two_paragraphs_fails(tmp_path: Path) -> None:
    (tmp_path / "page.md").write_text("## gone_event\nStill here.\n")
    notes = load("page", tmp_path)
    with pytest.raises(NotesError, match="notes on items the code no longer has: gone_event"):
        notes.check_used()
    (tmp_path / "two.md").write_text("## x\nOne.\n\nTwo.\n")
    with pytest.raises(NotesError, match="several paragraphs"):
        load("two", tmp_path)
