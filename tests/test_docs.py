"""The documentation, checked as a reader would use it: every shell block is run by a named test or marked as
not run, the site builds with --strict and offline, the quick start prints what the pages show, and the cheap
commands shown are run and their output compared."""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.auth.passwords import verify_password
from gateway.config import keys as configkeys
from gateway.config.keys import Node
from gateway.config.settings import config_keys
from gateway.providers import registry
from gateway.providers.sandbox import default_shape
from tests.dnsserver import DnsServer
from tests.docs_blocks import ROOT, Block, all_blocks, commands, doc_blocks, pages
from tests.harness import LoopThread
from tests.procs import spawn
from tests.spool_helpers import wait_for
from tests.test_first_contact import Lines, event_pattern
from tests.test_policy_dns import zones

BIN = Path(sys.executable).parent  # the environment running the tests: its smtp-gateway and mkdocs
UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
HASH = re.compile(r"scrypt\$\S+")
ARRIVED = re.compile(r'"at": \d+(?:\.\d+)?')  # when the sandbox received a request (epoch seconds)


# ---- the marks -----------------------------------------------------------------------------------------


def _tests_reading_blocks(path: Path) -> set[str]:
    """The module-level test functions of ``path`` that call doc_blocks() in their own body."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            calls = (n for n in ast.walk(node) if isinstance(n, ast.Call))
            if any(getattr(c.func, "id", getattr(c.func, "attr", None)) == "doc_blocks" for c in calls):
                found.add(node.name)
    return found


def test_every_shell_block_is_run_or_marked_not_run() -> None:
    problems = []
    readers: dict[str, set[str]] = {}
    for block in all_blocks():
        if block.is_shell and block.mark is None:
            problems.append(
                f"{block.where()}: a {block.lang or 'shell'} block without <!-- test: ... --> or <!-- not run: ... -->"
            )
        if block.mark == "not run" and not block.mark_text:
            problems.append(f"{block.where()}: <!-- not run: --> without a reason")
        if block.mark == "test" and not block.tests:
            problems.append(f"{block.where()}: <!-- test: --> naming no test")
        for named in block.tests:
            file, sep, name = named.partition("::")
            path = ROOT / file
            if not sep or not path.is_file() or not file.startswith("tests/"):
                problems.append(f"{block.where()}: {named!r} is not tests/FILE.py::TEST")
                continue
            if file not in readers:
                readers[file] = _tests_reading_blocks(path)
            if name not in readers[file]:
                problems.append(f"{block.where()}: {named} does not exist or does not read its blocks (doc_blocks)")
    assert problems == [], "\n".join(problems)


def test_the_mark_check_sees_an_unmarked_block(tmp_path: Path) -> None:
    """The convention's parser: a block's mark is the line before its fence; prompts make a block shell."""
    from tests.docs_blocks import blocks

    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```text\n$ smtp-gateway queue list\n```\n\n"
        "<!-- not run: an example -->\n```sh\nswaks \\\n  --to x\n```\n"
    )
    first, second = blocks(page)
    assert (first.is_shell, first.mark) == (True, None)
    assert (second.mark, second.mark_text) == ("not run", "an example")
    assert commands(second) == [("swaks --to x", [])]


# ---- the site ------------------------------------------------------------------------------------------


def test_site_builds_strict(tmp_path: Path) -> None:
    [block] = doc_blocks("test_site_builds_strict")
    assert [c for c, _ in commands(block)] == [".venv/bin/mkdocs build --strict"]
    site = tmp_path / "site"
    result = subprocess.run(
        [str(BIN / "mkdocs"), "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    html = list(site.rglob("*.html"))
    assert (site / "index.html").is_file() and len(html) > 30
    # Offline: nothing fetched by a reader's browser either (no CDN, no web fonts).
    external = re.compile(r"<(?:script|link|img)\b[^>]*(?:src|href)=\"(?:https?:)?//", re.I)
    for page in html:
        text = page.read_text()
        assert not external.search(text), f"{page}: loads from the network"
        assert "fonts.googleapis" not in text and "fonts.gstatic" not in text, page


def test_pages_link_only_to_this_repository() -> None:
    link = re.compile(r"\]\(([^)\s]+)\)")
    problems = []
    for page in pages():
        text = page.read_text()
        for target in link.findall(text):
            if re.match(r"(https?|mailto):", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if "shared/" in target or not path.is_relative_to(ROOT) or not path.exists():
                problems.append(f"{page.relative_to(ROOT)}: link to {target}")
        if page.parent.name != "development" and re.search(r"\bissues? #\d+", text, re.I):
            problems.append(f"{page.relative_to(ROOT)}: names an issue number")
    assert problems == [], "\n".join(problems)


_DELIMITER_ROW = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")


def table_problems(text: str) -> list[str]:
    """Rows that Markdown would not render as a table: a `|` line without a header and delimiter row above it
    (a row left after a paragraph shows as text with its pipes)."""
    problems = []
    in_code = False
    run: list[tuple[int, str]] = []
    for number, line in enumerate([*text.splitlines(), ""], start=1):
        if line.lstrip().startswith(("```", "~~~")):
            in_code = not in_code
        if not in_code and line.startswith("|"):
            run.append((number, line))
            continue
        if run and (len(run) < 2 or not _DELIMITER_ROW.match(run[1][1])):
            problems.append(f"line {run[0][0]}: a table row outside a table: {run[0][1][:60]}")
        run = []
    return problems


def test_every_table_row_is_in_a_table() -> None:
    problems = [f"{page.relative_to(ROOT)} {p}" for page in pages() for p in table_problems(page.read_text())]
    assert problems == [], "\n".join(problems)


def _table_after(page: Path, heading: str) -> list[str]:
    """The first cells of the table under `heading`."""
    lines = page.read_text().split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line.split(" | ")[0].lstrip("| "))
    return rows


def test_every_import_contract_has_its_row() -> None:
    """Import boundaries lists each contract of pyproject.toml by its name (up to any parenthesis), and no other."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    rows = _table_after(ROOT / "docs" / "development" / "import-boundaries.md", "# Import boundaries")
    assert sorted(rows) == sorted(c["name"].split(" (")[0] for c in contracts)


