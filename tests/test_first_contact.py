"""Issue 14, first contact: every row of the newcomer's table as a subprocess, with its exit status and no
traceback; the README's install command with the distribution's Python; the quick start with the swaks
examples of the README and the tutorial."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.auth.passwords import verify_password
from gateway.queue.sqlite import SqliteQueue
from gateway.smtp.tls import write_self_signed
from tests.configs import gateway_config, listener, write
from tests.conftest_dns import dns_on_thread, make_zones
from tests.dnsserver import DnsServer
from tests.docs_blocks import all_blocks, commands, doc_blocks
from tests.harness import USER, LoopThread
from tests.procs import kill, spawn
from tests.spool_helpers import wait_for

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "gateway"]
EXAMPLE = ROOT / "config" / "example.toml"


def _env(**extra: str) -> dict[str, str]:
    """The parent's environment without any GATEWAY_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run(*args: str, cwd: Path, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*CLI, *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=60, check=False, env=_env(**env)
    )
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    return result


def config(tmp: Path, port: int = 0, security: str = "none", **overrides: Any) -> Path:
    """gateway.toml in `tmp`: one listener on `port` (0: any free one) with `security` ("none", "starttls"),
    the test account, no upstream."""
    plain = listener("plain", security, port=port)
    return write(tmp / "gateway.toml", gateway_config(tmp, listeners=[plain], **overrides))


class Lines:
    """A subprocess' output read line by line in a thread; ``wait_for`` blocks until a line matches."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._stream = stream
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        """After the process has exited: the rest of its output, then the pipe closed."""
        self._thread.join(30)
        self._stream.close()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30.0) -> str:
        def found() -> str | None:
            return next((line for line in self.lines if re.search(pattern, line)), None)

        with self._cond:
            self._cond.wait_for(lambda: found() is not None or self._closed, timeout)
            line = found()
        assert line is not None, f"no line matching {pattern!r} in:\n{''.join(self.lines)}"
        return line

    def event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """The first JSON log line of the event `name`, parsed (however its JSON is spaced)."""
        parsed = json.loads(self.wait_for(event_pattern(name), timeout))
        assert isinstance(parsed, dict)
        return parsed

    def count(self, name: str) -> int:
        """How many JSON log lines of the event `name` there are."""
        return len(re.findall(event_pattern(name), self.text()))

    def text(self) -> str:
        with self._cond:
            return "".join(self.lines)


def event_pattern(name: str) -> str:
    """A JSON log line's event, as a regular expression: the log's JSON has no space after its colons."""
    return rf'"event": ?"{re.escape(name)}"'


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    """A port held by this test process, as another program would hold it."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s


@pytest.fixture
def dns_thread(loop_thread: LoopThread) -> Iterator[DnsServer]:
    with dns_on_thread(loop_thread, make_zones()) as server:
        yield server


# ---- the README's install command with the distribution's Python --------------------------------------

DEBIAN_PYTHON = Path("/usr/bin/python3")


