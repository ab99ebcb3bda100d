"""What `serve` needs from this machine, checked before it starts and by `check-config`: TLS files, listen
ports, the spool's directory, DNS. Each finding is one line that names the problem and the fix."""

from __future__ import annotations

import datetime
import errno
import os
import socket
import sqlite3
import ssl
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gateway.config.oauth import OAuthSettings
from gateway.config.settings import Settings

# A certificate this close to its end is reported (as a note: serve still starts).
_EXPIRY_WARNING = datetime.timedelta(days=14)


@dataclass(frozen=True)
class Finding:
    text: str
    problem: bool = True  # False: a note, which neither stops serve nor fails check-config

    def __str__(self) -> str:
        return f"{'problem' if self.problem else 'note'}: {self.text}"


@dataclass(frozen=True)
class Port:
    """A TCP port the command will listen on."""

    what: str  # "listener submission", "http (operator endpoint)", ...
    address: str
    port: int
    reuse_port: bool = False

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.what} {host}:{self.port}"


def serve_ports(settings: Settings) -> list[Port]:
    ports = [Port(f"listener {lst.name}", lst.address, lst.port, lst.reuse_port) for lst in settings.listeners]
    if settings.http.port is not None:
        ports.append(Port("http (operator endpoint)", settings.http.address, settings.http.port))
    return ports


def files(settings: Settings) -> list[Finding]:
    """TLS certificate and key (set, readable, loadable together, not expired), the SQLite queue's file and
    directory (not with a PostgreSQL queue) and where large messages' DATA goes (limits.spill_dir)."""
    return [
        *_tls(settings),
        *_http_tls(settings),
        *oauth_ca_files(settings.oauth),
        # The SQLite queue's file only: with a PostgreSQL queue (queue_url) spool_path is not used.
        *([] if settings.delivery.queue_url else _spool(settings.delivery.spool_path)),
        *_spill(settings),
    ]


def accounts(settings: Settings) -> list[Finding]:
    if not settings.accounts:
        return [Finding("no [accounts.<name>] configured: every login will be refused", problem=False)]
    return [
        Finding(f"accounts.{name}: {note}", problem=False)
        for name, a in settings.accounts.items()
        for note in a.notes()
    ]


def _tls(settings: Settings) -> list[Finding]:
    tls_listeners = [lst.name for lst in settings.listeners if lst.tls != "none"]
    cert, key = settings.tls.cert_file, settings.tls.key_file
    if tls_listeners and (cert is None or key is None):
        unset = " and ".join(n for n, v in (("tls.cert_file", cert), ("tls.key_file", key)) if v is None)
        return [
            Finding(
                f"listener {', '.join(tls_listeners)} uses TLS but {unset} {'is' if ' and ' not in unset else 'are'} "
                'not set: set both to PEM files (or tls = "none" on a loopback-only listener)'
            )
        ]
    extra_cert, extra_key = settings.tls.extra_cert_file, settings.tls.extra_key_file
    if not tls_listeners:
        pairs = (
            ("tls.cert_file", cert),
            ("tls.key_file", key),
            ("tls.extra_cert_file", extra_cert),
            ("tls.extra_key_file", extra_key),
        )
        return [f for name, path in pairs if path is not None for f in _readable(name, path)]
    assert cert is not None and key is not None
    findings = _cert_pair("tls.cert_file", cert, "tls.key_file", key)
    if extra_cert is not None and extra_key is not None:
        # serve loads the second pair into the same contexts: it refuses to start without it.
        findings += _cert_pair("tls.extra_cert_file", extra_cert, "tls.extra_key_file", extra_key)
    return findings


def oauth_ca_files(oauth: OAuthSettings) -> list[Finding]:
    """Each token issuer's `ca_file`: readable and loadable as CA certificates, as serve loads it (at start and
    at a reload that changes [oauth]) to fetch the issuer's keys."""
    return [
        finding
        for issuer in oauth.issuers
        if issuer.ca_file is not None
        for finding in _ca_file(f"oauth.issuers[{issuer.name}].ca_file", issuer.ca_file)
    ]


