"""Deterministic generator of the benchmark test messages (bench/messages/*.eml)."""

from __future__ import annotations

import base64
import random
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path

MESSAGES_DIR = Path(__file__).resolve().parent / "messages"
# Not "bench.test": the gateway and its sandbox validate addresses with email-validator, which rejects
# special-use TLDs (.test, .local, ...) with 553 5.1.3. One line to change if that is ever relaxed.
SENDER_DOMAIN = "bench.example.com"
SENDER = f"sender@{SENDER_DOMAIN}"
RECIPIENT = "rcpt@example.com"

SMALL_NAME = "multipart-5k"
LARGE_NAME = "attach-1m"
SCAN_NAME = "scan-300k"
SCAN_SIZE = 300 * 1024

# fmt: off
_WORDS = (
    "delivery", "account", "campaign", "invoice", "order", "shipment", "customer", "update",
    "newsletter", "offer", "product", "service", "support", "team", "report", "monthly", "summary",
    "details", "payment", "receipt", "subscription", "renewal", "reminder", "welcome", "confirm",
    "thanks", "review", "schedule", "meeting",
)
# fmt: on


def _paragraphs(rng: random.Random, count: int, words: int) -> list[str]:
    """Return `count` pseudo-random paragraphs of about `words` words."""
    out = []
    for _ in range(count):
        text = " ".join(rng.choice(_WORDS) for _ in range(words))
        out.append(text[0].upper() + text[1:] + ".")
    return out


def _headers(msg: EmailMessage, subject: str, ident: str) -> None:
    """Set realistic, fixed headers on `msg`."""
    msg["From"] = f"Bench Sender <{SENDER}>"
    msg["To"] = f"Bench Recipient <{RECIPIENT}>"
    msg["Reply-To"] = f"support@{SENDER_DOMAIN}"
    msg["Subject"] = subject
    msg["Date"] = "Mon, 02 Jun 2025 10:00:00 +0000"
    msg["Message-ID"] = f"<{ident}@{SENDER_DOMAIN}>"
    msg["X-Mailer"] = "smtp-gateway-bench/1.0"
    msg["List-Unsubscribe"] = (
        f"<mailto:unsubscribe@{SENDER_DOMAIN}?subject=unsubscribe>, <https://{SENDER_DOMAIN}/u/42>"
    )
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"


def _alternative_bodies(rng: random.Random, paragraphs: int) -> tuple[str, str]:
    """Return matching (text, html) bodies."""
    paras = _paragraphs(rng, paragraphs, 28)
    text = "Hello Bench Recipient,\n\n" + "\n\n".join(paras) + "\n\n-- \nThe Bench Team\n"
    html_paras = "\n".join(f'<p style="margin:0 0 12px 0">{p}</p>' for p in paras)
    html = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Bench</title></head>\n'
        '<body style="font-family:Arial,sans-serif">\n<p>Hello Bench Recipient,</p>\n'
        f"{html_paras}\n<p>-- <br>The Bench Team</p>\n</body></html>\n"
    )
    return text, html


def _fix_boundaries(msg: EmailMessage) -> None:
    """Give every multipart a fixed boundary so the output is byte-for-byte reproducible."""
    for index, part in enumerate(msg.walk()):
        if part.is_multipart():
            part.set_boundary(f"=_bench_{index}_{part.get_content_subtype()}_7f3a9c")


def small_message() -> bytes:
    """A ~5 KB multipart/alternative (text + html) message."""
    rng = random.Random(5)
    msg = EmailMessage(policy=SMTP_POLICY)
    _headers(msg, "Your monthly bench summary", "bench-5k")
    text, html = _alternative_bodies(rng, 8)
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    _fix_boundaries(msg)
    return msg.as_bytes()


def large_message() -> bytes:
    """A message with a text body and a 1 MiB PDF-like base64 attachment."""
    rng = random.Random(1)
    msg = EmailMessage(policy=SMTP_POLICY)
    _headers(msg, "Your invoice (PDF attached)", "bench-1m")
    text, html = _alternative_bodies(rng, 2)
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + rng.randbytes(1024 * 1024 - 15)
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="invoice-2025-06.pdf")
    _fix_boundaries(msg)
    return msg.as_bytes()


def scan_message(size: int, seed: int = 3) -> bytes:
    """A scan-to-email message: a `size`-byte PDF-like attachment, base64 in 76-character CRLF lines."""
    pdf = b"%PDF-1.4\n" + random.Random(seed).randbytes(size - 9)
    encoded = base64.encodebytes(pdf).replace(b"\n", b"\r\n")
    head = (
        f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: scan\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\n'
        "Scanned document attached.\r\n--b1\r\nContent-Type: application/pdf; name=scan.pdf\r\n"
        "Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=scan.pdf\r\n\r\n"
    )
    return head.encode() + encoded + b"--b1--\r\n"


def text_message(size: int, one_line: bool = False, seed: int = 3, ampersands: bool = False) -> bytes:
    """A plain-text message of a `size`-byte body: words in 76-character CRLF lines, or (`one_line`) a single
    line, as a report generator that never wraps sends it (the gateway folds it). `ampersands`: the words are
    all "&", the text HTML escaping makes longest (five times: "&amp;"), as an export full of markup."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(2000)]
    line = b"&" * 4096 if ampersands else b" ".join(words)
    text = (line * (size // len(line) + 1))[:size]
    if not one_line:
        text = b"\r\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    head = f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: report\r\nContent-Type: text/plain\r\n\r\n"
    return head.encode() + text + b"\r\n"


def to_lf(data: bytes) -> bytes:
    """Convert CRLF line ends to LF (smtp-source -F appends CRLF to each line itself)."""
    return data.replace(b"\r\n", b"\n")


def write_messages(directory: Path = MESSAGES_DIR) -> dict[str, Path]:
    """Write the messages (LF line ends) and return {name: path}."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in (
        (SMALL_NAME, small_message()),
        (LARGE_NAME, large_message()),
        (SCAN_NAME, scan_message(SCAN_SIZE)),
    ):
        path = directory / f"{name}.eml"
        body = to_lf(data)
        if not path.exists() or path.read_bytes() != body:
            path.write_bytes(body)
        paths[name] = path
    return paths


if __name__ == "__main__":
    for label, written in write_messages().items():
        print(f"{label}: {written} ({written.stat().st_size} bytes)")
