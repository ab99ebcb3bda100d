"""SMTP replies with RFC 3463 enhanced status codes: the one table every part of the gateway answers from."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply line: basic code, enhanced status code and human text."""

    code: int
    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.status, sanitize(text))


_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")


def sanitize(text: str, limit: int = 400) -> str:
    """Make free text (an upstream's reason, a library's message) safe for one SMTP reply line."""
    text = _UNSAFE.sub(" ", text).strip()
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


# Each reply's docstring says when it is sent (docs/reference/replies.md is generated from them).


def queued(queue_id: str) -> Reply:
    """End of DATA: the message was delivered (the upstream's id) or queued (the local queue id); a test-mode
    login's message, sent nowhere: `TEST-<id>`."""
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def command_timeout(hostname: str) -> Reply:
    """The client was silent for `limits.command_timeout`; the connection is closed."""
    return Reply(421, "4.4.2", f"{hostname} Error: timeout exceeded, closing connection")


def data_timeout(hostname: str, seconds: float) -> Reply:
    """DATA took longer than `limits.data_timeout` as a whole; the connection is closed."""
    return Reply(421, "4.4.2", f"{hostname} Error: DATA not completed within {seconds:g} s, closing connection")


def too_many_calls(command: str) -> Reply:
    """A command sent more often than its limit allows (NOOP 100, HELP, VRFY, EHLO, HELO 20, EXPN 5: per
    message; AUTH 10, STARTTLS 2: per connection; docs/limits.md); the connection is closed."""
    return Reply(421, "4.7.0", f"{command} sent too many times")


def recipient_suppressed(address: str, reason: str, since: str) -> Reply:
    """RCPT TO of an address on the account's suppression list (`suppress_recipients`): it bounced hard, was
    reported not sent, complained, or the vendor holds it invalid; the text says which and since when."""
    return Reply(550, "5.1.1", sanitize(f"<{address}>: recipient suppressed: {reason} ({since})"))


SENDER_OK = Reply(250, "2.1.0", "Ok")
"""MAIL FROM accepted."""
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
"""RCPT TO accepted."""
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
"""AUTH accepted."""

AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
"""MAIL, RCPT or DATA without AUTH, from outside the listener's trusted networks."""
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
"""AUTH with a wrong username or password, an unknown login, or a provider login the upstream does not confirm."""
AUTH_TEMPFAIL = Reply(454, "4.7.0", "Temporary authentication failure")
"""AUTH with a provider login the upstream cannot check now (down, timing out, refusing the gateway)."""
AUTH_TOO_MANY = Reply(421, "4.7.0", "Too many failed authentication attempts, closing connection")
"""`limits.max_auth_failures` failed AUTH attempts on one connection; it is closed."""
AUTH_LOCKED_OUT = Reply(421, "4.7.0", "Too many failed logins from your address; try again later")
"""AUTH from a client IP locked out after `limits.auth_lockout_failures` failures; no password is checked."""
LOGIN_RATE_LIMITED = Reply(451, "4.7.1", "Message rate limit reached; try again later")
"""MAIL FROM past the login's `limits.messages_per_minute` (the text names the login and the wait)."""
LOGIN_TLS_REQUIRED = Reply(538, "5.7.11", "Encryption required for this login: use STARTTLS or the TLS port")
"""AUTH outside TLS as a login with `require_tls` (not from its `require_tls_except` networks); its password is
not checked (AUTH LOGIN: not even asked for)."""
QUOTA_MESSAGES = Reply(452, "4.7.1", "Message quota reached; try again later")
"""MAIL FROM (or the end of DATA) past the login's `quota.messages_per_hour`/`_per_day` (the text names the
login, the window and when it resets)."""
QUOTA_BYTES = Reply(452, "4.7.1", "Byte quota reached; try again later")
"""MAIL FROM with a SIZE=, or the end of DATA, past the login's `quota.bytes_per_hour`/`_per_day` (the text names
the login, the window and when it resets)."""
QUOTA_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds this login's byte quota")
"""A message (or a MAIL FROM's SIZE=) larger than the login's whole hourly or daily byte quota: it can never
be sent as it is."""
TOO_MANY_SESSIONS = Reply(421, "4.7.0", "Too many connections, try again later")
"""A connection past `limits.max_sessions`; it is closed."""
TOO_MANY_FROM_ADDRESS = Reply(421, "4.7.0", "Too many connections from your address, try again later")
"""A connection past `limits.max_sessions_per_ip` from one client IP (IPv6: its /64); it is closed."""

SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address rejected: not owned by user")
"""MAIL FROM outside the account's sender domains or the login's `allowed_senders` (the text names both)."""
NULL_SENDER = Reply(553, "5.7.1", "Null sender <> not accepted: this gateway does not relay bounces")
"""`MAIL FROM:<>`: the gateway relays no bounces."""
BAD_SENDER = Reply(553, "5.1.3", "Bad sender address syntax")
"""A malformed MAIL FROM address (the text gives the address and what is wrong with it)."""
UTF8_LOCALPART = Reply(553, "5.6.7", "Non-ASCII local part not supported")
"""A non-ASCII local part with SMTPUTF8, which the upstream API cannot take."""
BAD_RECIPIENT = Reply(553, "5.1.3", "Bad recipient address syntax")
"""A malformed RCPT TO address (the text gives the address and what is wrong with it)."""
RECIPIENT_NOT_ALLOWED = Reply(550, "5.7.1", "Recipient address rejected: not an allowed recipient for this login")
"""RCPT TO outside the login's `allowed_recipients` (the text gives the address)."""
HEADER_FROM_REJECTED = Reply(550, "5.7.1", "From header address rejected")
"""End of DATA: the From or Sender header is outside the account's sender domains or the login's senders."""
HEADER_SYNTAX = Reply(550, "5.1.3", "Bad address syntax in header")
"""End of DATA: a malformed address in From, Sender, Reply-To, To or Cc (the text names the header)."""
HEADER_ONLY_SYNTAX = Reply(550, "5.1.3", "Bad address syntax in a To or Cc header address that is not a recipient")
"""End of DATA: a malformed To or Cc address that is no envelope recipient, on a listener without
`drop_invalid_header_addresses` (the text names the header and says the address is not a recipient)."""
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
"""RCPT TO past `limits.max_recipients`."""
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
"""A message larger than `limits.max_message_size`, or one that grows too much when decoded (past 12 times its
size, or a plain-text body whose HTML would count more than `limits.max_large_bytes`)."""
INVALID_CONTENT = Reply(554, "5.6.0", "Message content rejected")
"""End of DATA: a message the parser cannot take (too many parts or headers, nested too deeply, unparseable)."""
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
"""End of DATA: no recipient left to send to."""
CAMPAIGN_REQUIRED = Reply(554, "5.6.0", "No campaign selected: start the Subject with [NN], the campaign's number")
"""DMDS: a login whose campaign comes from the Subject sent none, or a user without a `campaign`."""
UNKNOWN_CAMPAIGN = Reply(554, "5.6.0", "Unknown campaign")
"""DMDS: the campaign does not exist, or is not among the account's `campaigns`."""
CAMPAIGN_NOT_PERMITTED = Reply(550, "5.7.1", "Login may not choose the campaign")
"""DMDS: an `X-Gateway-Campaign` header from a login without `may_choose_campaign`."""
BAD_BATCH = Reply(554, "5.6.0", "X-Gateway-Batch must be a DMDS batch id (the eeid of an earlier message: a UUID)")
"""DMDS: an `X-Gateway-Batch` header whose value is not a UUID (an eeid a 250 reply named)."""
NO_SUBJECT = Reply(
    554, "5.6.0", "Subject cannot be empty: dEngage needs a Subject (or an X-Gateway-Template whose content has one)"
)
"""dEngage: a message without a Subject and without a template."""

UPSTREAM_REFUSED = Reply(554, "5.6.0", "Upstream refused the message")
"""The upstream refused the content for good (the text is the upstream's reason where it gives one)."""
UPSTREAM_AUTH = Reply(451, "4.7.0", "Upstream rejected the gateway's credentials; try again later")
"""Passthrough mode: the upstream refused the account's own key (401/403, an IP allowlist)."""
UPSTREAM_UNAVAILABLE = Reply(451, "4.4.1", "Upstream temporarily unavailable; try again later")
"""Passthrough mode: the upstream answered 5xx, timed out or could not be reached."""
UPSTREAM_SLOW = Reply(451, "4.4.1", "Upstream did not answer within the inline budget; try again later")
"""Passthrough mode: `delivery.inline_budget` ran out; the call may still succeed."""
RESEND_IN_PROGRESS = Reply(451, "4.3.0", "A message with this idempotency key is being delivered; try again later")
"""A resend while the first copy with the same idempotency key is still being delivered."""
IDEMPOTENCY_CONFLICT = Reply(554, "5.6.0", "Idempotency key already used for a different message")
"""A message whose idempotency key an earlier message with different content used within the window."""
RATE_LIMITED = Reply(452, "4.4.5", "Upstream rate limit reached; try again later")
"""Passthrough mode: the upstream answered 429."""
SENDER_DOMAIN_UNKNOWN = Reply(553, "5.1.8", "Sender address rejected: domain does not exist")
"""`dns.check_sender_domain`: the sender domain has no MX, A or AAAA record."""
RECIPIENT_DOMAIN_UNKNOWN = Reply(550, "5.1.2", "Recipient address rejected: domain does not exist")
"""`dns.check_recipient_domains`: a recipient domain does not exist."""
DNS_TEMPFAIL = Reply(451, "4.4.3", "DNS lookup failed temporarily; try again later")
"""A sender or recipient domain's DNS lookup timed out or failed (SERVFAIL, a broken resolver)."""

SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage")
"""The message had to be queued and the queue cannot store it (disk full, read-only, database down), or a large
message's DATA could not be written to `limits.spill_dir`."""
LARGE_BUSY = Reply(452, "4.3.1", "Too many large messages in progress here; try again later")
"""MAIL with a SIZE, or a message (a plain-text body counted by its HTML), past what `limits.max_large_bytes`
has free."""
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
"""The gateway is stopping (SIGTERM or Ctrl-C)."""
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error; try again later")
"""An unexpected error, logged with its traceback and counted in `smtp_gateway_internal_errors_total`."""