def _ca_file(name: str, path: Path) -> list[Finding]:
    findings = _readable(name, path)
    if findings:
        return findings
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        return [
            Finding(
                f"{name} {path} does not load as CA certificates ({exc.reason or exc}): give the CA's certificates "
                "as a PEM file"
            )
        ]
    except OSError as exc:  # gone or changed since it was read just now
        return [Finding(f"{name} {path} cannot be read ({exc.strerror or exc}): fix the file or set {name}")]
    return []


def _http_tls(settings: Settings) -> list[Finding]:
    """The operator endpoint's certificate, when it serves HTTPS."""
    http = settings.http
    if http.port is None or http.tls_cert_file is None or http.tls_key_file is None:
        return []
    return _cert_pair("http.tls_cert_file", http.tls_cert_file, "http.tls_key_file", http.tls_key_file)


def _cert_pair(cert_name: str, cert: Path, key_name: str, key: Path) -> list[Finding]:
    """A certificate and its key: readable, loadable together, not expired."""
    findings = [f for name, path in ((cert_name, cert), (key_name, key)) for f in _readable(name, path)]
    if findings:
        return findings
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        return [
            Finding(
                f"{cert_name} {cert} and {key_name} {key} do not load as a certificate and its key "
                f"({exc.reason or exc}): give PEM files that belong together"
            )
        ]
    return _expiry(cert, cert_name)


def _readable(name: str, path: Path) -> list[Finding]:
    try:
        with path.open("rb") as f:
            f.read(1)
    except FileNotFoundError:
        return [Finding(f"{name} {path} does not exist: create it or set {name} to the right file")]
    except IsADirectoryError:
        return [Finding(f"{name} {path} is a directory: set {name} to a PEM file")]
    except PermissionError:
        return [
            Finding(
                f"{name} {path} is not readable by uid {os.getuid()} (permission denied): "
                "make it readable by the user the gateway runs as"
            )
        ]
    except OSError as exc:
        return [Finding(f"{name} {path} cannot be read ({exc.strerror}): fix the file or set {name}")]
    return []


def _expiry(cert: Path, name: str = "tls.cert_file") -> list[Finding]:
    from cryptography import x509  # ~10 MiB: loaded where a certificate is checked, not in every process

    try:
        leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    except (ValueError, IndexError, OSError):
        return []  # OpenSSL loaded it: a format only it knows is no problem of ours
    now = datetime.datetime.now(datetime.UTC)
    ends = leaf.not_valid_after_utc
    if ends <= now:
        return [Finding(f"{name} {cert} expired on {ends:%Y-%m-%d}: renew the certificate")]
    begins = leaf.not_valid_before_utc
    from gateway.smtp.tls import NOT_BEFORE_SLACK  # (the TLS module: cryptography only where it is used)

    if begins > now + NOT_BEFORE_SLACK:
        # Every client would refuse it (as an expired one), and a reload refuses it (gateway/smtp/server.py
        # check_current): a start that took it would serve a certificate no client accepts until its notBefore.
        return [
            Finding(
                f"{name} {cert} is not valid before {begins:%Y-%m-%d %H:%M} UTC (its notBefore): check the "
                "machine's clock or the certificate"
            )
        ]
    if ends - now < _EXPIRY_WARNING:
        return [Finding(f"{name} {cert} expires on {ends:%Y-%m-%d %H:%M} UTC: renew it soon", problem=False)]
    return []


# The queue the systemd unit named with GATEWAY_DELIVERY__SPOOL_PATH before the path moved into gateway.toml
# (3bbfa02); its WorkingDirectory is the same directory.
OLD_UNIT_SPOOL = Path("/var/lib/smtp-gateway/spool.sqlite3")


def _spool(path: Path) -> list[Finding]:
    return [*_relative_spool(path), *_spool_file(path)]


