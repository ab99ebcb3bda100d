"""Start/stop helpers for every server the benchmark measures (all on 127.0.0.1, free ports)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from procmon import die_with_parent

BENCH_DIR = Path(__file__).resolve().parent
HOST = "127.0.0.1"
RUN_DIR_PREFIX = "bench-run-"
POSTFIX_DIR_PREFIX = "bench-postfix-"
OWNER_FILE = "bench.pid"
PIDS_FILE = "servers.pids"


class SetupError(Exception):
    """A server could not be started; the benchmark skips its rows."""


@dataclass(frozen=True)
class Settled:
    """What a server's settle() found once a point's messages were sent.

    `error`: the accepted messages did not all reach what stands behind the server (the sandbox, Postfix's
    sink), or that cannot be told: the point's rate is not a relay rate and is published as an error.
    `warning`: they did, with something worth a note (calls the sandbox answered with 429).
    `backlog`, `drain_s`: for a server that answers 250 once a message is in its own queue (Postfix), how
    many were still queued when the client's window closed and how long they took to leave after it: the
    client's rate counts them, the relaying they still needed falls outside its window. None: not measured.
    """

    error: str = ""
    warning: str = ""
    backlog: int | None = None
    drain_s: float | None = None

    def __str__(self) -> str:
        return "; ".join(text for text in (self.error, self.warning) if text)


def free_port() -> int:
    """A currently free loopback TCP port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def greeting(port: int, timeout: float = 1.0) -> str:
    """Connect, read the first reply line and close ("" on any failure)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            data = sock.recv(512)
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
            return data.decode("utf-8", "replace")
    except OSError:
        return ""


def port_open(port: int) -> bool:
    """True when something accepts TCP connections on the port."""
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(check: object, what: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `check()` until true; fail early when `proc` exits."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise SetupError(f"{what}: process exited with status {proc.returncode}")
        time.sleep(0.05)
    raise SetupError(f"{what}: not ready after {timeout:.0f}s")


def wait_for_smtp(port: int, what: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until the port answers with a 220 greeting."""
    wait_until(lambda: greeting(port).startswith("220"), what, timeout, proc)


def spawn(
    cmd: list[str], log: Path, stdout_pipe: bool = False, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a server in its own session (so Ctrl-C reaches only the bench), logging to `log`."""
    log_fh = log.open("ab")
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log_fh,
            stderr=log_fh,
            start_new_session=True,
            env=env,
            preexec_fn=die_with_parent,
        )
    finally:
        log_fh.close()
    with (log.parent / PIDS_FILE).open("a") as fh:  # for stop_stale() after a `kill -9` of the bench
        fh.write(f"{proc.pid} {cmd[0]}\n")
    return proc


def claim(directory: Path) -> None:
    """Mark a temp dir as belonging to this bench process."""
    (directory / OWNER_FILE).write_text(f"{os.getpid()}\n")


def _stale(directory: Path) -> bool:
    """True if the bench process that claimed `directory` is gone."""
    try:
        owner = int((directory / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return owner != os.getpid() and not _alive(owner)


def _kill_recorded(directory: Path) -> None:
    """SIGTERM the servers listed in a stale run dir, if they still run the recorded program."""
    try:
        lines = (directory / PIDS_FILE).read_text().splitlines()
    except OSError:
        return
    for line in lines:
        pid_text, _, program = line.partition(" ")
        try:
            argv0 = Path(f"/proc/{pid_text}/cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, UnicodeDecodeError):
            continue
        if argv0 == program and _alive(int(pid_text)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid_text), signal.SIGTERM)


def stop_stale() -> None:
    """Stop servers and Postfix instances left behind by a bench run that was killed (kill -9)."""
    tmp = Path(tempfile.gettempdir())
    for directory in tmp.glob(RUN_DIR_PREFIX + "*"):
        if _stale(directory):
            _kill_recorded(directory)
            shutil.rmtree(directory, ignore_errors=True)
    for directory in tmp.glob(POSTFIX_DIR_PREFIX + "*"):
        if _stale(directory):
            stop_instance(directory)
            shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def no_interrupts() -> Iterator[None]:
    """Ignore further Ctrl-C while servers are being stopped (main thread only)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it does not exit in time."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(log: Path, lines: int = 15) -> str:
    """Last lines of a log file, for error messages."""
    try:
        return " | ".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Server:
    """Base class: a named server with a port, start/stop, RSS roots and a between-points hook."""

    label = "server"

    def __init__(self, workdir: Path) -> None:
        self.info = ""  # extra description, e.g. the event loop in use
        self.auth: tuple[str, str] | None = None  # AUTH PLAIN credentials for smtpload.py
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.label}.log"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None

    def rss_roots(self) -> list[int]:
        """Pids whose process trees make up the server (for peak RSS)."""
        return [self.proc.pid] if self.proc is not None else []

    def settle(self, expected: int, slack: int = 0) -> Settled:
        """Called after each run of `expected` (+ up to `slack` in flight) messages."""
        return Settled()

    def __enter__(self) -> Server:
        try:
            self.start()
        except BaseException:
            with no_interrupts():
                self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with no_interrupts():
            self.stop()


