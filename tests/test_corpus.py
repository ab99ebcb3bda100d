"""Every message of the shared corpus through the gateway: a matching upstream call, or a clear 5xx."""

from __future__ import annotations

import contextlib
import email.utils
import html
import quopri
import re
import smtplib
from collections import Counter
from collections.abc import Callable
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import pytest
from email_validator import EmailNotValidError, validate_email

from gateway.mime.parser import MAX_HEADER_VALUE
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


def header_values(msg: EmailMessage, name: str) -> list[str]:
    try:
        return [str(v) for v in msg.get_all(name) or []]
    except Exception:
        return []


def header_addresses(msg: EmailMessage, name: str) -> list[str]:
    """email.utils' lenient reading, the same on every patch level (strict=False where the CVE-2023-27043
    fix made strict reading the default)."""
    values = header_values(msg, name)
    if getattr(email.utils, "supports_strict_parsing", False):
        pairs = email.utils.getaddresses(values, strict=False)
    else:
        pairs = email.utils.getaddresses(values)
    return [addr for _, addr in pairs if "@" in addr]


# RULE addresses: an unquoted display name may hold an @ (`a@b.example <c@d.example>`), the address is the one
# in <...> (gateway/mime/addresses.py); email.utils reads two addresses there.
_NAME_WITH_AT = re.compile(r'[^<>",]*@[^<>",]*<([^<>",]+)>')


def from_addresses(msg: EmailMessage) -> list[str]:
    values = [str(v) for k, v in msg.raw_items() if k.lower() == "from"]  # as written, not as policy.default reads it
    if len(values) == 1 and (m := _NAME_WITH_AT.fullmatch(values[0].strip())):
        return [m[1]]
    return header_addresses(msg, "From")


def from_domains(messages: dict[str, EmailMessage | None]) -> dict[str, str]:
    domains = {"acme.example": "dmds-acme@nl.acme.example"}
    for msg in messages.values():
        if msg is None:
            continue
        for addr in from_addresses(msg) + header_addresses(msg, "From") + header_addresses(msg, "Sender"):
            domain = addr.rpartition("@")[2].strip().lower().strip(".")
            if domain and valid(f"x@{domain}"):
                domains.setdefault(domain, f"bounce@{domain}")
    return domains


# Where the gateway deliberately differs from a plain decode, the reference applies the same documented
# rule (docs/messages.md, "Faithful messages"); each such place is marked RULE.

# RULE charsets: Latin-1 and ASCII labels (or none) mean windows-1252, as in browsers (WHATWG), and 8-bit
# text that is valid UTF-8 under a single-byte or ASCII label (or none) is UTF-8.
_LATIN1_OR_ASCII = ("", "us-ascii", "ascii", "iso-8859-1", "iso8859-1", "latin1", "latin-1", "windows-1252")
_MULTIBYTE = ("utf-", "utf8", "gb", "big5", "shift", "sjis", "euc", "ks_c", "iso-2022", "cp9")


def ref_text(part: EmailMessage) -> str | None:
    """A text part's content as the stdlib decodes it, with the RULEs applied; None if it cannot."""
    try:
        text = part.get_content()
    except Exception:
        return None
    label = (part.get_content_charset() or "").lower()
    cte = str(part.get("Content-Transfer-Encoding", "")).split(";", 1)[0].strip().lower()
    try:
        data = part.get_payload(decode=True)
        if cte == "quoted printable" or str(part.get("Content-Transfer-Encoding", "")).lower() != cte:
            # RULE cte: "quoted printable", "quoted-printable;", "base64 " are decoded like the exact names.
            raw = part.get_payload(decode=False)
            data = quopri.decodestring(raw.encode()) if cte.startswith("quoted") else data
            text = data.decode(label or "utf-8")
    except Exception:
        return None
    if isinstance(data, bytes) and not data.isascii() and not label.startswith(_MULTIBYTE):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            if label in _LATIN1_OR_ASCII:
                try:
                    text = data.decode("cp1252")
                except UnicodeDecodeError:
                    return None
    # RULE controls: NUL and the other C0 controls (but TAB, LF, CR) are removed from bodies.
    return re.sub("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", text)


