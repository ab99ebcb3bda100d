"""Pure: a delivery status notification (RFC 3464) as MIME bytes, built with the standard library's email
package: `multipart/report; report-type=delivery-status` with a part for people, the `message/delivery-status`
part (Reporting-MTA, Arrival-Date, then per recipient Final-Recipient, Action, Status, Diagnostic-Code,
Last-Attempt-Date) and the original message's header block as `text/rfc822-headers`.

The delivery-status part stays `message/delivery-status`, 7-bit, whatever the vendor's words or the
recipient: it is the type every DSN reader (mail clients, bounce processors) knows, where RFC 6533's
`message/global-delivery-status` is known to few, and nothing in it needs 8 bits: an internationalized
address is RFC 6533's `utf-8` address type in its utf-8-addr-xtext form (the form that type allows in
`message/delivery-status`), and Diagnostic-Code (US-ASCII text, RFC 3464 2.3.6) is the words without their
accents, any other non-ASCII character escaped as `\\x{HEX}`. The words as they were are in the part for
people (UTF-8)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.charset import QP, Charset
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.utils import format_datetime

SUBJECT = "Undelivered Mail Returned to Sender"
FROM_NAME = "Mail Delivery System"

# What each way of failing is called in the notice, and its RFC 3463 status when the words name none (see
# `status_code`).
STATUS = {
    "bounced": ("5.0.0", "the receiving server refused it (a hard bounce)"),
    "not_sent": ("5.7.1", "the upstream did not send it: it holds the address invalid"),
    "refused": ("5.0.0", "the upstream refused it"),
    "expired": ("4.4.7", "it could not be delivered in time and was given up"),
    "internal_error": ("5.3.0", "the gateway could not process it"),
    "corrupt": ("5.3.0", "the gateway could not read it back from its queue"),
}


# The ways of failing whose words are the upstream's (its bounce, its refusal, the last error before expiry),
# and so may carry the receiving server's own enhanced status code; the others' words are the gateway's.
VENDOR_WORDS = frozenset({"bounced", "not_sent", "refused", "expired"})
# An RFC 3463 code in the words ("552 5.2.2 mailbox full"): class 4 or 5, not within a longer dotted number.
_CODE = re.compile(r"(?<![\d.])[45]\.(\d{1,3}\.\d{1,3})(?![\d.])")
# A hard bounce's words that say the mailbox does not exist, when they carry no code (5.1.1).
_NO_MAILBOX = re.compile(
    r"user unknown|unknown user|no such (user|mailbox|recipient)|mailbox (not found|does not exist|unavailable)"
    r"|does not exist|usuario desconocido|inexistente|no existe",
    re.IGNORECASE,
)


def status_code(how: str, diagnostic: str) -> str:
    """The notice's Status for one recipient: the receiving server's own code when the upstream's words carry
    one ("550 5.7.1 blocked" is 5.7.1, not a bad mailbox: software acting on the Status, such as list cleaning,
    would drop a good address), in the class of the way it failed (a hard bounce is permanent: 5; an expiry 4);
    else 5.1.1 for a hard bounce whose words say the mailbox does not exist; else the way's own (STATUS)."""
    default = STATUS.get(how, STATUS["refused"])[0]
    if how in VENDOR_WORDS:
        if found := _CODE.search(diagnostic):
            return f"{default[0]}.{found.group(1)}"
        if how == "bounced" and _NO_MAILBOX.search(diagnostic):
            return "5.1.1"
    return default


@dataclass(frozen=True, slots=True)
class Failure:
    """One recipient the notice reports: how it failed (a STATUS key), the words of the upstream or the
    gateway, and when."""

    address: str
    how: str
    diagnostic: str
    at: float


@dataclass(frozen=True, slots=True)
class Original:
    """The message the notice is about."""

    local_id: str
    arrival: float
    headers: str  # its header block as received (CRLF line ends)
    subject: str = ""
    message_id: str | None = None  # without angle brackets


def _date(at: float) -> str:
    return format_datetime(datetime.fromtimestamp(at, UTC))


def _escaped(ch: str) -> str:
    """RFC 6533's EmbeddedUnicodeChar: `\\x{` the code point in upper-case hex, at least two digits `}`."""
    return f"\\x{{{ord(ch):02X}}}"


def recipient_field(address: str) -> str:
    """Final-Recipient's value: `rfc822; <address>`, or for an internationalized address (RFC 6531) RFC
    6533's `utf-8; <utf-8-addr-xtext>`: every character but QCHAR (printable ASCII but `+`, `=`, `\\`)
    escaped, so the field is ASCII."""
    if address.isascii():
        return f"rfc822; {address}"
    return "utf-8; " + "".join(ch if "!" <= ch <= "~" and ch not in "+=\\" else _escaped(ch) for ch in address)


