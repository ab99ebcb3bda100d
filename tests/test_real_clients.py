"""Real client programs against the real gateway, each checked through the sandbox's recorded requests:
openssl s_client as a TLS 1.0/1.1 device, Postfix as a smarthost (SASL over STARTTLS), s-nail composing a
message with a PDF attachment. .ci/run installs them; outside CI a missing one skips, naming its package."""

from __future__ import annotations

import base64
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.configs import listener
from tests.devices_util import captured_logs, events, plain_blob, require_root, require_tool
from tests.docs_blocks import doc_blocks
from tests.harness import PASSWORD, USER, Running
from tests.smtputil import RECIPIENT, SENDER, message
from tests.spool_helpers import wait_for

TIMEOUT = 60


def run(
    args: list[str], stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, input=stdin, capture_output=True, timeout=TIMEOUT, check=False, env=env)


def output(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")


# -- openssl s_client as an old device ----------------------------------------------------------------------


@pytest.fixture
def legacy(gateway_factory: Callable[..., Running]) -> Running:
    return gateway_factory(
        listeners=[
            listener("legacy", "starttls", tls_profile="legacy"),
            listener("intermediate", "starttls"),
        ]
    )


def s_client(port: int, version: str, stdin: bytes, source: str = "127.0.0.1") -> subprocess.CompletedProcess[bytes]:
    openssl = require_tool("openssl", "openssl")
    return run(
        [
            openssl,
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-bind",
            f"{source}:0",
            "-starttls",
            "smtp",
            "-name",
            "printer.lan",
            version,
            "-cipher",
            "DEFAULT:@SECLEVEL=0",
            "-ign_eof",
            "-nocommands",
        ],
        stdin=stdin,
    )


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_openssl_tls1_device_on_a_legacy_listener(legacy: Running, version: str) -> None:
    subject = f"s_client {version}"
    dialogue = (
        (
            f"EHLO printer.lan\r\nAUTH PLAIN {plain_blob(USER, PASSWORD)}\r\nMAIL FROM:<{SENDER}>\r\n"
            f"RCPT TO:<{RECIPIENT}>\r\nDATA\r\n"
        ).encode()
        + message(subject=subject)
        + b".\r\nQUIT\r\n"
    )
    result = s_client(legacy.port("legacy"), version, dialogue)
    transcript = output(result)
    protocol = {"-tls1": "TLSv1", "-tls1_1": "TLSv1.1"}[version]
    assert f"Protocol  : {protocol}\n" in transcript, transcript
    assert "235 2.7.0 Authentication successful" in transcript, transcript
    assert "250 2.0.0 Ok: queued as " in transcript, transcript
    [sent] = legacy.sent
    assert sent["body"]["asunto"] == subject


def test_openssl_tls1_device_on_an_intermediate_listener(legacy: Running) -> None:
    """Refused at the handshake, with one info line per client, never an error or a traceback."""
    with captured_logs() as logs:
        for version, source in [("-tls1", "127.0.0.1"), ("-tls1_1", "127.0.0.2"), ("-tls1_1", "127.0.0.1")]:
            result = s_client(legacy.port("intermediate"), version, b"EHLO printer.lan\r\nQUIT\r\n", source)
            assert result.returncode != 0
            assert "250 " not in output(result).split("STARTTLS")[-1]
        wait_for(lambda: len(events(logs, "tls_handshake_failed")) >= 2, 10, "the refusals logged")
    lines = events(logs, "tls_handshake_failed")
    assert [(e["peer"].split(":")[0], e["offered"], e["log_level"]) for e in lines] == [
        ("127.0.0.1", "TLSv1", "info"),
        ("127.0.0.2", "TLSv1.1", "info"),
    ]  # the third attempt came from 127.0.0.1 again: counted, not logged twice
    assert [e for e in logs if e["log_level"] in ("error", "critical") or "exc_info" in e] == []
    assert legacy.sent == []


# -- Postfix as a smarthost client ----------------------------------------------------------------------------

POSTFIX_MAIN_CF = """\
# A throwaway Postfix that only relays: everything goes to the gateway, with SASL over STARTTLS.
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
myhostname = smarthost.test
mydomain = smarthost.test
myorigin = acme.example
inet_interfaces = loopback-only
inet_protocols = ipv4
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
smtp_tls_loglevel = 1
smtputf8_enable = no
biff = no
maillog_file = {tmp}/maillog
maillog_file_prefixes = {tmp}
"""

POSTFIX_MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def smarthost_settings(relay_port: int) -> tuple[str, str]:
    """The tutorial's main.cf lines and sasl_passwd line, pointed at the gateway on ``relay_port``: the
    brackets name one host (no MX lookup), and Postfix's texthash map needs no postmap."""
    main_cf, passwd = doc_blocks("test_postfix_smarthost_relays_with_sasl_over_starttls")
    where = "[smtp.acme.example]:587"
    assert where in main_cf.text and passwd.text.startswith(where + " "), (main_cf.where(), passwd.where())
    relay = f"[127.0.0.1]:{relay_port}"
    return main_cf.text.replace(where, relay).replace("hash:/", "texthash:/"), f"{relay} {USER}:{PASSWORD}\n"


@contextlib.contextmanager
def private_postfix(relay_port: int) -> Iterator[Path]:
    """A Postfix instance with its own config and queue in a temp dir, relaying to the gateway with the
    smarthost settings the tutorial shows; yields its config dir."""
    smarthost, login = smarthost_settings(relay_port)
    postfix = require_tool("postfix", "postfix")
    require_root("a private Postfix instance (postfix start) runs as root")
    if not glob.glob("/usr/lib/*/sasl2/libplain.so*"):
        require_tool("libsasl2-modules (PLAIN)", "libsasl2-modules")
    tmp = Path(tempfile.mkdtemp(prefix="gateway-postfix-"))
    tmp.chmod(0o755)
    conf, queue, data = tmp / "etc", tmp / "spool", tmp / "data"
    for directory in (conf, queue, data):
        directory.mkdir(mode=0o755)
    entry = pwd.getpwnam("postfix")
    os.chown(data, entry.pw_uid, entry.pw_gid)
    main_cf = POSTFIX_MAIN_CF.format(conf=conf, queue=queue, data=data, tmp=tmp)
    (conf / "main.cf").write_text(main_cf + smarthost.replace("/etc/postfix/sasl_passwd", f"{conf}/sasl_passwd"))
    (conf / "master.cf").write_text(POSTFIX_MASTER_CF)
    (conf / "sasl_passwd").write_text(login)
    (conf / "sasl_passwd").chmod(0o600)
    env = {**os.environ, "MAIL_CONFIG": str(conf)}
    started = run([postfix, "-c", str(conf), "start"], env=env)
    try:
        assert started.returncode == 0, output(started) + _tail(tmp / "maillog")
        yield conf
    finally:
        run([postfix, "-c", str(conf), "stop"], env=env)
        pid_file = queue / "pid" / "master.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().split()[0])
            wait_for(lambda: not Path(f"/proc/{pid}").exists(), 15, "postfix master gone")
        shutil.rmtree(tmp, ignore_errors=True)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def test_postfix_smarthost_relays_with_sasl_over_starttls(gateway: Running) -> None:
    """The tutorial's smarthost settings (doc_blocks, through private_postfix), with a real Postfix."""
    assert len(doc_blocks("test_postfix_smarthost_relays_with_sasl_over_starttls")) == 2
    with captured_logs() as logs, private_postfix(gateway.port("starttls")) as conf:
        sendmail = require_tool("sendmail", "postfix")
        raw = message(subject="via Postfix", body="Relayed by a Postfix smarthost")
        injected = run(
            [sendmail, "-C", str(conf), "-f", SENDER, RECIPIENT],
            stdin=raw,
            env={**os.environ, "MAIL_CONFIG": str(conf)},
        )
        assert injected.returncode == 0, output(injected)
        maillog = conf.parent / "maillog"
        wait_for(lambda: gateway.sent, TIMEOUT, f"the relayed message; Postfix log:\n{_tail(maillog)}")
        wait_for(lambda: "status=sent" in maillog.read_text(errors="replace"), TIMEOUT, "Postfix logs status=sent")
        log_text = maillog.read_text(errors="replace")
    [sent] = gateway.sent
    body = sent["body"]
    assert (body["asunto"], body["remitente"], body["contacto"]["email"]) == ("via Postfix", SENDER, RECIPIENT)
    assert "Relayed by a Postfix smarthost" in body["html"]
    # Postfix encrypted first (security level "encrypt"), then authenticated with SASL.
    assert "TLS connection established to 127.0.0.1" in log_text, log_text
    assert "250 2.0.0 Ok: queued as " in log_text
    [auth] = events(logs, "auth_ok")
    assert auth["login"] == USER


# -- s-nail composing a message with a PDF attachment ---------------------------------------------------------


def pdf_bytes() -> bytes:
    """A small valid PDF whose content stream is compressed binary data (every byte value occurs)."""
    stream = zlib.compress(b"BT /F1 24 Tf 72 720 Td (Scanned page) Tj ET\n" + bytes(range(256)) * 8)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_snail_sends_a_pdf_attachment(gateway: Running, tmp_path: Path) -> None:
    snail = require_tool("s-nail", "s-nail")
    pdf = tmp_path / "scan-0042.pdf"
    pdf.write_bytes(pdf_bytes())
    result = run(
        [
            snail,
            "-:/",
            "-Sv15-compat",
            "-Sttycharset=utf-8",
            "-Ssendwait",
            "-Stls-verify=ignore",
            f"-Smta=smtp://{USER}:{PASSWORD}@127.0.0.1:{gateway.port('starttls')}",
            "-Ssmtp-use-starttls",
            "-Ssmtp-auth=plain",
            "-r",
            SENDER,
            "-s",
            "Scan 0042",
            "-a",
            str(pdf),
            "-.",
            RECIPIENT,
        ],
        stdin="Scanned document attached. Página 1.\n".encode(),
        env={**os.environ, "HOME": str(tmp_path)},  # s-nail writes dead.letter there if anything fails
    )
    assert result.returncode == 0, output(result)
    [sent] = gateway.sent
    body = sent["body"]
    assert (body["asunto"], body["remitente"]) == ("Scan 0042", SENDER)
    assert "Página 1." in body["html"]
    [attachment] = body["adjuntos"]
    assert (attachment["nombre"], attachment["tipo"]) == ("scan-0042.pdf", "application/pdf")
    assert base64.b64decode(attachment["contenido"]) == pdf.read_bytes()