def _relative_spool(path: Path, old_unit_spool: Path = OLD_UNIT_SPOOL) -> list[Finding]:
    """A relative queue path depends on the directory each process runs in: a note, and when no queue is
    there yet but the old unit's is, the line that keeps the gateway on it (else it starts on a new, empty
    queue, and the old one's messages, ledger, suppressions and idempotency keys are left unused)."""
    if path.is_absolute():
        return []
    where = f"delivery.spool_path {path}"
    found = [
        Finding(
            f"{where} is relative: each process reads it from its own current directory ({path.absolute()} "
            "here; a service's is its WorkingDirectory, not your shell's): set an absolute path",
            problem=False,
        )
    ]
    if not path.exists():
        for old in dict.fromkeys([Path.cwd() / old_unit_spool.name, old_unit_spool]):
            if old.is_file():
                found.append(
                    Finding(
                        f"{where}: no queue there, but {old} exists (the queue the systemd unit named with "
                        f"GATEWAY_DELIVERY__SPOOL_PATH before the path moved to the configuration file): set "
                        f'delivery.spool_path = "{old}" to keep using it, or the gateway starts on a new, empty '
                        "queue and leaves that one's messages, ledger and suppressions unused",
                        problem=False,
                    )
                )
                break
    return found


def _spool_file(path: Path) -> list[Finding]:
    where = f"delivery.spool_path {path}"
    if path.exists():
        if not path.is_file():
            return [Finding(f"{where} is not a file: set delivery.spool_path to a file name")]
        if not os.access(path, os.R_OK | os.W_OK):
            return [Finding(f"{where} is not readable and writable by uid {os.getuid()}: fix its owner or mode")]
        return _spool_contents(path, where)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return [
            Finding(
                f"{where} cannot be created: {parent} is not a writable directory for uid {os.getuid()}; "
                "create the directory for this user or set delivery.spool_path"
            )
        ]
    return []


def _spill(settings: Settings) -> list[Finding]:
    limits = settings.limits
    if not limits.spill_above:
        return []
    directory = Path(limits.spill_dir or tempfile.gettempdir())
    if directory.is_dir() and os.access(directory, os.W_OK | os.X_OK):
        return []
    where = f"limits.spill_dir {directory}" if limits.spill_dir else f"the temporary directory {directory} (TMPDIR)"
    return [
        Finding(
            f"{where} is not a writable directory for uid {os.getuid()}: messages past limits.spill_above would be "
            "refused; create it, set limits.spill_dir to one, or limits.spill_above = 0"
        )
    ]


def queue_file_contents(path: Path) -> list[Finding]:
    """What `queue`, `status` and `suppression` check before they open an existing SQLite file as the queue
    (opening it writes the gateway's schema into it and VACUUMs it): the same test as serve's, with the fix an
    operator reading a queue needs (another program's database, the queue's own `-ratelimit` side file).

    Unlike serve's, an empty file (0 bytes, or an SQLite database with no tables) is no queue: these commands
    never create one, and opening it would write the gateway's schema into it and report an empty queue, as for
    a path that does not exist (a file touched by hand, a wrong path another tool created)."""
    return _spool_contents(
        path,
        f"{path.absolute()}",
        fix="it was left unchanged; name the queue file: delivery.spool_path as serve uses it, or --spool FILE",
        other="not an smtp-gateway queue: an SQLite database",
        empty=(
            f"no queue at {path.absolute()}: the file is empty (no gateway has run with it: is it the "
            "delivery.spool_path that serve uses?); it was left unchanged"
        ),
    )


