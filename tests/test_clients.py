"""Real SMTP client programs (swaks, msmtp, curl) against the real gateway over loopback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.harness import PASSWORD, USER, Running
from tests.smtputil import RECIPIENT, SENDER, message

TIMEOUT = 30


def run(args: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, input=stdin, capture_output=True, timeout=TIMEOUT, check=False)


def assert_sent(gateway: Running, subject: str, result: subprocess.CompletedProcess[bytes]) -> None:
    assert result.returncode == 0, (result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace"))
    sent = gateway.sent
    assert len(sent) == 1, sent
    body = sent[0]["body"]
    assert body["asunto"] == subject
    assert body["contacto"]["email"] == RECIPIENT
    assert body["remitente"] == SENDER


SWAKS_TLS = {"plain": [], "starttls": ["--tls"], "implicit": ["--tls-on-connect"]}


@pytest.mark.parametrize("listener", ["plain", "starttls", "implicit"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks(gateway: Running, listener: str, mechanism: str) -> None:
    subject = f"swaks {listener} {mechanism}"
    result = run(
        [
            "swaks",
            "--server",
            "127.0.0.1",
            "--port",
            str(gateway.port(listener)),
            "--from",
            SENDER,
            "--to",
            RECIPIENT,
            "--ehlo",
            "client.test",
            "--auth",
            mechanism,
            "--auth-user",
            USER,
            "--auth-password",
            PASSWORD,
            "--header",
            f"Subject: {subject}",
            "--body",
            "Sent by swaks",
            *SWAKS_TLS[listener],
        ]
    )
    assert_sent(gateway, subject, result)
    transcript = result.stdout.decode(errors="replace")
    assert "250 2.0.0 Ok: queued as " in transcript
    if mechanism == "LOGIN":
        # The prompts travel base64-encoded: "Username:" and "Password:".
        assert "334 VXNlcm5hbWU6" in transcript
        assert "334 UGFzc3dvcmQ6" in transcript


def test_swaks_wrong_password(gateway: Running) -> None:
    result = run(
        [
            "swaks",
            "--server",
            "127.0.0.1",
            "--port",
            str(gateway.port()),
            "--from",
            SENDER,
            "--to",
            RECIPIENT,
            "--auth",
            "PLAIN",
            "--auth-user",
            USER,
            "--auth-password",
            "wrong",
        ]
    )
    assert result.returncode != 0
    assert "535 5.7.8 Authentication credentials invalid" in result.stdout.decode(errors="replace")
    assert gateway.sent == []


MSMTP_TLS = {
    "plain": ["--tls=off"],
    "starttls": ["--tls=on", "--tls-starttls=on", "--tls-certcheck=off"],
    "implicit": ["--tls=on", "--tls-starttls=off", "--tls-certcheck=off"],
}


@pytest.mark.parametrize("listener", ["plain", "starttls", "implicit"])
def test_msmtp(gateway: Running, listener: str, tmp_path: Path) -> None:
    subject = f"msmtp {listener}"
    config = tmp_path / "msmtprc"
    config.write_text("defaults\n")
    config.chmod(0o600)
    result = run(
        [
            "msmtp",
            f"--file={config}",
            "--host=127.0.0.1",
            f"--port={gateway.port(listener)}",
            "--auth=plain",
            f"--user={USER}",
            f"--passwordeval=echo {PASSWORD}",
            f"--from={SENDER}",
            "--domain=client.test",
            *MSMTP_TLS[listener],
            RECIPIENT,
        ],
        stdin=message(subject=subject, body="Sent by msmtp"),
    )
    assert_sent(gateway, subject, result)


CURL = {"plain": ("smtp", []), "starttls": ("smtp", ["--ssl-reqd", "-k"]), "implicit": ("smtps", ["-k"])}


@pytest.mark.parametrize("listener", ["plain", "starttls", "implicit"])
def test_curl(gateway: Running, listener: str, tmp_path: Path) -> None:
    subject = f"curl {listener}"
    eml = tmp_path / "mail.eml"
    eml.write_bytes(message(subject=subject, body="Sent by curl"))
    scheme, extra = CURL[listener]
    result = run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--max-time",
            str(TIMEOUT),
            f"{scheme}://127.0.0.1:{gateway.port(listener)}/client.test",
            "--mail-from",
            SENDER,
            "--mail-rcpt",
            RECIPIENT,
            "--upload-file",
            str(eml),
            "--user",
            f"{USER}:{PASSWORD}",
            *extra,
        ]
    )
    assert_sent(gateway, subject, result)


def test_curl_refused_message_fails_with_reason(gateway: Running, tmp_path: Path) -> None:
    eml = tmp_path / "mail.eml"
    eml.write_bytes(message(sender="someone@elsewhere.example"))
    result = run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--max-time",
            str(TIMEOUT),
            f"smtp://127.0.0.1:{gateway.port()}",
            "--mail-from",
            "someone@elsewhere.example",
            "--mail-rcpt",
            RECIPIENT,
            "--upload-file",
            str(eml),
            "--user",
            f"{USER}:{PASSWORD}",
        ]
    )
    assert result.returncode != 0
    assert "553" in result.stderr.decode(errors="replace")
    assert gateway.sent == []