def test_every_threat_has_its_tests_named() -> None:
    """Security's threats and the development page's table of their tests: the same rows, in the same order."""
    threats = _table_after(ROOT / "docs" / "security.md", "## Threats and defences")
    tested = _table_after(ROOT / "docs" / "development" / "tests.md", "## Security threats and their tests")
    assert [" ".join(t.split()[:2]) for t in tested] == [" ".join(t.split()[:2]) for t in threats]


def test_the_table_check_sees_a_row_left_after_a_paragraph() -> None:
    table = "| a | b |\n|---|---|\n| 1 | 2 |\n"
    assert table_problems(table + "\nSome words.\n| 3 | 4 |\n") == ["line 6: a table row outside a table: | 3 | 4 |"]
    assert table_problems(table + "\n```\n| not a table |\n```\n") == []


def _check_keys(node: Node, value: Any, where: str, problems: list[str]) -> None:
    if node.kind == "model" and isinstance(value, dict):
        for key, child in value.items():
            if key not in node.fields:
                problems.append(f"{where}: no key {key!r}")
            else:
                _check_keys(node.fields[key], child, f"{where}.{key}", problems)
    elif node.kind == "mapping" and isinstance(value, dict) and node.item is not None:
        for key, child in value.items():
            _check_keys(node.item, child, f"{where}.{key}", problems)
    elif node.kind == "sequence" and isinstance(value, list) and node.item is not None:
        for i, child in enumerate(value):
            _check_keys(node.item, child, f"{where}[{i}]", problems)


def test_toml_examples_use_real_keys() -> None:
    keys = config_keys()
    # An account's keys depend on its provider (the merged union would take one provider's users for both).
    account = {spec.kind: configkeys.tree(spec.account_model) for spec in registry.specs()}
    default = next(spec.kind for spec in registry.specs() if spec.default)
    problems: list[str] = []
    toml = [b for b in all_blocks() if b.lang == "toml"]
    assert len(toml) > 10
    for block in toml:
        try:
            data = tomllib.loads(block.text)
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"{block.where()}: {exc}")
            continue
        accounts = data.pop("accounts", {})
        _check_keys(keys, data, block.where(), problems)
        for name, table in accounts.items():
            _check_keys(account[table.get("provider", default)], table, f"{block.where()}.accounts.{name}", problems)
    assert problems == [], "\n".join(problems)


# ---- commands and their output -----------------------------------------------------------------------------