def ascii_text(text: str) -> str:
    """Text for an ASCII-only field: accents dropped (NFKD without its combining marks: "Dirección inválida"
    becomes "Direccion invalida"), any other non-ASCII character escaped as RFC 6533 does in addresses."""
    if text.isascii():
        return text
    kept = (ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    return "".join(ch if ch.isascii() else _escaped(ch) for ch in kept)


def _fields(**values: str) -> Message:
    """One header block of the delivery-status part (RFC 3464 2.2, 2.3)."""
    block = Message()
    for name, value in values.items():
        block[name.replace("_", "-")] = value
    return block


def _text(failures: Sequence[Failure], original: Original, reporting_mta: str) -> str:
    lines = [
        "This is the mail gateway at " + reporting_mta + ".",
        "",
        "Your message could not be delivered to "
        + ("one of its recipients." if len(failures) == 1 else "some of its recipients."),
        "",
        f"  Subject:     {original.subject or '(none)'}",
    ]
    if original.message_id:
        lines.append(f"  Message-ID:  <{original.message_id}>")
    lines += [f"  Accepted:    {_date(original.arrival)}", f"  Gateway id:  {original.local_id}", ""]
    for f in failures:
        words = STATUS.get(f.how, STATUS["refused"])[1]
        lines += [
            f"<{f.address}>: {words}.",
            f"    {f.diagnostic}",
            f"    (status {status_code(f.how, f.diagnostic)}, {_date(f.at)})",
            "",
        ]
    lines += [
        "Your message's headers follow below. This notice was written",
        "automatically: replies to it are not read.",
    ]
    return "\n".join(lines) + "\n"


def build(
    *,
    original: Original,
    failures: Sequence[Failure],
    reporting_mta: str,
    sender: str,
    to: str,
    now: float,
    message_id: str,
    boundary: str | None = None,
) -> bytes:
    """The notice's bytes (CRLF line ends). `sender`: its From (MAILER-DAEMON@...); `to`: whom it tells;
    `boundary`: fixed for golden tests (None: a random one)."""
    report = MIMEMultipart("report", boundary=boundary, report_type="delivery-status")
    report["From"] = f"{FROM_NAME} <{sender}>"  # formataddr takes no internationalized address
    report["To"] = to
    report["Subject"] = SUBJECT
    report["Date"] = _date(now)
    report["Message-ID"] = f"<{message_id}>"
    if original.message_id:
        report["In-Reply-To"] = f"<{original.message_id}>"
        report["References"] = f"<{original.message_id}>"
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834: never answered automatically

    human = _text_part(_text(failures, original, reporting_mta), "plain")
    human["Content-Description"] = "Notification"
    report.attach(human)

    status = MIMEBase("message", "delivery-status")
    blocks = [_fields(Reporting_MTA=f"dns; {reporting_mta}", Arrival_Date=_date(original.arrival))]
    for f in failures:
        words = STATUS.get(f.how, STATUS["refused"])[1]
        blocks.append(
            _fields(
                Final_Recipient=recipient_field(f.address),
                Action="failed",
                Status=status_code(f.how, f.diagnostic),
                Diagnostic_Code=f"X-Gateway; {ascii_text(' '.join(f.diagnostic.split()) or words)}",
                Last_Attempt_Date=_date(f.at),
            )
        )
    status.set_payload(blocks)  # type: ignore[arg-type]  # message/delivery-status: a list of header blocks
    status["Content-Description"] = "Delivery report"
    # Named, so that an API taking attachments (not MIME) carries it as a file with a sensible name.
    status.add_header("Content-Disposition", "attachment", filename="delivery-status.txt")
    report.attach(status)

    headers = _text_part(original.headers, "rfc822-headers")
    headers["Content-Description"] = "Undelivered Message Headers"
    report.attach(headers)
    for part in (human, status, headers):
        del part["MIME-Version"]  # the message's own says it
    # An internationalized sender or domain to tell (RFC 6531) has no ASCII form: its headers go as UTF-8
    # (RFC 6532); the notice is handed on parsed, never relayed as bytes, and the gateway's parser reads them.
    return report.as_bytes(policy=policy.SMTP if f"{sender}{to}".isascii() else policy.SMTPUTF8)


def _text_part(text: str, subtype: str) -> MIMENonMultipart:
    """A text part: US-ASCII as it is, else UTF-8 quoted-printable (readable as text, unlike base64)."""
    part = MIMENonMultipart("text", subtype)
    if text.isascii():
        part.set_payload(text, "us-ascii")
    else:
        charset = Charset("utf-8")
        charset.body_encoding = QP
        part.set_payload(text, charset)
    return part
