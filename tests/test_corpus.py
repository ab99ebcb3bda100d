"""Every message of the shared corpus through the gateway: a matching upstream call, or a clear 5xx."""

from __future__ import annotations

import contextlib
import html
import re
import smtplib
from collections import Counter
from collections.abc import Callable
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import getaddresses
from typing import Any

from email_validator import EmailNotValidError, validate_email

from tests.conftest import CORPUS
from tests.harness import PASSWORD, USER, Running
from tests.smtputil import SENDER, connect

FALLBACK_RCPT = "corpus@example.com"
_WS = re.compile(r"\s+")


def corpus_files() -> list[str]:
    lines = (CORPUS / "MANIFEST.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t", 1)[0] for line in lines if line.strip()]


def reference(raw: bytes) -> EmailMessage | None:
    """An independent decode with the stdlib's modern parser (None when it gives up)."""
    try:
        msg = message_from_bytes(raw, policy=policy.default)
        assert isinstance(msg, EmailMessage)
        str(msg.get("Subject", ""))
        str(msg.get("From", ""))
        return msg
    except Exception:
        return None


def valid(address: str) -> bool:
    try:
        validate_email(address, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError:
        return False
    return True


def header_addresses(msg: EmailMessage, name: str) -> list[str]:
    try:
        values = [str(v) for v in msg.get_all(name) or []]
    except Exception:
        return []
    return [addr for _, addr in getaddresses(values) if "@" in addr]


def from_domains(messages: dict[str, EmailMessage | None]) -> dict[str, str]:
    domains = {"acme.example": "dmds-acme@nl.acme.example"}
    for msg in messages.values():
        if msg is None:
            continue
        for addr in header_addresses(msg, "From") + header_addresses(msg, "Sender"):
            domain = addr.rpartition("@")[2].strip().lower().strip(".")
            if domain and valid(f"x@{domain}"):
                domains.setdefault(domain, f"bounce@{domain}")
    return domains


def leaves(msg: EmailMessage) -> list[EmailMessage]:
    """Leaf parts, not descending into message/* parts (they travel as attachments)."""
    if msg.is_multipart() and msg.get_content_maintype() == "multipart":
        out = []
        for part in msg.iter_parts():
            out += leaves(part)  # type: ignore[arg-type]
        return out
    return [msg]


def html_bodies(msg: EmailMessage) -> list[str]:
    out = []
    for part in leaves(msg):
        if part.get_content_type() == "text/html" and part.get_content_disposition() != "attachment":
            with contextlib.suppress(Exception):
                out.append(part.get_content())
    return out


def text_bodies(msg: EmailMessage) -> list[str]:
    out = []
    for part in leaves(msg):
        if (
            part.get_content_type() == "text/plain"
            and part.get_content_disposition() is None
            and part.get_filename() is None
        ):
            with contextlib.suppress(Exception):
                out.append(part.get_content())
    return out


def norm(text: str) -> str:
    return _WS.sub(" ", text).strip()


def check_request(
    bodies: list[dict[str, Any]], rcpts: list[str], ref: EmailMessage | None
) -> list[str]:
    """Differences between the upstream calls of one message and the message itself."""
    problems = []
    got: list[str] = []
    for body in bodies:
        contacts = body.get("contactos") or [body.get("contacto")]
        got += [c["email"] for c in contacts]
        got += [c["cc_email"] for c in body.get("copia", [])]
        got += [c["bcc_email"] for c in body.get("copia_oculta", [])]
    if sorted(a.lower() for a in got) != sorted(set(a.lower() for a in rcpts)):
        problems.append(f"recipients {got} != {rcpts}")
    first = bodies[0]
    if not first.get("html"):
        problems.append("no html")
    if ref is None:
        return problems
    subject = norm(str(ref.get("Subject", "") or ""))
    if "\ufffd" in subject or "=?" in subject:
        # The reference could not decode it (8-bit or broken encoded words): no control characters left.
        if re.search(r"[\x00-\x08\x0b-\x1f]", first.get("asunto", "")):
            problems.append(f"subject {first.get('asunto')!r} keeps control characters")
    elif norm(first.get("asunto", "")) != subject:
        problems.append(f"subject {first.get('asunto')!r} != {subject!r}")
    froms = header_addresses(ref, "From")
    if froms and valid(froms[0]) and first.get("remitente", "").lower() != froms[0].lower():
        problems.append(f"sender {first.get('remitente')!r} != {froms[0]!r}")
    if not froms and first.get("remitente") != SENDER:
        problems.append(f"sender {first.get('remitente')!r} != envelope {SENDER}")
    htmls = html_bodies(ref)
    # Where the reference decoder had to substitute characters it is no reference.
    htmls = [h for h in htmls if "\ufffd" not in h]
    if [h for h in htmls if h.strip()]:
        if norm(first["html"]) not in {norm(h) for h in htmls}:
            problems.append("html differs from every text/html part")
    else:
        texts = [t for t in text_bodies(ref) if t.strip() and "\ufffd" not in t]
        for text in texts:
            if norm(html.escape(text, quote=False)) not in norm(first["html"]):
                problems.append("a text/plain part is missing from html")
                break
    return problems


def test_corpus(gateway_factory: Callable[..., Running], terminal_summary: list[tuple[str, list[str]]]) -> None:
    files = corpus_files()
    assert len(files) == 400
    raws = {name: (CORPUS / name).read_bytes() for name in files}
    refs = {name: reference(raw) for name, raw in raws.items()}
    # The account's sender domains come from the corpus, so it needs its own config; the first
    # gateway only lends its sandbox (the config names the upstream's port before the start).
    upstream = gateway_factory()
    running = gateway_factory(
        accounts={
            "acme": {
                **running_account(),
                "api_base": upstream.sandbox_url,
                "sender_domains": from_domains(refs),
            }
        },
        limits={"max_recipients": 100},
    )
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    client = connect(running)
    client.login(USER, PASSWORD)
    try:
        for name in files:
            raw, ref = raws[name], refs[name]
            before = len(upstream.requests)
            to = [a for a in (header_addresses(ref, "To") if ref is not None else []) if valid(a)][:50]
            code, text = client.mail(SENDER)
            assert code == 250, (name, code, text)
            rcpts = []
            for addr in to or [FALLBACK_RCPT]:
                code, _ = client.rcpt(addr)
                if code == 250:
                    rcpts.append(addr)
            if not rcpts:
                assert client.rcpt(FALLBACK_RCPT)[0] == 250
                rcpts = [FALLBACK_RCPT]
            try:
                code, reply = client.data(raw)
            except smtplib.SMTPDataError as exc:  # smtplib raises for a refused DATA command itself
                code, reply = exc.smtp_code, exc.smtp_error
            line = reply.decode(errors="replace")
            new = upstream.requests[before:]
            if code == 250:
                outcomes["250"] += 1
                accepted = [r["body"] for r in new if r["status"] == 200]
                problems = ["no upstream call"] if not accepted else check_request(accepted, rcpts, ref)
                if problems:
                    failures.append(f"{name}: {'; '.join(problems)}")
            elif 550 <= code <= 554 and re.match(r"^5\.\d+\.\d+ ", line):
                reason = re.sub(r"[<(].*", "", line).strip()[:70]
                outcomes[f"{code} {reason}"] += 1
                if any(r["status"] == 200 for r in new):
                    failures.append(f"{name}: refused with {code} but sent upstream")
            else:
                failures.append(f"{name}: {code} {line}")
                outcomes[f"unexpected {code}"] += 1
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()
        client.close()
    lines = [f"{count:4d}  {outcome}" for outcome, count in sorted(outcomes.items(), key=lambda kv: -kv[1])]
    terminal_summary.append(("corpus: 400 messages through the gateway", [*lines, f"{len(failures)} problems"]))
    assert not failures, "\n".join(lines + failures)


def running_account() -> dict[str, Any]:
    from tests.harness import APIKEY, PASSWORD_HASH

    return {
        "dmdsid": "acme",
        "apikey": APIKEY,
        "users": [{"username": USER, "password_hash": PASSWORD_HASH, "campaign": 22}],
        "http_timeout": 5.0,
    }
