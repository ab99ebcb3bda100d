"""The smtp-gateway under test plus its sandbox upstream (DMDS or dEngage), configured from
bench/gateway.toml.in and bench/accounts.toml.in."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from string import Template

import genmsg
from servers import (
    BENCH_DIR,
    HOST,
    Server,
    Settled,
    SetupError,
    free_port,
    log_tail,
    spawn,
    terminate,
    wait_for_smtp,
    wait_until,
)

REPO_DIR = BENCH_DIR.parent
TEMPLATE = BENCH_DIR / "gateway.toml.in"
ACCOUNTS = BENCH_DIR / "accounts.toml.in"
TLS_LISTENERS = BENCH_DIR / "tls.toml.in"
PROVIDERS = ("dmds", "dengage")
DENGAGE_PASSWORD = "bench-api-password"
# With the limiter on, the dEngage sandbox enforces dEngage's published 30 requests/s per IP and the
# gateway runs the account's default limit (25/s, burst 5: at most 29 in any second).
DENGAGE_UPSTREAM_LIMIT = 30
LOGIN = "bench"
PASSWORD = "bench-password"
APIKEY = "bench-apikey"


def gateway_env() -> dict[str, str]:
    """Environment for gateway processes: the repo on PYTHONPATH, no stray GATEWAY_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_DIR), env.get("PYTHONPATH", "")) if p)
    return env


def gateway_command() -> list[str]:
    """How to run the gateway CLI: the console script (next to this Python first), else `python -m gateway`."""
    beside = Path(sys.executable).parent / "smtp-gateway"
    script = str(beside) if beside.exists() else shutil.which("smtp-gateway")
    if script:
        return [script]
    return [sys.executable, "-m", "gateway"]