class SmtpSink(Server):
    """Postfix's smtp-sink: a no-op C SMTP server."""

    label = "smtp-sink"

    def start(self) -> None:
        binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        if not Path(binary).exists():
            raise SetupError("smtp-sink not found (apt-get install postfix)")
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        for _ in range(5):
            self.port = free_port()
            self.proc = spawn([binary, *user, "-h", "sink.bench", f"{HOST}:{self.port}", "1024"], self.log)
            try:
                wait_for_smtp(self.port, self.label, 10, self.proc)
                return
            except SetupError:
                terminate(self.proc)
        raise SetupError(f"smtp-sink did not start: {log_tail(self.log)}")


class BareAiosmtpd(Server):
    """bench/bare_aiosmtpd.py: aiosmtpd whose DATA handler only answers 250."""

    label = "bare-aiosmtpd"

    def start(self) -> None:
        cmd = [sys.executable, str(BENCH_DIR / "bare_aiosmtpd.py"), "--host", HOST, "--port", "0"]
        self.proc = spawn(cmd, self.log, stdout_pipe=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("LISTENING "):
            raise SetupError(f"bare_aiosmtpd did not start: {line!r} {log_tail(self.log)}")
        address, _, loop_name = line.removeprefix("LISTENING ").partition(" ")
        self.info = f"{loop_name} event loop"
        self.port = int(address.rpartition(":")[2])
        wait_for_smtp(self.port, self.label, 10, self.proc)


POSTFIX_MAIN_CF = """\
# Throwaway benchmark instance: never the system config, never port 25.
compatibility_level = 3.6
config_directory = {conf}
queue_directory = {queue}
data_directory = {data}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench
mydomain = bench
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
relay_domains =
local_recipient_maps =
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_banner = $myhostname ESMTP
smtp_tls_security_level = none
smtpd_tls_security_level = none
smtputf8_enable = no{tls}
biff = no
append_dot_mydomain = no
maillog_file = {maillog}
maillog_file_prefixes = {tmp}
"""

POSTFIX_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
{implicit}"""

# With certificates (bench/tls.py): STARTTLS offered on the port, TLS from the first byte on a second one,
# TLS sessions resumable (tickets; session ids through the cache database, shared by the smtpd processes).
POSTFIX_TLS_CF = """
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_session_cache_database = btree:{data}/smtpd_scache
smtpd_tls_loglevel = 0
"""
POSTFIX_IMPLICIT_CF = """{listen} inet  n       -       n       -       -       smtpd
  -o smtpd_tls_wrappermode=yes
"""

QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class PrivatePostfix(Server):
    """A private Postfix instance (own config + queue in a temp dir) relaying to its own smtp-sink."""

    label = "postfix"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.tmp: Path | None = None
        self.sink = SmtpSink(workdir)
        self.sink.label = "postfix-relay-sink"
        self.tls: tuple[Path, Path] | None = None  # (certificate, key): STARTTLS and an implicit-TLS port
        self.tls_port = 0

    @property
    def conf(self) -> Path:
        assert self.tmp is not None
        return self.tmp / "etc"

    @property
    def queue(self) -> Path:
        assert self.tmp is not None
        return self.tmp / "spool"

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "MAIL_CONFIG": str(self.conf)}
        return subprocess.run(
            ["postfix", "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )

    def _write_config(self) -> None:
        assert self.tmp is not None
        for sub in ("etc", "spool", "data"):
            (self.tmp / sub).mkdir(mode=0o755)
        os.chown(self.tmp / "data", *_postfix_ids())
        main_cf = POSTFIX_MAIN_CF.format(
            conf=self.conf,
            queue=self.queue,
            data=self.tmp / "data",
            sink_port=self.sink.port,
            maillog=self.tmp / "maillog",
            tmp=self.tmp,
            tls=""
            if self.tls is None
            else POSTFIX_TLS_CF.format(cert=self.tls[0], key=self.tls[1], data=self.tmp / "data"),
        )
        (self.conf / "main.cf").write_text(main_cf)
        implicit = "" if self.tls is None else POSTFIX_IMPLICIT_CF.format(listen=f"{HOST}:{self.tls_port}")
        master_cf = POSTFIX_MASTER_CF.format(listen=f"{HOST}:{self.port}", implicit=implicit)
        (self.conf / "master.cf").write_text(master_cf)

    def start(self) -> None:
        if os.geteuid() != 0:
            raise SetupError("the private Postfix instance needs root (postfix start)")
        if shutil.which("postfix") is None:
            raise SetupError("postfix not found (apt-get install postfix)")
        self.sink.start()
        self.tmp = Path(tempfile.mkdtemp(prefix=POSTFIX_DIR_PREFIX))
        self.tmp.chmod(0o755)
        claim(self.tmp)
        self.port = free_port()
        self.tls_port = free_port() if self.tls is not None else 0
        self._write_config()
        result = self._postfix("start")
        if result.returncode != 0:
            raise SetupError(f"postfix start failed: {result.stderr.strip()} {self._maillog_tail()}")
        wait_for_smtp(self.port, self.label, 30)

    def _maillog_tail(self) -> str:
        return log_tail(self.tmp / "maillog") if self.tmp else ""

    def master_pid(self) -> int | None:
        """Pid of the instance's master process, from its pid file."""
        try:
            pid = int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def rss_roots(self) -> list[int]:
        pid = self.master_pid()
        return [pid] if pid else []

    def queued(self) -> int:
        """Number of messages still in the instance's queues."""
        total = 0
        for name in QUEUES:
            for _root, _dirs, files in os.walk(self.queue / name):
                total += len(files)
        return total

    def settle(self, expected: int, slack: int = 0, timeout: float = 120.0) -> Settled:
        """Wait until the queue has drained to the sink, so points do not overlap; say how many messages
        were queued when the point's window closed and how long they took to drain (the rate counts them)."""
        started = time.monotonic()
        backlog = left = self.queued()
        while left and time.monotonic() < started + timeout:
            time.sleep(0.1)
            left = self.queued()
        drain_s = time.monotonic() - started
        if left:
            error = f"postfix queue not empty after {timeout:.0f}s ({left} left)"
            return Settled(error=error, backlog=backlog, drain_s=drain_s)
        return Settled(backlog=backlog, drain_s=drain_s)

    def stop(self) -> None:
        if self.tmp is not None:
            stop_instance(self.tmp)
        self.sink.stop()
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                shutil.copy2(self.tmp / "maillog", self.workdir / "postfix-maillog")
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def _alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def stop_instance(tmp: Path) -> None:
    """`postfix stop` the instance under `tmp`, then SIGKILL its master's group if it is still there."""
    conf = tmp / "etc"
    if not (conf / "main.cf").exists():
        return
    try:
        pid: int | None = int((tmp / "spool" / "pid" / "master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = None
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        subprocess.run(
            ["postfix", "-c", str(conf), "stop"],
            capture_output=True,
            timeout=30,
            env={**os.environ, "MAIL_CONFIG": str(conf)},
            check=False,
        )
    if pid is not None and _alive(pid) and not _wait_gone(pid, 15):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _postfix_ids() -> tuple[int, int]:
    """uid/gid of the postfix user."""
    import pwd

    entry = pwd.getpwnam("postfix")
    return entry.pw_uid, entry.pw_gid


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until a (non-child) process has exited; False if it is still there."""
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