def _spool_contents(
    path: Path,
    where: str,
    fix: str = "set delivery.spool_path to a file of its own (the gateway creates it)",
    other: str = "another program's SQLite database",
    empty: str | None = None,
) -> list[Finding]:
    """An existing spool file must be an SQLite database that is empty or the gateway's own: any other file
    would turn every message that has to be queued into a 452. `empty`: the finding for an empty file (0 bytes
    or no tables), where one is not taken as a new queue."""
    try:
        with path.open("rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        return [Finding(f"{where} cannot be read ({exc.strerror}): fix the file or set delivery.spool_path")]
    if not head:
        return [Finding(empty)] if empty else []  # an empty file: SQLite makes a database of it
    if head != _SQLITE_MAGIC:
        return [Finding(f"{where} is not an SQLite database but some other file: {fix}")]
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    except sqlite3.Error as exc:
        return [Finding(f"{where} cannot be read as an SQLite database ({exc}): {fix}")]
    if tables and "schema_version" not in tables:
        shown = ", ".join(sorted(tables)[:5])
        return [Finding(f"{where} is {other} (tables {shown}): {fix}")]
    if not tables and empty:
        return [Finding(empty)]
    return []


_SQLITE_MAGIC = b"SQLite format 3\x00"


# ---- ports ---------------------------------------------------------------------------------------


def ports(wanted: Iterable[Port], *, running_gateway_is_ok: bool = False) -> list[Finding]:
    """Whether each port can be bound as asyncio will bind it; a port held by another process names it.

    With ``running_gateway_is_ok`` (check-config), a port held by a running smtp-gateway is only a note:
    checking the configuration of the gateway that is running is what an operator does before a restart. The
    note says no more than is known: some smtp-gateway holds the port, not that it runs this configuration (a
    quick start in another terminal holds 2525 too).
    """
    findings = []
    for port in wanted:
        if port.port == 0:
            continue  # any free port
        err = _bind_error(port)
        if err is None:
            continue
        if err.errno == errno.EADDRINUSE:
            holder = port_holder(port.port)
            gateway = holder is not None and ("smtp-gateway" in holder or "-m gateway" in holder)
            who = f"in use by {holder}" if holder else "in use by another process"
            if gateway and running_gateway_is_ok:
                findings.append(
                    Finding(
                        f"{port}: {who} (an smtp-gateway: if it is not the one running this configuration, serve "
                        "fails until it stops)",
                        False,
                    )
                )
            else:
                findings.append(Finding(f"{port}: {who}: stop it or choose another port"))
        elif err.errno == errno.EACCES:
            findings.append(
                Finding(
                    f"{port}: permission denied: ports below 1024 need root or "
                    "CAP_NET_BIND_SERVICE (or choose a port above 1023)"
                )
            )
        elif err.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            findings.append(Finding(f"{port}: {port.address} is not an address of this machine: change the address"))
        else:
            findings.append(Finding(f"{port}: cannot listen ({err.strerror or err})"))
    return findings


def _bind_error(port: Port) -> OSError | None:
    try:
        infos = socket.getaddrinfo(
            port.address or None, port.port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return OSError(errno.EADDRNOTAVAIL, f"{port.address} does not resolve ({exc.strerror})")
    for family, kind, proto, _, sockaddr in infos:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            return exc
        with sock:
            # the options asyncio's create_server sets, so the answer is the one serve will get
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if port.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                return exc
    return None


def port_holder(port: int) -> str | None:
    """'pid N (command line)' of the process listening on TCP ``port``, from /proc (Linux); None if unknown."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # sl local_address rem_address st ... inode; state 0A is LISTEN
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(fields[9])
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue  # another user's process, or gone
        for fd in fds:
            try:
                if os.readlink(fd) in targets:
                    return f"pid {proc.name} ({_cmdline(proc)})"
            except OSError:
                continue
    return "a process of another user (see: ss -ltnp)"


def _cmdline(proc: Path) -> str:
    try:
        text = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return (text[:100] + "...") if len(text) > 100 else text or "?"


# ---- DNS -----------------------------------------------------------------------------------------


async def dns(settings: Settings) -> list[Finding]:
    """With a DNS check on: does the resolver answer for the sender domains' top-level domain (the root
    without one)? The same check the gateway makes before it calls a domain nonexistent."""
    d = settings.dns
    if not (d.check_sender_domain or d.check_recipient_domains):
        return []
    from gateway.policy.dns import DnsResolver

    resolver = DnsResolver(d.nameservers or None, d.port, d.timeout, d.max_ttl, d.negative_ttl)
    domain = next((dom for a in settings.accounts.values() for dom in a.sender_domain_names()), None)
    why = await resolver.check(domain)
    if why is None:
        return []
    servers = ", ".join(d.nameservers) if d.nameservers else "/etc/resolv.conf"
    return [
        Finding(
            f"dns: the resolver ({servers}, port {d.port}) is not working ({why}): every sender would "
            "get 451 4.4.3; fix the resolver or set dns.nameservers (or turn dns.check_sender_domain off)"
        )
    ]