def displayed(part: EmailMessage) -> list[tuple[str, str | None]]:
    """RULE display: what a mail client shows, in order, as (kind, content): of a multipart/alternative the
    last branch with HTML, else the last with text/plain, else the first with text; of a multipart/related
    the root and the parts nothing can refer to (no Content-ID or -Location); of any other multipart every
    part. Inline text/plain parts are shown even when they carry a file name; an unsplit multipart, its text
    (kind "unsplit": shown only when nothing else is, see shown())."""
    if part.is_multipart() and part.get_content_maintype() == "multipart":
        kids: list[EmailMessage] = list(part.iter_parts())  # type: ignore[arg-type]
        subtype = part.get_content_subtype()
        if subtype == "alternative":
            branches = [displayed(kid) for kid in kids]
            for wanted in ("html", "plain"):
                chosen = [b for b in branches if any(kind == wanted for kind, _ in b)]
                if chosen:
                    return chosen[-1]
            return next((b for b in branches if b), [])
        if subtype == "related":
            kids = [kid for i, kid in enumerate(kids) if i == 0 or not (kid["Content-ID"] or kid["Content-Location"])]
        return [piece for kid in kids for piece in displayed(kid)]
    if part.get_content_maintype() == "multipart":
        # RULE unsplit: a multipart without a usable boundary (the parser left its body whole) is shown as
        # its text, as it arrived.
        body = part.get_payload()
        if not isinstance(body, str) or not body.strip():
            return []
        written = _BOUNDARY.search(" ".join(str(v) for k, v in part.raw_items() if k.lower() == "content-type"))
        if written is not None and f"\n--{written[1].strip()}" in "\n" + body:
            return [("unsplit", None)]  # a boundary the body has that policy.default does not read: no reference
        return [("unsplit", None if not body.isascii() else re.sub("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", body))]
    ctype, disposition = part.get_content_type(), part.get_content_disposition()
    if disposition == "attachment" or part.get_content_maintype() == "message":
        return []
    named = part.get_filename() is not None
    if ctype == "text/html" and (not named or disposition == "inline"):
        return [("html", ref_text(part))]
    if ctype == "text/plain" and disposition in (None, "inline"):
        return [("plain", ref_text(part))]
    if part.get_content_maintype() == "text" and not named:
        return [("text", ref_text(part))]
    return []


_BOUNDARY = re.compile(r'boundary\s*=\s*"?([^";\r\n]+)', re.IGNORECASE)
_BODY = re.compile(r"<body\b[^>]*>(.*?)(?:</body\s*>|\Z)", re.IGNORECASE | re.DOTALL)
_CONTROLS = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")


def expected_fragment(kind: str, content: str) -> str:
    if kind == "html":
        found = _BODY.search(content)
        return norm(found.group(1) if found else content)
    return norm(html.escape(content, quote=False))


def in_order(fragments: list[str], text: str) -> bool:
    position = 0
    for fragment in fragments:
        found = text.find(fragment, position)
        if found < 0:
            return False
        position = found + len(fragment)
    return True


def norm(text: str) -> str:
    # RULE controls: header fields and bodies carry no control characters.
    return _WS.sub(" ", _CONTROLS.sub("", text)).strip()


def check_request(bodies: list[dict[str, Any]], rcpts: list[str], ref: EmailMessage | None) -> list[str]:
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
    got_subject = norm(first.get("asunto", ""))
    if "\ufffd" in subject or "=?" in subject:
        # The reference could not decode it (8-bit or broken encoded words): no control characters left.
        if re.search(r"[\x00-\x08\x0b-\x1f]", first.get("asunto", "")):
            problems.append(f"subject {first.get('asunto')!r} keeps control characters")
    elif len(subject) > MAX_HEADER_VALUE // 2 and got_subject and subject.startswith(got_subject[:-20]):
        pass  # RULE header size: a header longer than MAX_HEADER_VALUE is cut there
    elif got_subject != subject:
        problems.append(f"subject {first.get('asunto')!r} != {subject!r}")
    froms = from_addresses(ref)
    if froms and valid(froms[0]) and first.get("remitente", "").lower() != froms[0].lower():
        problems.append(f"sender {first.get('remitente')!r} != {froms[0]!r}")
    if not froms and first.get("remitente") != SENDER:
        problems.append(f"sender {first.get('remitente')!r} != envelope {SENDER}")
    pieces = displayed(ref)
    # RULE unsplit: an unsplit multipart's text (its preamble, which clients never show) is shown only when
    # nothing else is; then as text.
    if any(kind != "unsplit" and content and content.strip() for kind, content in pieces):
        pieces = [(kind, content) for kind, content in pieces if kind != "unsplit"]
    pieces = [("text" if kind == "unsplit" else kind, content) for kind, content in pieces]
    # Where the reference decoder cannot decode a shown part (or had to substitute characters) it is no reference.
    if any(content is None or "\ufffd" in content for _, content in pieces):
        return problems
    shown = [(kind, content) for kind, content in pieces if content and content.strip()]
    got = norm(first["html"])
    if len(shown) == 1 and shown[0][0] == "html":
        if got != norm(shown[0][1] or ""):
            problems.append("html differs from the text/html part")
    elif shown and any(kind == "html" for kind, _ in shown):
        # RULE display: several shown parts are joined into one document, in order.
        if not in_order([expected_fragment(kind, content or "") for kind, content in shown], got):
            problems.append("html does not contain every shown part in order")
    elif shown and not in_order([expected_fragment(kind, content or "") for kind, content in shown], got):
        problems.append("a shown text part is missing from html")
    return problems


@pytest.mark.corpus
def test_corpus(gateway_factory: Callable[..., Running], terminal_summary: list[tuple[str, list[str]]]) -> None:
    files = corpus_files()
    assert len(files) == 400
    raws = {name: (CORPUS / name).read_bytes() for name in files}
    refs = {name: reference(raw) for name, raw in raws.items()}
    # The account's sender domains come from the corpus, so it needs its own config; the first
    # gateway only lends its sandbox (the config names the upstream's port before the start).
    upstream = gateway_factory()
    running = gateway_factory(
        accounts={"acme": {"api_base": upstream.sandbox_url, "sender_domains": from_domains(refs)}},
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