# The session's own answers to commands (aiosmtpd's wording where it has one, with enhanced codes).
TOO_MANY_COMMANDS = Reply(421, "4.7.0", "Too many commands without sending mail, closing connection")
"""`limits.max_commands_before_data` commands without a message; the connection is closed."""
TOO_MANY_UNKNOWN = Reply(502, "5.5.1", "Too many unrecognized commands, goodbye.")
"""The fifth unrecognised command since the session began or its last accepted message; the connection is
closed."""
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
"""DATA before an accepted RCPT TO."""
DATA_SYNTAX = Reply(501, "5.5.4", "Syntax: DATA")
"""DATA with an argument."""
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
"""AUTH before TLS on a listener without `allow_insecure_auth`."""
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
"""A second AUTH in one session."""
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "MAIL transaction in progress")
"""AUTH after MAIL and before the end of its DATA (or RSET): RFC 4954 §4 (a listener's trusted networks allow
MAIL before AUTH)."""
AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
"""AUTH without a mechanism."""
AUTH_TOO_MANY_VALUES = Reply(501, "5.5.4", "Too many values")
"""AUTH with more than a mechanism and an initial response."""
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
"""AUTH with a mechanism other than PLAIN and LOGIN (and XOAUTH2, OAUTHBEARER when `[oauth]` names an issuer)."""
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")
"""An AUTH line longer than the limit (12288 octets)."""
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64")
"""An AUTH response that is not valid base64 (an initial response or the answer to a 334 challenge)."""
AUTH_ABORTED = Reply(501, "5.7.0", "Auth aborted")
"""The client answered an AUTH challenge with `*` (RFC 4954 §4): it gave up; not counted as a failure."""
AUTH_PLAIN_UNSPLIT = Reply(501, "5.5.2", "Cannot split AUTH PLAIN value")
"""An AUTH PLAIN value without its NUL separators."""
STARTTLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
"""STARTTLS accepted: the handshake follows (with its enhanced code, as Postfix answers; RFC 2034 exempts only
the greeting and EHLO/HELO)."""
TLS_ALREADY_ACTIVE = Reply(554, "5.5.1", "TLS already active")
"""STARTTLS inside TLS, or on an implicit-TLS listener; the session goes on (STARTTLS past its count of 2 per
connection: 421 4.7.0, closed)."""
STARTTLS_SYNTAX = Reply(501, "5.5.4", "Syntax: STARTTLS")
"""STARTTLS with an argument."""
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
"""STARTTLS on a listener without TLS (`tls = "none"`)."""

# Enhanced codes for aiosmtpd's own replies that carry none; chosen per RFC 3463/5248.
DEFAULT_ENHANCED: dict[int, str] = {
    211: "2.0.0",
    214: "2.0.0",
    221: "2.0.0",
    235: "2.7.0",
    250: "2.0.0",
    251: "2.1.5",
    252: "2.5.0",
    421: "4.3.0",
    450: "4.2.0",
    451: "4.3.0",
    452: "4.3.1",
    454: "4.7.0",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    535: "5.7.8",
    538: "5.7.11",
    550: "5.0.0",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.0.0",
    555: "5.5.4",
}

_HAS_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}(?: |$)")
_CODES = re.compile(r"([2-5]\d\d)[ -](?:([245]\.\d{1,3}\.\d{1,3})(?: |$))?")


def codes(line: str) -> str | None:
    """A reply line's basic and enhanced status code, e.g. "553 5.7.1" (or "500" without one); None when
    the line is no reply. A bounded set: the metric label for refusals."""
    m = _CODES.match(line)
    if m is None:
        return None
    return f"{m[1]} {m[2]}" if m[2] else m[1]


def add_enhanced_code(line: str) -> str:
    """Insert a default enhanced status code into a reply line that lacks one (RFC 2034 §3)."""
    if len(line) < 4 or not line[:3].isdigit() or line[3] not in " -":
        return line
    code = int(line[:3])
    enhanced = DEFAULT_ENHANCED.get(code)
    rest = line[4:]
    if enhanced is None or _HAS_ENHANCED.match(rest):
        return line
    # Our own wording for aiosmtpd's terser messages; the code keeps the meaning.
    rest = _REWORDED.get(rest, rest)
    if rest.startswith("Error: "):
        rest = rest[len("Error: ") :]
    return f"{line[:3]}{line[3]}{enhanced} {rest}" if rest else f"{line[:3]}{line[3]}{enhanced}"


_REWORDED = {
    "OK": "Ok",
    "Bye": "Bye",
    "Error: bad syntax": "Syntax error",
    "Error: need MAIL command": "Need MAIL command first",
    "Error: need RCPT command": "Need RCPT command first",
    "Error: nested MAIL command": "Nested MAIL command",
    "Already authenticated": "Already authenticated",
    "Must issue a STARTTLS command first": "Must issue a STARTTLS command first",
}