def check_cli() -> list[str]:
    """Return the gateway command if `serve` and `sandbox` are available; raise SetupError otherwise."""
    cmd = gateway_command()
    if (
        cmd[0] == sys.executable
        and importlib.util.find_spec("gateway") is None
        and not (REPO_DIR / "gateway" / "__main__.py").exists()
    ):
        raise SetupError("gateway CLI not found (no smtp-gateway script, no gateway/__main__.py)")
    for sub in ("serve", "sandbox"):
        try:
            result = subprocess.run(
                [*cmd, sub, "--help"],
                capture_output=True,
                text=True,
                timeout=60,
                env=gateway_env(),
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SetupError(f"gateway CLI `{sub} --help` failed: {exc}") from None
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise SetupError(f"gateway CLI `{' '.join(cmd)} {sub} --help` failed: {' | '.join(tail)}")
    return cmd


def password_hash(password: str) -> str:
    """A gateway password hash (gateway.auth.passwords when importable, else the same scrypt format)."""
    sys.path.insert(0, str(REPO_DIR))
    try:
        from gateway.auth.passwords import hash_password

        return str(hash_password(password))
    except ImportError:
        salt = os.urandom(16)
        digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
        return "$".join(
            ("scrypt", "16384", "8", "1", base64.b64encode(salt).decode(), base64.b64encode(digest).decode())
        )
    finally:
        sys.path.remove(str(REPO_DIR))


def account_block(provider: str) -> str:
    """The [accounts.bench] template of one provider: the part of accounts.toml.in after `# -- <provider>`."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in ACCOUNTS.read_text().splitlines():
        if line.startswith("# -- "):
            current = blocks.setdefault(line[5:].strip(), [])
        elif current is not None:
            current.append(line)
    return "\n".join(blocks[provider]).strip() + "\n"


def render_config(
    port: int,
    api_base: str,
    spool_path: Path,
    dns_port: int,
    provider: str = "dmds",
    rate_limit: float = 0.0,
    queue_url: str = "",
) -> str:
    """Fill bench/gateway.toml.in with the provider's account from bench/accounts.toml.in."""
    values = {
        "api_base": api_base,
        "apikey": APIKEY,
        "dengage_password": DENGAGE_PASSWORD,
        "rate_limit": rate_limit,
        "sender_domain": genmsg.SENDER_DOMAIN,
        "password_hash": password_hash(PASSWORD),
    }
    account = Template(account_block(provider)).substitute(values)
    return Template(TEMPLATE.read_text()).substitute(
        port=port,
        dns_port=dns_port,
        spool_path=str(spool_path),
        queue=f'queue_url = "{queue_url}"' if queue_url else "",
        account=account,
    )


def start_postgres() -> tuple[object, str]:
    """A private PostgreSQL cluster (the tests' own: tests/pgserver.py) and a database URL on it."""
    sys.path.insert(0, str(REPO_DIR))
    try:
        from tests.pgserver import PgCluster, PgUnavailable
    finally:
        sys.path.remove(str(REPO_DIR))
    try:
        cluster = PgCluster()
        cluster.start()
    except (PgUnavailable, RuntimeError) as exc:
        raise SetupError(f"PostgreSQL: {exc}") from None
    return cluster, cluster.new_database()


def http_json(url: str, method: str = "GET", timeout: float = 2.0, body: object = None) -> object:
    """Small JSON HTTP helper for the sandbox's control endpoints."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


class Gateway(Server):
    """`smtp-gateway serve` with a private `smtp-gateway sandbox` upstream adding `latency_ms` per call.

    `provider`: the upstream of the bench account; `rate_limit` (dEngage): the account's limiter, 0 off."""

    label = "gateway"

    def __init__(
        self,
        workdir: Path,
        latency_ms: int,
        cmd: list[str],
        serve_args: list[str],
        workers: int = 1,
        provider: str = "dmds",
        rate_limit: float = 0.0,
        queue: str = "sqlite",
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        super().__init__(workdir)
        # (certificate, key): the TLS listeners of bench/tls.toml.in, their ports by name in tls_ports.
        self.tls = tls
        self.tls_ports: dict[str, int] = {}
        self.queue = queue
        self.pg: object | None = None
        self.extra_config = ""  # appended to the rendered configuration (bench/scan.py: a second account)
        self.env: dict[str, str] = {}  # GATEWAY_* settings (bench/backlog.py: [delivery] keys)
        self.queue_url = ""  # the PostgreSQL queue's, once started
        self.provider = provider
        self.rate_limit = rate_limit
        self.workers = workers
        self.latency_ms = latency_ms
        self.cmd = cmd
        self.serve_args = serve_args
        self.info = f"serve {' '.join(serve_args)}" if serve_args else ""
        self.label = (
            f"gateway-{latency_ms}ms"
            + (f"-x{workers}" if workers > 1 else "")
            + ("-pg" if queue == "postgresql" else "")
        )
        if provider != "dmds":
            self.label += f"-{provider}" + ("-limited" if rate_limit else "")
        self.sandbox: subprocess.Popen[bytes] | None = None
        self.sandbox_port = 0
        self.dns: subprocess.Popen[bytes] | None = None
        self.dns_port = 0
        self.tmp: Path | None = None
        self.auth = (LOGIN, PASSWORD)
        self.upstream_429 = 0  # 429 answers of the sandbox over the whole setup

    @property
    def sandbox_url(self) -> str:
        return f"http://{HOST}:{self.sandbox_port}"

    def _sandbox_ready(self) -> bool:
        try:
            http_json(f"{self.sandbox_url}/_sandbox/health", timeout=0.5)
            return True
        except OSError:
            return False

    def _start_sandbox(self) -> None:
        self.sandbox_port = free_port()
        cmd = [
            *self.cmd,
            "sandbox",
            "--listen",
            f"{HOST}:{self.sandbox_port}",
            "--latency-ms",
            str(self.latency_ms),
        ]
        cmd += ["--apikey", APIKEY, "--quiet"]
        if self.provider == "dengage":
            cmd += [
                "--dengage-userkey",
                APIKEY,
                "--dengage-password",
                DENGAGE_PASSWORD,
                "--dengage-from",
                f"Bench <{genmsg.SENDER}>",
                "--dengage-rate-limit",
                str(DENGAGE_UPSTREAM_LIMIT if self.rate_limit else 0),
            ]
        log = self.workdir / f"{self.label}-sandbox.log"
        self.sandbox = spawn(cmd, log, env=gateway_env())
        try:
            wait_until(self._sandbox_ready, "sandbox", 30, self.sandbox)
        except SetupError as exc:
            raise SetupError(f"{exc}: {log_tail(log, 5)}") from None

    def _start_dns(self) -> None:
        script = Path(__file__).with_name("dnsserve.py")
        self.dns = spawn(
            [sys.executable, str(script), genmsg.SENDER_DOMAIN],
            self.workdir / f"{self.label}-dns.log",
            stdout_pipe=True,
        )
        assert self.dns.stdout is not None
        line = self.dns.stdout.readline().strip()
        if not line.isdigit():
            raise SetupError("bench DNS server did not start")
        self.dns_port = int(line)

    def start(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
        self._start_sandbox()
        self._start_dns()
        self.port = free_port()
        queue_url = ""
        if self.queue == "postgresql":
            self.pg, queue_url = start_postgres()
        # One configuration and one queue; with several workers, `serve --workers N` runs them on the same
        # port (SO_REUSEPORT: the kernel spreads connections) and the same queue.
        config = self.tmp / "gateway.toml"
        text = render_config(
            self.port,
            self.sandbox_url,
            self.tmp / "spool.sqlite3",
            self.dns_port,
            self.provider,
            self.rate_limit,
            queue_url,
        )
        self.queue_url = queue_url
        # extra_config may name the sandbox, which has only just been given its port.
        extra = self.extra_config.replace("${sandbox_url}", self.sandbox_url)
        config.write_text(text + self._tls_listeners() + extra)
        cmd = [*self.cmd, "serve", "--config", str(config), *self.serve_args]
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        self.proc = spawn(cmd, self.log, env={**gateway_env(), **self.env})
        try:
            wait_for_smtp(self.port, self.label, 60, self.proc)
            # Every worker must be listening before the first point, or worker 0 takes the early load.
            wait_until(
                lambda: self.log.read_text(errors="replace").count('"ready"') >= self.workers,
                "all gateway workers",
                60,
                self.proc,
            )
        except SetupError as exc:
            raise SetupError(f"{exc}: {log_tail(self.log, 8)}") from None

    def _tls_listeners(self) -> str:
        if self.tls is None:
            return ""
        names = ("starttls", "implicit", "starttls-trusted", "implicit-trusted")
        self.tls_ports = {name: free_port() for name in names}
        ports = {name.replace("-", "_"): port for name, port in self.tls_ports.items()}
        return "\n" + Template(TLS_LISTENERS.read_text()).substitute(
            cert_file=str(self.tls[0]), key_file=str(self.tls[1]), **ports
        )

    def _health(self) -> dict[str, object]:
        try:
            health = http_json(f"{self.sandbox_url}/_sandbox/health")
        except (OSError, ValueError):
            return {}
        return health if isinstance(health, dict) else {}

    def upstream_requests(self) -> int:
        """Send calls the sandbox has recorded since the last clear (-1 if unknown); logins, identity
        lookups and answers refused with 429 are not sends of a message."""
        health = self._health()
        sends = health.get("sends", health.get("requests", -1))
        refused = health.get("status_429", 0)
        return int(str(sends)) - int(str(refused)) if int(str(sends)) >= 0 else -1

    def settle(self, expected: int, slack: int = 0, timeout: float = 20.0) -> Settled:
        """Check every accepted message reached the sandbox, then clear its request log (memory).

        `slack`: how many of the `expected` messages may not have been accepted (client stopped mid-way).
        """
        deadline = time.monotonic() + timeout
        seen = self.upstream_requests()
        # -1 (the health endpoint could not be read) is waited out too: a sandbox that answers again in time
        # gives its count; one that never does leaves the point unchecked, which is said below.
        while seen < expected - slack and time.monotonic() < deadline:
            time.sleep(0.2)
            seen = self.upstream_requests()
        if slack:  # let messages that were in flight land before the log is cleared
            seen = self._wait_stable(seen, deadline)
        limited = int(str(self._health().get("status_429", 0)))
        self.upstream_429 += limited
        with contextlib.suppress(OSError):
            http_json(f"{self.sandbox_url}/_sandbox/requests", method="DELETE")
        error = ""
        if seen < 0:
            # The sandbox died or hung: in store-and-forward the gateway queued what it could not send and
            # answered 250, so the client's rate says nothing about delivery.
            error = f"sandbox could not be asked: unknown how many of {expected} messages reached it"
        elif not expected - slack <= seen <= expected + slack:
            error = f"sandbox saw {seen} API calls for {expected} messages"
        # 429s alone are a note: the count above excludes them, so calls they held back are already missing.
        return Settled(error, f"sandbox answered {limited} calls with 429" if limited else "")

    def _wait_stable(self, seen: int, deadline: float) -> int:
        """Poll the sandbox's request count until it has not changed for 0.5 s, or the deadline."""
        unchanged = 0
        while unchanged < 2 and time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.upstream_requests()
            unchanged = unchanged + 1 if now == seen else 0
            seen = now
        return seen

    def rss_roots(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []  # with --workers: the supervisor's tree

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None
        terminate(self.sandbox)
        self.sandbox = None
        terminate(self.dns)
        self.dns = None
        if self.pg is not None:
            self.pg.stop()  # type: ignore[attr-defined]
            self.pg = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