def test_test_command_is_what_ci_runs() -> None:
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip()]
    last = [ln for ln in ci if not ln.startswith("#")][-1]
    blocks = doc_blocks("test_test_command_is_what_ci_runs")
    assert {b.page for b in blocks} >= {"README.md", "CONTRIBUTING.md"}
    for block in blocks:
        assert [c for c, _ in commands(block)] == [last], block.where()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env.update(extra)
    return env


def _shell(command: str) -> str:
    """A command as shown, with `.venv/bin/` being the environment that runs the tests."""
    return re.sub(r"(?<![\w/])\.venv/bin/", f"{BIN}/", command)


def run_shown(block: Block, cwd: Path, env: dict[str, str]) -> list[tuple[str, list[str], list[str]]]:
    """Run a console block's commands in one shell, in order: (command, output shown, real output lines)."""
    shown = commands(block)
    marker = "@@smtp-gateway-docs@@"
    script = ["exec 2>&1"]
    for command, _ in shown:
        script += [_shell(command), f"__s=$?; printf '%s\\n' '{marker}'; (exit $__s)"]
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    chunks = result.stdout.split(marker + "\n")
    assert len(chunks) == len(shown) + 1, result.stdout
    return [(command, out, chunk.splitlines()) for (command, out), chunk in zip(shown, chunks, strict=False)]


def assert_shown(shown: list[str], real: list[str], normalise: Callable[[str], str], where: str) -> None:
    """The output shown is the real one: line for line, where a `...` line stands for any number of lines
    (a blank line at the end, which a code block cannot show, aside)."""
    while real and not real[-1].strip():
        real = real[:-1]
    pattern = "".join(
        r"(?:[^\n]*\n)*?" if line.strip() == "..." else re.escape(normalise(line.rstrip()) + "\n") for line in shown
    )
    text = "".join(normalise(line.rstrip()) + "\n" for line in real)
    assert re.fullmatch(pattern, text), f"{where}: shown\n{chr(10).join(shown)}\n--- but the real output is\n{text}"


def _plain(line: str) -> str:
    return ARRIVED.sub('"at": <time>', HASH.sub("scrypt$<hash>", UUID.sub("<uuid>", line)))


def _privileged_ports_dropped(lines: list[str]) -> list[str]:
    """This machine's state, not the example's: the example's 587/465 may be taken or need root here."""
    kept = [ln for ln in lines if not re.search(r"problem: listener \S+ 0\.0\.0\.0:(587|465): ", ln)]
    dropped = len(lines) - len(kept)
    if dropped:
        kept = [re.sub(r"(\d+) problem\(s\)", lambda m: f"{int(m[1]) - dropped} problem(s)", ln) for ln in kept]
    return kept


def test_console_examples(tmp_path: Path) -> None:
    (tmp_path / "config").symlink_to(ROOT / "config")
    for block in doc_blocks("test_console_examples"):
        for command, shown, real in run_shown(block, tmp_path, _env()):
            real = _privileged_ports_dropped(real)
            # The pages run these in /home/op: a path resolved against the current directory shows it.
            real = [line.replace(str(tmp_path), "/home/op") for line in real]
            assert "Traceback" not in "\n".join(real), real
            assert_shown(shown, real, _plain, f"{block.where()}: $ {command}")
            if "hash-password" in command:
                [hashed] = real
                assert verify_password("a long random password", hashed)


@pytest.fixture
def dns_thread(loop_thread: LoopThread) -> Iterator[DnsServer]:
    async def start() -> DnsServer:
        return await DnsServer(zones()).start()

    server = loop_thread.run(start())
    try:
        yield server
    finally:
        loop_thread.run(server.close())


def test_check_domains_output(tmp_path: Path, dns_thread: DnsServer) -> None:
    """Against the tests' DNS server, with the three sender domains the example shows."""
    (tmp_path / "gateway.toml").write_text(f"""
[accounts.acme]
dmdsid = "acme"
apikey = "not-used"
[accounts.acme.sender_domains]
"acme.example" = "dmds-acme@nl.acme.example"
"aonly.example" = "dmds-a@nl.aonly.example"
"gone.example" = "dmds-gone@nl.gone.example"
[dns]
nameservers = ["127.0.0.1"]
port = {dns_thread.port}
""")
    [block] = doc_blocks("test_check_domains_output")
    for command, shown, real in run_shown(block, tmp_path, _env()):
        assert_shown(shown, real, _plain, f"{block.where()}: $ {command}")