def _project_copy(dst: Path) -> Path:
    for name in ("pyproject.toml", "README.md", "install.sh"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(ROOT / "gateway", dst / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _install_env(path: str) -> dict[str, str]:
    """The environment install.sh runs in, as a user's shell would give it: this PATH (the python3 a test
    chose first), and none of install.sh's own variables (PYTHON, VENV) or pip's and Python's that the test
    run itself may carry (CI's PIP_CONSTRAINT, a `PYTHON=/usr/bin/python3 ./install.sh --test` run)."""
    dropped = ("PYTHON", "VENV", "PYTHONPATH", "VIRTUAL_ENV", "PIP_CONSTRAINT")
    return {**{k: v for k, v in os.environ.items() if k not in dropped}, "PATH": path}


def _path_with(tmp: Path, **programs: str) -> str:
    """A PATH whose first directory holds ``programs`` (name -> shell script body, or a file to link)."""
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    for name, body in programs.items():
        target = bindir / name
        if body.startswith("/"):
            target.symlink_to(body)
        else:
            target.write_text("#!/bin/sh\n" + body + "\n")
            target.chmod(0o755)
    return f"{bindir}:/usr/bin:/bin"


def test_install_command_works_with_the_distribution_python(tmp_path: Path) -> None:
    """README: `./install.sh && .venv/bin/smtp-gateway quickstart`, where python3 is Debian's own (PEP 668)."""
    [block] = [
        b for b in doc_blocks("test_install_command_works_with_the_distribution_python") if b.page == "README.md"
    ]
    [(command, _)] = commands(block)
    install, _, then = command.partition(" && ")
    assert (install, then) == ("./install.sh", ".venv/bin/smtp-gateway quickstart")  # the quick start: test_docs.py
    assert DEBIAN_PYTHON.exists(), "needs the distribution's /usr/bin/python3 (Debian 12 / Ubuntu 24.04)"
    project = _project_copy(tmp_path)
    env = _install_env(_path_with(tmp_path, python3=str(DEBIAN_PYTHON)))
    # A .venv left by another Python (the one running the tests, when it is not Debian's) is made anew.
    other = Path(sys.base_prefix) / "bin" / "python3"
    replaced = other.resolve() != DEBIAN_PYTHON.resolve()
    if replaced:
        subprocess.run([str(other), "-m", "venv", "--without-pip", str(project / ".venv")], check=True)
    result = subprocess.run(
        shlex.split(install), cwd=project, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert ("made with another Python" in result.stderr) == replaced, result.stderr
    version = subprocess.run(
        [str(project / ".venv/bin/python"), "-c", "import sys; print(sys.version)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (
        version
        == subprocess.run(
            [str(DEBIAN_PYTHON), "-c", "import sys; print(sys.version)"], capture_output=True, text=True, check=True
        ).stdout
    )
    gateway = subprocess.run(
        [str(project / ".venv/bin/smtp-gateway"), "hash-password"],
        input="pw\n",
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert gateway.returncode == 0 and verify_password("pw", gateway.stdout.strip()), gateway.stderr


def test_install_remakes_a_venv_left_without_pip(tmp_path: Path) -> None:
    """A first install interrupted while `python3 -m venv` ran (Ctrl-C in its first seconds, a full disk): the
    .venv has its interpreter but no pip. install.md says a half-made .venv is made anew by running it again;
    it was kept, and every re-run failed with "No module named pip"."""
    assert DEBIAN_PYTHON.exists(), "needs the distribution's /usr/bin/python3 (Debian 12 / Ubuntu 24.04)"
    project = _project_copy(tmp_path)
    env = _install_env(_path_with(tmp_path, python3=str(DEBIAN_PYTHON)))
    subprocess.run([str(DEBIAN_PYTHON), "-m", "venv", "--without-pip", str(project / ".venv")], check=True)
    result = subprocess.run(
        ["./install.sh"], cwd=project, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "is half made" in result.stderr, result.stderr
    assert (project / ".venv" / "bin" / "smtp-gateway").exists()


def test_install_without_venv_support_names_the_package(tmp_path: Path) -> None:
    """Debian without python3-venv, not root: the exact apt-get command, exit 1 (root installs it itself)."""
    project = _project_copy(tmp_path)
    path = _path_with(
        tmp_path,
        python3=f'case "$*" in *ensurepip*) exit 1;; esac; exec {DEBIAN_PYTHON} "$@"',  # no ensurepip
        id="echo 1000",  # not root
    )
    result = subprocess.run(
        ["./install.sh"],
        cwd=project,
        env=_install_env(path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    minor = subprocess.run(
        [str(DEBIAN_PYTHON), "-c", "import sys; print(sys.version_info[1])"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert result.returncode == 1
    assert f"sudo apt-get install python3.{minor}-venv" in result.stderr
    assert not (project / ".venv").exists()


def _fake_venv(project: Path, pip: str) -> None:
    """A .venv install.sh keeps (made by the same Python, with pip) whose pip runs ``pip`` (a shell body) and
    whose smtp-gateway echoes its arguments: install.sh's own lines, without a real install's minutes."""
    bindir = project / ".venv" / "bin"
    bindir.mkdir(parents=True)
    python = bindir / "python"
    python.write_text(
        "#!/bin/sh\n"
        'if [ "$1 $2" = "-m pip" ]; then\n'
        '  [ "$3" = --version ] && exit 0\n'
        f"  {pip}\n"
        "fi\n"
        f'exec {DEBIAN_PYTHON} "$@"\n'
    )
    gateway = bindir / "smtp-gateway"
    gateway.write_text('#!/bin/sh\necho "smtp-gateway $*"\n')
    for script in (python, gateway):
        script.chmod(0o755)


def test_install_from_another_directory_prints_a_command_that_works_there(tmp_path: Path) -> None:
    """`cd /tmp && /path/to/install.sh` printed `run .venv/bin/smtp-gateway`, which is not there from /tmp; the
    tree's path, quoted (it has a space), works as pasted (review firstcontact2 F2)."""
    assert DEBIAN_PYTHON.exists(), "needs the distribution's /usr/bin/python3 (Debian 12 / Ubuntu 24.04)"
    project = tmp_path / "sp ace"
    project.mkdir()
    _project_copy(project)
    _fake_venv(project, "exit 0")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _install_env(_path_with(tmp_path, python3=str(DEBIAN_PYTHON)))
    result = subprocess.run(
        [str(project / "install.sh")], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    program = shlex.quote(str(project.resolve() / ".venv/bin/smtp-gateway"))
    last = result.stderr.splitlines()[-1]
    assert last == (
        f"install.sh: installed into {shlex.quote(str(project.resolve() / '.venv'))}: run {program} "
        f"(e.g. {program} quickstart)"
    ), result.stderr
    pasted = last.partition("(e.g. ")[2].removesuffix(")")
    ran = subprocess.run(["sh", "-c", pasted], cwd=elsewhere, capture_output=True, text=True, check=False)
    assert (ran.returncode, ran.stdout) == (0, "smtp-gateway quickstart\n"), ran.stderr


NO_NETWORK = (
    'echo "WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after connection '
    "broken by 'NewConnectionError(...: Failed to establish a new connection: [Errno 111] Connection refused)': "
    "/simple/setuptools/\" >&2; echo 'ERROR: No matching distribution found for setuptools>=68' >&2; exit 1"
)


@pytest.mark.parametrize(
    ("pip", "said"),
    [
        (
            NO_NETWORK,
            "install.sh: pip could not reach the package index (no network, or a proxy needed? https_proxy, "
            "PIP_INDEX_URL and PIP_FIND_LINKS apply): run ./install.sh again once it is reachable",
        ),
        (
            "echo 'ERROR: ResolutionImpossible: for help visit https://pip.pypa.io' >&2; exit 1",
            "install.sh: pip failed: see the lines above; run ./install.sh again once it is fixed",
        ),
    ],
    ids=["no-network", "other"],
)
def test_install_says_why_pip_failed(tmp_path: Path, pip: str, said: str) -> None:
    """Without network pip's last line reads like a version problem and install.sh said nothing of its own
    (review firstcontact2 F3); pip's own lines still show."""
    assert DEBIAN_PYTHON.exists(), "needs the distribution's /usr/bin/python3 (Debian 12 / Ubuntu 24.04)"
    project = _project_copy(tmp_path)
    _fake_venv(project, pip)
    env = _install_env(_path_with(tmp_path, python3=str(DEBIAN_PYTHON)))
    result = subprocess.run(
        ["./install.sh"], cwd=project, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert lines[-1] == said, result.stderr
    assert lines[-2].startswith("ERROR: "), result.stderr


# ---- misspelled variables ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "meant"),
    [
        ("GATEWAY_ACCOUNT__ACME__APIKEY", "GATEWAY_ACCOUNTS__ACME__APIKEY"),
        ("GATEWAY_HOSTNAM", "GATEWAY_HOSTNAME"),
        ("GATEWAY_ACCOUNTS__ACME__APIKYE", "GATEWAY_ACCOUNTS__ACME__APIKEY"),
        ("GATEWAY_DNS__NAMESERVER", "GATEWAY_DNS__NAMESERVERS"),
        ("gateway_log__formatt", "GATEWAY_LOG__FORMAT"),  # pydantic-settings reads names in any case
    ],
)
@pytest.mark.parametrize("command", [["check-config"], ["serve"], ["queue", "list"]])
def test_misspelled_variable_names_the_nearest_key(
    tmp_path: Path, variable: str, meant: str, command: list[str]
) -> None:
    secret = "meant-to-be-the-apikey-0003"
    path = str(config(tmp_path))
    result = run(command[0], "-c", path, *command[1:], cwd=tmp_path, **{variable: secret})
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"unknown environment variable {variable}:" in result.stderr
    assert f"did you mean {meant}?" in result.stderr
    assert secret not in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_foreign_gateway_variables_are_not_settings(tmp_path: Path) -> None:
    """Kubernetes' service links for a Service named "gateway", and CGI's GATEWAY_INTERFACE."""
    foreign = {
        "GATEWAY_SERVICE_HOST": "10.0.0.1",
        "GATEWAY_SERVICE_PORT": "587",
        "GATEWAY_PORT": "tcp://10.0.0.1:587",
        "GATEWAY_PORT_587_TCP_ADDR": "10.0.0.1",
        "GATEWAY_INTERFACE": "CGI/1.1",
    }
    result = run("check-config", "--config-only", "-c", str(config(tmp_path)), cwd=tmp_path, **foreign)
    assert result.returncode == 0, result.stderr


# ---- TOML syntax error -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["check-config", "serve", "check-domains"])
def test_toml_syntax_error_names_file_line_and_column(tmp_path: Path, command: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('hostname = "gw.example"\n[limits\nmax_recipients = 5\n')
    result = run(command, "-c", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        f"smtp-gateway: {path}:2:8: TOML syntax error: Expected ']' at the end of a table declaration\n"
    )


def test_unknown_file_key_suggests_the_nearest(tmp_path: Path) -> None:
    path = config(tmp_path, limits={"max_recipeints": 5})
    result = run("check-config", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "limits.max_recipeints: unknown key; did you mean max_recipients?" in result.stderr


# ---- port taken --------------------------------------------------------------------------------------------


def test_serve_with_the_port_taken_names_it_and_its_process(tmp_path: Path, listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    result = run("serve", "-c", str(config(tmp_path, port)), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"smtp-gateway: listener plain 127.0.0.1:{port}: in use by pid {os.getpid()} ("), (
        result.stderr
    )
    assert result.stderr.rstrip().endswith("stop it or choose another port")
    assert len(result.stderr.splitlines()) == 1


def test_quickstart_with_the_port_taken_names_it(tmp_path: Path, listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    result = run(
        "quickstart",
        "--workdir",
        str(tmp_path / "qs"),
        "--port",
        str(port),
        "--tls-port",
        "0",
        "--sandbox-port",
        "0",
        "--http-port",
        "0",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"smtp-gateway: quick start SMTP (--port) 127.0.0.1:{port}: in use by pid {os.getpid()}")
    # The program as it was started (here `python -m gateway`), so that the line can be pasted.
    assert f"pick free ports: {shlex.quote(sys.executable)} -m gateway quickstart --port" in lines[1]
    assert len(lines) == 2


def test_check_config_names_the_port_holder(tmp_path: Path, listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    result = run("check-config", "-c", str(config(tmp_path, port)), cwd=tmp_path)
    assert result.returncode == 1
    assert f"problem: listener plain 127.0.0.1:{port}: in use by pid {os.getpid()}" in result.stderr
    assert json.loads(result.stdout)["listeners"][0]["port"] == port  # the configuration is still shown


def test_check_config_notes_a_port_held_by_an_smtp_gateway_without_claiming_it_is_this_one(tmp_path: Path) -> None:
    """A port held by some smtp-gateway (here a sandbox; a quick start in another terminal alike) is a note,
    exit 0: it may be this configuration's gateway, checked before a restart. The note says what is known,
    the holder's pid, and that serve fails if it is another gateway."""
    proc = spawn(
        [*CLI, "sandbox", "--listen", "127.0.0.1:0", "--quiet"],
        cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    err = Lines(proc.stderr)
    try:
        port = _bound(err.wait_for("compatible upstream on http"))
        result = run("check-config", "-c", str(config(tmp_path, port)), cwd=tmp_path)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        err.close()
    assert result.returncode == 0, result.stderr
    [note] = [line for line in result.stderr.splitlines() if f"127.0.0.1:{port}" in line]
    assert note.startswith(f"smtp-gateway: note: listener plain 127.0.0.1:{port}: in use by pid {proc.pid} ("), note
    assert note.endswith(
        "(an smtp-gateway: if it is not the one running this configuration, serve fails until it stops)"
    ), note


def test_sandbox_with_the_port_taken_names_it(tmp_path: Path, listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    result = run("sandbox", "--listen", f"127.0.0.1:{port}", cwd=tmp_path)
    assert result.returncode == 1
    assert f"sandbox --listen 127.0.0.1:{port}: in use by pid {os.getpid()}" in result.stderr


# ---- hash-password with piped input; queue list | head ------------------------------------------------------


def test_hash_password_reads_a_pipe_without_stdin_flag(tmp_path: Path) -> None:
    result = run("hash-password", cwd=tmp_path, stdin="piped secret\n")
    assert result.returncode == 0, result.stderr
    assert verify_password("piped secret", result.stdout.strip())
    assert "piped secret" not in result.stdout + result.stderr


def test_hash_password_with_nothing_piped_says_how(tmp_path: Path) -> None:
    result = run("hash-password", cwd=tmp_path, stdin="")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "empty password" in result.stderr and "--stdin" in result.stderr


def _empty_queue(spool: Path) -> None:
    """The queue file a first `serve` creates (`queue migrate` only migrates an existing one)."""

    async def create() -> None:
        store = SqliteQueue(spool)
        try:
            await store.open()
        finally:
            await store.close()

    asyncio.run(create())


def test_queue_list_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    spool = tmp_path / "var" / "quickstart" / "spool.sqlite3"
    _empty_queue(spool)
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` that has already gone: every write gets EPIPE
    try:
        proc = subprocess.run(
            [*CLI, "queue", "--spool", str(spool), "list", "--json"],
            cwd=tmp_path,
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=_env(),
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141  # what a shell reports for coreutils killed by SIGPIPE
    assert proc.stderr == b""


# ---- TLS files ---------------------------------------------------------------------------------------------


def _tls_config(tmp: Path, cert: Path, key: Path) -> Path:
    return config(tmp, security="starttls", tls={"cert_file": str(cert), "key_file": str(key)})


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_missing_certificate_is_named(tmp_path: Path, command: str) -> None:
    _, key = write_self_signed(tmp_path / "tls")
    missing = tmp_path / "tls" / "fullchain.pem"
    result = run(command, "-c", str(_tls_config(tmp_path, missing, key)), cwd=tmp_path)
    assert result.returncode == 1
    line = f"tls.cert_file {missing} does not exist: create it or set tls.cert_file to the right file"
    assert f"smtp-gateway: {'problem: ' if command == 'check-config' else ''}{line}\n" in result.stderr


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_unloadable_key_is_named(tmp_path: Path, command: str) -> None:
    cert, _ = write_self_signed(tmp_path / "a")
    _, other_key = write_self_signed(tmp_path / "b")
    result = run(command, "-c", str(_tls_config(tmp_path, cert, tmp_path)), cwd=tmp_path)  # a directory
    assert result.returncode == 1
    assert f"tls.key_file {tmp_path} is a directory: set tls.key_file to a PEM file" in result.stderr
    result = run(command, "-c", str(_tls_config(tmp_path, cert, other_key)), cwd=tmp_path)  # not its key
    assert result.returncode == 1
    assert (
        f"tls.cert_file {cert} and tls.key_file {other_key} do not load as a certificate and its key" in result.stderr
    )


def test_tls_listener_without_certificate_says_what_to_set(tmp_path: Path) -> None:
    result = run("serve", "-c", str(config(tmp_path, security="starttls", tls=None)), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        "smtp-gateway: listener plain uses TLS but tls.cert_file and tls.key_file are not set: set both to PEM "
        'files (or tls = "none" on a loopback-only listener)\n'
    )


def test_example_config_reports_its_example_certificate_paths(tmp_path: Path) -> None:
    result = run("check-config", "-c", str(EXAMPLE), cwd=tmp_path)
    assert result.returncode == 1
    assert "problem: tls.cert_file /etc/smtp-gateway/tls/fullchain.pem does not exist" in result.stderr
    assert "problem: tls.key_file /etc/smtp-gateway/tls/privkey.pem does not exist" in result.stderr


def test_good_configuration_is_ok(tmp_path: Path) -> None:
    cert, key = write_self_signed(tmp_path / "tls")
    result = run("check-config", "-c", str(_tls_config(tmp_path, cert, key)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "configuration OK\n"


# ---- no config file at all -----------------------------------------------------------------------------------


def test_without_a_config_file_the_tools_work(tmp_path: Path, dns_thread: DnsServer) -> None:
    listed = run("queue", "list", cwd=tmp_path)
    assert (listed.returncode, listed.stderr.split(" (")[0]) == (
        1,
        f"smtp-gateway: no queue at {tmp_path}/var/spool.sqlite3",
    )
    spool = tmp_path / "var" / "quickstart" / "spool.sqlite3"
    _empty_queue(spool)
    assert run("queue", "--spool", str(spool), "migrate", cwd=tmp_path).returncode == 0
    listed = run("queue", "--spool", str(spool), "list", cwd=tmp_path)
    assert (listed.returncode, listed.stdout) == (0, f"queue sqlite:///{spool}: empty\n"), listed.stderr
    hashed = run("hash-password", cwd=tmp_path, stdin="pw\n")
    assert hashed.returncode == 0 and verify_password("pw", hashed.stdout.strip())
    domains = run(
        "check-domains",
        "dom1.test=dmds-dom1@nl.dom1.test",
        cwd=tmp_path,
        GATEWAY_DNS__NAMESERVERS='["127.0.0.1"]',
        GATEWAY_DNS__PORT=str(dns_thread.port),
    )
    assert domains.returncode == 0, domains.stderr
    assert "1 domain(s): 1 ok" in domains.stdout
    nothing = run("check-domains", cwd=tmp_path)
    assert nothing.returncode == 1 and "no sender_domains configured" in nothing.stderr


def test_without_a_config_file_serve_says_what_is_missing(tmp_path: Path) -> None:
    """The hint alone, as troubleshooting.md shows it: not the built-in defaults' note on a relative spool_path
    and their listener `submission` without TLS files first, of a configuration never written (review
    firstcontact2 F5)."""
    result = run("serve", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        "smtp-gateway: no config file was given (--config FILE or $GATEWAY_CONFIG); "
        "to try the gateway without one: smtp-gateway quickstart\n"
    )


def test_configured_by_variables_alone_serve_names_their_problems_and_the_hint(tmp_path: Path) -> None:
    result = run("serve", cwd=tmp_path, GATEWAY_HOSTNAME="relay.example.com")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if not line.startswith("smtp-gateway: note:")]
    assert "listener submission uses TLS but tls.cert_file and tls.key_file are not set" in lines[0]
    assert lines[-1].startswith("smtp-gateway: no config file was given"), lines


# ---- DNS resolver not answering ------------------------------------------------------------------------------


def test_broken_resolver_is_451_and_logged_once(tmp_path: Path) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # held, never read: no query is answered
    silent.bind(("127.0.0.1", 0))
    dns = {"nameservers": ["127.0.0.1"], "port": silent.getsockname()[1], "timeout": 0.3, "check_sender_domain": True}
    proc = spawn(
        [*CLI, "serve", "-c", str(config(tmp_path, dns=dns, log={"format": "json"})), "--drain-timeout", "1"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    out = Lines(proc.stderr)
    try:
        port = out.event("ready")["listeners"]["plain"]
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.login(USER, "scanner-password")
            replies = [client.mail("billing@acme.example") for _ in range(3)]
            client.rset()
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(30)
        out.close()
        silent.close()
    assert status == 0, out.text()
    for code, text in replies:
        assert code == 451 and text.decode().startswith("4.4.3 <billing@acme.example>: "), text
        assert "DNS resolver not answering" in text.decode() and "does not exist" not in text.decode()
    broken = [json.loads(line) for line in out.lines if '"dns_resolver_broken"' in line]
    # the startup report's lookups and the three MAIL commands: one error line within the minute
    assert len(broken) == 1 and broken[0]["level"] == "error", out.text()
    assert "Traceback" not in out.text()


# ---- the quick start, with the documented swaks examples --------------------------------------------------


def documented_swaks() -> list[str]:
    """The distinct swaks commands of the README and the docs (the quick start's), line continuations joined."""
    found = [c for b in all_blocks() if b.lang == "sh" for c, _ in commands(b) if c.startswith("swaks ")]
    return list(dict.fromkeys(found))


def test_quickstart_answers_the_documented_swaks_examples(tmp_path: Path) -> None:
    assert shutil.which("swaks"), "swaks is installed by .ci/run (apt-get install swaks)"
    examples = documented_swaks()
    assert len(examples) == 4, examples  # three DMDS login styles, one dEngage login
    proc = spawn(
        [*CLI, "quickstart", "--port", "0", "--tls-port", "0", "--sandbox-port", "0", "--http-port", "0"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err, out = Lines(proc.stderr), Lines(proc.stdout)
    try:
        err.wait_for(r"\bready\b")
        # The ports bound, as the banner shows them.
        smtp = _bound(err.wait_for(r"SMTP \(loopback"))
        tls = _bound(err.wait_for(r"SMTP submission with STARTTLS"))
        sandbox = _bound(err.wait_for(r"sandbox upstream"))
        for command in examples:
            argv = shlex.split(
                command.replace("127.0.0.1:2525", f"127.0.0.1:{smtp}").replace("127.0.0.1:2587", f"127.0.0.1:{tls}")
            )
            sent = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert re.search(r"<[-~]  250 2\.0\.0 Ok: queued as [0-9a-f-]{36}\n", sent.stdout), sent.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{sandbox}/_sandbox/requests", timeout=30) as response:
            recorded = json.load(response)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a graceful stop (130, as shells report it), no traceback
        status = proc.wait(30)
        err.close()
        out.close()
    sends = [r for r in recorded if r["path"].startswith("/v1/envio/")]
    assert [(r["status"], r["body"]["campana_id"]) for r in sends] == [(200, 22), (200, 22), (200, 23)]
    assert [r["body"]["asunto"] for r in sends][::2] == ["Hello", "Monthly report"]  # the [23] prefix removed
    dengage = [r for r in recorded if r["kind"] == "send" and r["path"] == "/rest/transactional/email"]
    assert [(r["status"], r["body"]["send"]["to"]) for r in dengage] == [(200, "someone@example.net")]
    record = tmp_path / "var" / "quickstart" / "sandbox-requests.jsonl"
    assert len([json.loads(line) for line in record.read_text().splitlines()]) >= 3
    assert status == 130, err.text()
    assert "Traceback" not in err.text() + out.text()


def test_quickstart_banner_commands_run_when_pasted(tmp_path: Path) -> None:
    """The banner's "what to run next" lines, pasted into the shell where the README's
    `./install.sh && .venv/bin/smtp-gateway quickstart` ran (nothing put .venv/bin on PATH), with a --workdir
    holding a space: they name the program by its path and quote the queue's."""
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "smtp-gateway").symlink_to(Path(sys.executable).parent / "smtp-gateway")
    workdir = tmp_path / "my work"
    proc = spawn(
        [".venv/bin/smtp-gateway", "quickstart", "--workdir", str(workdir), "--port", "0", "--tls-port", "0",
         "--sandbox-port", "0", "--http-port", "0"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    err, out = Lines(proc.stderr), Lines(proc.stdout)
    try:
        err.event("ready")
        text = err.text()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        err.close()
        out.close()
    shown = re.findall(r"^.*?(\S*smtp-gateway (?:status|suppression list) --spool .*)$", text, re.M)
    assert [line.split(" --spool")[0] for line in shown] == [
        ".venv/bin/smtp-gateway status",
        ".venv/bin/smtp-gateway suppression list",
    ], text
    # The user's PATH: the system's, without the environment running the tests.
    env = _env()
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p and "smtp" not in p)
    for line in shown:
        pasted = subprocess.run(
            ["bash", "-c", line.replace("<id>", "no-such-id")], cwd=tmp_path, env=env, capture_output=True,
            text=True, timeout=60, check=False,
        )  # fmt: skip
        assert pasted.returncode in (0, 1) and "Traceback" not in pasted.stderr, (line, pasted.stderr)
        assert "no queue at" not in pasted.stdout + pasted.stderr, (line, pasted.stdout, pasted.stderr)


def _bound(line: str) -> int:
    match = re.search(r"127\.0\.0\.1:(\d+)", line)
    assert match is not None, line
    return int(match.group(1))


# ---- Ctrl-C ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
@pytest.mark.parametrize("sigint", ["inherited", "ignored"])
def test_the_sandbox_stops_on_sigint_and_sigterm(tmp_path: Path, sigint: str, sig: signal.Signals, status: int) -> None:
    """Ctrl-C is 130, SIGTERM a clean 0; also when started from a script with SIGINT ignored (`cmd &` in a
    shell without job control), as a test harness or a CI job starts it."""
    argv = [*CLI, "sandbox", "--listen", "127.0.0.1:0", "--quiet"]
    if sigint == "ignored":
        argv = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *argv]
    proc = spawn(argv, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = Lines(proc.stderr)
    _bound(err.wait_for("compatible upstream on http"))  # the port bound, named
    proc.send_signal(sig)
    assert proc.wait(30) == status
    err.close()
    assert "Traceback" not in err.text()


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_serve_exit_status_after_a_clean_stop(tmp_path: Path, sig: signal.Signals, status: int, workers: str) -> None:
    """SIGTERM (systemctl stop, docker stop) is a clean stop: 0. Ctrl-C is 130, as shells report it; the
    same for a supervisor of workers (which passes the stop on to them)."""
    path = config(tmp_path, log={"format": "json"})
    proc = spawn(
        [*CLI, "serve", "-c", str(path), "--drain-timeout", "1", "--workers", workers],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    err = Lines(proc.stderr)
    wait_for(lambda: err.count("ready") == int(workers), 30, "every worker ready")
    proc.send_signal(sig)
    assert proc.wait(30) == status, err.text()
    err.close()
    assert err.count("stopped") == int(workers), err.text()
    if workers == "1":  # (a supervisor passes SIGTERM on to its workers for either)
        assert err.event("shutting_down")["signal"] == sig.name
    assert "Traceback" not in err.text()


_SIGINT_DEFAULT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
)


@pytest.mark.parametrize("entry", ["console script", "python -m gateway"])
def test_ctrl_c_while_the_modules_load_exits_130_quietly(tmp_path: Path, entry: str) -> None:
    """A Ctrl-C in the first tens of milliseconds, while the command's modules are imported: the import of
    pydantic is held here (a stand-in module on PYTHONPATH) until the signal has come."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    loading = tmp_path / "loading"
    (shadow / "pydantic.py").write_text(
        f"import pathlib, time\npathlib.Path({str(loading)!r}).touch()\ntime.sleep(60)\n"
    )
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(shadow), env["PYTHONPATH"]])
    argv = [str(Path(sys.executable).parent / "smtp-gateway")] if entry == "console script" else CLI
    # Started as a terminal starts it, with SIGINT at its default: a runner started in the background (`cmd &`
    # without job control) passes SIGINT on ignored, and Python keeps an inherited ignore, so a Ctrl-C during
    # the imports could not be delivered at all. exec keeps the default set here.
    argv = [sys.executable, "-c", _SIGINT_DEFAULT, *argv]
    proc = spawn([*argv, "check-config"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: loading.exists() or proc.poll() is not None, 30, "the import of pydantic")
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        kill(proc)
        for pipe in (proc.stdout, proc.stderr):  # not left to a later test's garbage collection
            assert pipe is not None
            pipe.close()
    assert (proc.returncode, out, err) == (130, b"", b"\n")