def test_sandbox_commands(tmp_path: Path) -> None:
    """The sandbox as the page starts it (on any free port, read from the line it prints), the fault rehearsal
    against it, the answer shape it was started with, and Ctrl-C."""
    blocks = doc_blocks("test_sandbox_commands")
    starts = [c for b in blocks for c, _ in commands(b) if c.startswith("smtp-gateway sandbox")]
    curls = [c for b in blocks for c, _ in commands(b) if c.startswith("curl ")]
    assert len(starts) == 3 and len(curls) == 1, blocks
    for start in starts:
        argv = shlex.split(start.replace("127.0.0.1:8025", "127.0.0.1:0"))
        if "--listen" not in argv:
            argv += ["--listen", "127.0.0.1:0"]
        proc = spawn(
            [str(BIN / "smtp-gateway"), *argv[1:]],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        err, out = Lines(proc.stderr), Lines(proc.stdout)
        try:
            listening = err.wait_for(r"compatible upstream on http://127\.0\.0\.1:\d+\b")
            port = int(re.findall(r"127\.0\.0\.1:(\d+)", listening)[0])
            for curl in curls:
                sent = subprocess.run(
                    shlex.split(curl.replace("localhost:8025", f"127.0.0.1:{port}")),
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
                assert sent.returncode == 0, sent.stderr
                json.loads(sent.stdout)
            shape = argv[argv.index("--shape") + 1] if "--shape" in argv else default_shape()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_sandbox/shape", timeout=10) as answer:
                assert json.load(answer) == {"shape": shape}
        finally:
            proc.send_signal(signal.SIGINT)
            status = proc.wait(30)
            err.close()
            out.close()
        assert status == 130, err.text()  # the exit statuses page: Ctrl-C in the sandbox
        assert "Traceback" not in err.text()


# ---- the quick start ---------------------------------------------------------------------------------------

DOC_PORTS = {"smtp": 2525, "tls": 2587, "sandbox": 8025, "http": 8026}


def _transcript(line: str) -> str:
    """A swaks transcript line without what differs between machines and runs."""
    line = re.sub(r"EHLO \S+", "EHLO <host>", line)
    line = re.sub(r"Date: .*", "Date: <date>", line)
    line = re.sub(r"Message-Id: <.*>", "Message-Id: <id>", line)
    line = re.sub(r"X-Mailer: swaks v\S+", "X-Mailer: swaks <version>", line)
    return _plain(line)


def _role(block: Block) -> str:
    text = block.text
    if "install.sh" in text and "quickstart" in text:
        return "install"
    if text.startswith("$ .venv/bin/smtp-gateway quickstart"):
        return "exit_status"
    if text.lstrip(".\n").startswith("smtp-gateway quick start"):
        return "banner"
    if block.lang == "sh" and "swaks " in text:
        return "swaks"
    if "<-  250 2.0.0 Ok: queued as" in text:
        return "transcript"
    if text.startswith('{"kind": "send"'):
        return "record"
    if "_sandbox/requests" in text:
        return "requests"
    if "_sandbox/faults" in text:
        return "faults"
    if "queue --spool" in text:
        return "queue_list"
    if " backup " in text:
        return "backup"
    return "unknown"


def test_quickstart_output(tmp_path: Path) -> None:
    """`smtp-gateway quickstart` run as the pages say, on any free ports (read back): its banner, the swaks
    transcript, the sandbox's record of the call, the queue, a fault rehearsal, a backup of the queue while it
    runs, and the exit status after Ctrl-C are what the README, the tutorial, Install and Shutdown show."""
    blocks: dict[str, list[Block]] = {}
    for block in doc_blocks("test_quickstart_output"):
        blocks.setdefault(_role(block), []).append(block)
    assert "unknown" not in blocks, [b.where() for b in blocks["unknown"]]
    for block in blocks["install"]:
        assert [c for c, _ in commands(block)] == ["./install.sh && .venv/bin/smtp-gateway quickstart"], block.where()

    real: dict[str, int] = {}  # the ports bound, once it runs

    def to_real(text: str) -> str:
        for name, port in DOC_PORTS.items():
            text = re.sub(rf"(127\.0\.0\.1|localhost):{port}\b", rf"\g<1>:{real[name]}", text)
        return text

    def to_doc(text: str) -> str:
        for name, port in DOC_PORTS.items():
            text = re.sub(rf"(127\.0\.0\.1|localhost):{real[name]}\b", rf"\g<1>:{port}", text)
        # The banner's commands name the program as started: the pages' reader starts .venv/bin/smtp-gateway.
        text = text.replace(f"{shlex.quote(str(BIN / 'smtp-gateway'))} ", ".venv/bin/smtp-gateway ")
        return re.sub(r"(sign in as admin / )\S+$", r"\1<generated password>", text)  # new at every start

    swaks_cmds = list(dict.fromkeys(c for b in blocks["swaks"] for c, _ in commands(b)))
    assert len(swaks_cmds) == 4, swaks_cmds  # three DMDS login styles, one dEngage login
    proc = spawn(
        [str(BIN / "smtp-gateway"), "quickstart", "--port", "0", "--tls-port", "0", "--sandbox-port", "0",
         "--http-port", "0"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    err, out = Lines(proc.stderr), Lines(proc.stdout)
    try:
        ready_line = err.wait_for(event_pattern("ready"))
        ready = json.loads(ready_line)
        text = err.text()
        # The banner: what it printed before the ready event, its log lines aside.
        before = text[: text.index(ready_line)].splitlines()
        banner = "\n".join(line for line in before if not line.startswith("{")).strip("\n").splitlines()
        real.update(smtp=ready["listeners"]["plain"], tls=ready["listeners"]["submission"], http=ready["http"])
        assert f"127.0.0.1:{real['smtp']}" in banner[1] and f"127.0.0.1:{real['tls']}" in banner[2]  # as bound
        real["sandbox"] = int(re.findall(r"http://127\.0\.0\.1:(\d+)", banner[3])[0])
        for block in blocks["banner"]:
            assert_shown(block.text.splitlines(), banner, lambda s: to_doc(s), block.where())

        transcripts = {}
        for command in swaks_cmds:
            sent = subprocess.run(
                shlex.split(to_real(command)), capture_output=True, text=True, timeout=60, check=False
            )
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert re.search(r"<[-~]  250 2\.0\.0 Ok: queued as [0-9a-f-]{36}\n", sent.stdout), sent.stdout
            transcripts[command] = sent.stdout.splitlines()
        demo = next(c for c in swaks_cmds if "--auth-user demo " in c)
        for block in blocks["transcript"]:
            assert_shown(block.text.splitlines(), transcripts[demo], lambda s: to_doc(_transcript(s)), block.where())

        recorded = [json.loads(line) for line in out.lines if line.startswith("{")]
        first = next(r for r in recorded if r.get("kind") == "send" and r["body"].get("asunto") == "Hello")
        for block in blocks["record"]:
            assert _plain(json.dumps(json.loads(block.text))) == _plain(json.dumps(first)), block.where()

        for block in blocks["requests"]:
            [(command, _)] = commands(block)
            fetched = subprocess.run(
                shlex.split(to_real(command)), capture_output=True, text=True, timeout=30, check=True
            )
            # The sandbox's webhook receiver records its deliveries here too (no provider): the quick start's
            # events are read every two seconds, so on a slow machine the first already came.
            kinds = [(r.get("provider"), r["kind"]) for r in json.loads(fetched.stdout)]
            assert kinds.count(("dmds", "send")) == 3 and ("dengage", "send") in kinds, kinds

        for block in blocks["queue_list"]:
            for command, shown, lines in run_shown(block, tmp_path, _env()):
                assert_shown(shown, lines, _plain, f"{block.where()}: $ {command}")

        # The rehearsal: the sandbox fails, the next message waits in the queue under a local id.
        [faults] = blocks["faults"]
        [(command, _)] = commands(faults)

        def requests() -> int:
            # The sandbox's running total (its terminal prints a poll only when the answer changes).
            with urllib.request.urlopen(f"http://127.0.0.1:{real['sandbox']}/_sandbox/health", timeout=10) as answer:
                return int(json.load(answer)["requests"])

        before = requests()
        assert subprocess.run(shlex.split(to_real(command)), capture_output=True, timeout=30, check=True).stdout
        # A reader takes a few seconds to type the next command; meanwhile the quick start's own requests (its
        # event polls) reach the sandbox. As many of them as the fault's count must leave it in place.
        count = json.loads(shlex.split(command)[-1])["count"]
        wait_for(lambda: requests() >= before + count, 60, f"{count} requests of the quick start's own after the fault")
        again = subprocess.run(shlex.split(to_real(demo)), capture_output=True, text=True, timeout=60, check=True)
        [queued] = re.findall(r"<-  250 2\.0\.0 Ok: queued as ([0-9A-F]{16})\n", again.stdout)

        # Install's backup of the queue, taken while the gateway runs, holds the queued message.
        [backup] = blocks["backup"]
        [(command, _)] = commands(backup)
        command = command.replace("/opt/smtp-gateway/.venv/bin/smtp-gateway", str(BIN / "smtp-gateway"))
        command = command.replace("-c /etc/smtp-gateway/gateway.toml", "--spool var/quickstart/spool.sqlite3")
        command = command.replace("/backup/spool.sqlite3", "backup.sqlite3")
        subprocess.run(["bash", "-c", command], cwd=tmp_path, env=_env(), timeout=60, check=True)
        listed = subprocess.run(
            [str(BIN / "smtp-gateway"), "queue", "--spool", "backup.sqlite3", "list"],
            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert f"{queued}  queued" in listed.stdout, listed.stdout
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        status = proc.wait(30)
        err.close()
        out.close()
    for block in blocks["exit_status"]:
        lines = block.text.splitlines()
        assert lines[lines.index("$ echo $?") + 1] == str(status), block.where()
    assert status == 130, err.text()  # Ctrl-C, as shells report it
    assert "Traceback" not in err.text() + out.text()


# ---- the commands written in the prose ----------------------------------------------------------------------

# A command of the pages that names its configuration or queue: where `-c`/`--spool` go depends on the command
# (`queue`'s options come before its action), so each is parsed as written.
_NAMED = re.compile(r"(?:^|[\s/])smtp-gateway ((?:queue|status|suppression|check-\w+|serve)\b.*)$")
_PLACED = re.compile(r"(?:^|\s)(?:-c|--config|--spool)(?:[\s=]|$)")


def _commands_naming_a_config() -> list[tuple[str, str]]:
    """(where, the command's arguments) of every `smtp-gateway ...` in inline code or a shell block that
    gives -c/--config/--spool; a trailing shell operator or comment cut off."""
    found: list[tuple[str, str]] = []
    for page in pages():
        text = page.read_text()
        where = str(page.relative_to(ROOT))
        written = [
            (f"{where}:{text[: m.start()].count(chr(10)) + 1}", m.group(1))
            for m in re.finditer(r"`([^`\n]*\bsmtp-gateway [^`\n]*)`", text)
        ]
        written += [(b.where(), c) for b in all_blocks() if b.page == where and b.is_shell for c, _ in commands(b)]
        for at, command in written:
            match = _NAMED.search(command)
            if match and _PLACED.search(match.group(1)):
                found.append((at, re.split(r"\s(?:#|\||&&|>|2>)\s?|\)", match.group(1))[0]))
    return found


def _parse_problem(arguments: str) -> str | None:
    """What the CLI's parser says about a command as written: None if it parses. `...` after an option is its
    value; elsewhere it stands for the rest, so a missing positional (prose: `queue -c ...`) is accepted."""
    from gateway.cli import build_parser

    tokens: list[str] = []
    for token in shlex.split(arguments):
        if token == "...":
            if tokens and tokens[-1].startswith("-"):
                tokens.append("FILE")
            continue
        tokens.append(token)
    errors: list[str] = []
    parser = build_parser()

    def refuse(message: str) -> None:
        errors.append(message)
        raise SystemExit(2)

    for each in [parser, *_subparsers(parser)]:
        each.error = refuse  # type: ignore[method-assign]
    with contextlib.suppress(SystemExit):  # refuse() stops the parse at its first error
        parser.parse_args(tokens)
    problems = [e for e in errors if not e.startswith("the following arguments are required")]
    return problems[0] if problems else None


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += [sub, *_subparsers(sub)]
    return found


def test_commands_in_the_prose_parse_as_written() -> None:
    """The rolling upgrade's `smtp-gateway queue migrate -c ...` exited 2 (unrecognized arguments: -c is
    `queue`'s option, before the action)."""
    commands_found = _commands_naming_a_config()
    assert len(commands_found) > 20  # the pages' queue/status/check-config commands were found
    problems = [f"{at}: smtp-gateway {c}: {p}" for at, c in commands_found if (p := _parse_problem(c))]
    assert problems == []


def test_the_prose_command_check_sees_an_option_after_the_action() -> None:
    assert _parse_problem("queue migrate -c ...") == "unrecognized arguments: -c FILE"
    assert _parse_problem("queue -c ...") is None  # prose: the action left to the reader
    assert _parse_problem("queue -c /etc/smtp-gateway/gateway.toml migrate") is None
