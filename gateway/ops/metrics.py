"""Every Prometheus metric of the gateway, in one registry (the queue figures are a collector: queuestats.py)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

SESSIONS = Counter("smtp_gateway_sessions_total", "SMTP sessions opened", ["listener"], registry=REGISTRY)
AUTH = Counter(
    "smtp_gateway_auth_total",
    "AUTH attempts by result: ok, invalid, unavailable (the upstream could not check), locked_out",
    ["result"],
    registry=REGISTRY,
)
TLS_HANDSHAKE_FAILURES = Counter(
    "smtp_gateway_tls_handshake_failures_total",
    "Failed TLS handshakes by listener and the highest protocol version the client offered",
    ["listener", "offered"],
    registry=REGISTRY,
)
MESSAGES = Counter(
    "smtp_gateway_messages_total",
    "Messages whose data the client sent (DATA to its final dot), each once by the class of the reply to it: 2xx, "
    "4xx, 5xx, whoever refused it (too big, the large-message budget, a quota, the upstream, an internal error). A "
    "DATA refused before 354 is no message; one whose client left before its reply is not counted",
    ["result"],
    registry=REGISTRY,
)
UPSTREAM_SECONDS = Histogram(
    "smtp_gateway_upstream_seconds",
    "Upstream API calls of the configured accounts and their latency (the _count is the number of calls) by "
    "outcome: ok (2xx), client_error (4xx), server_error (5xx), not_sent (never reached the upstream: safe to "
    "resend), answer_lost (sent, no complete answer: the upstream may have it)",
    ["account", "endpoint", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
OUTBOUND_SECONDS = Histogram(
    "smtp_gateway_outbound_http_seconds",
    "The gateway's other HTTP calls, none of an account's vendor: webhook POSTs (client=webhooks, "
    "endpoint=webhook) and OAuth issuers' JWKS fetches (client=<issuer name>, endpoint=jwks), by outcome as "
    "smtp_gateway_upstream_seconds",
    ["client", "endpoint", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
RATE_LIMIT_WAIT = Histogram(
    "smtp_gateway_rate_limit_wait_seconds",
    "Time upstream calls waited for the account's rate limiter",
    ["account"],
    buckets=(0, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
AMBIGUOUS = Counter(
    "smtp_gateway_ambiguous_calls_total",
    "Calls that may have reached the upstream without their answer being recorded (the at-least-once window), "
    "by cause: answer_lost (read timeout, reset: resent or held), lease_expired (the instance died, stopped or "
    "paused mid-call: resent or held by the next owner), passthrough_late (the client was told 451, then the call "
    "succeeded: its resend is a duplicate), partial_unqueued (calls delivered inline while the rest of the message "
    "could not be queued: the client was told 452 and its resend duplicates them), internal_error (a call that met "
    "a bug in the gateway, which may have struck after its request went: tried again, or resent by the client after "
    "its 451), key_taken_over (a resend took over an idempotency key whose message never answered and was never "
    "queued: its process died, most likely after its inline calls went out; the resend is sent again; one per "
    "message)",
    ["account", "cause"],
    registry=REGISTRY,
)


FENCED = Counter(
    "smtp_gateway_fenced_calls_total",
    "Calls not sent because the fencing check right before them failed: lease_lost (this process was paused past "
    "its lease, by SIGSTOP, a GC or a frozen VM: another owner may have the message) or unchecked (the queue could "
    "not be asked); the message goes on with whoever holds it",
    ["account", "reason"],
    registry=REGISTRY,
)


UPSTREAM_AUTH_REFUSED = Counter(
    "smtp_gateway_upstream_auth_refused_total",
    "Upstream answers refusing the gateway's own credentials (401/403, IP allowlist): an operator error",
    ["account"],
    registry=REGISTRY,
)
DMDS_SENT_SHORT = Counter(
    "smtp_gateway_dmds_sent_short_total",
    "DMDS calls answered ok whose `sent` (mails the call sent, copies included) was lower than the call's "
    "recipients: DMDS did not send to some of them (an address it holds invalid); a count of sends, not of "
    "deliveries",
    ["account"],
    registry=REGISTRY,
)
FIELDS_NOT_SENT = Counter(
    "smtp_gateway_fields_not_sent_total",
    "Parts of messages the upstream call did not carry, by field: reply_to (a DMDS send_many_inline call, queued "
    "before messages with a Reply-To got one call per contact), content_id (dEngage messages with inline images "
    "while no Content-ID field is known), x_headers (dEngage messages with X- headers not in the account's "
    "forward_x_headers), from_identity (dEngage calls whose From has no identity id for from_identity_field), "
    "header_addresses (messages whose invalid header-only To/Cc addresses a listener's "
    "drop_invalid_header_addresses removed), from_addresses and reply_to_addresses (messages whose From or "
    "Reply-To header has several addresses: the upstream field takes one, the first is sent)",
    ["account", "field"],
    registry=REGISTRY,
)
MESSAGES_REPAIRED = Counter(
    "smtp_gateway_messages_repaired_total",
    "Messages whose parse repaired something or sent a part as it arrived (the log line message_repaired), "
    "once per message and kind of defect: charset_errors, undecodable_base64, base64_trailing_text, cr_cr_lf, "
    "header_truncated, several_addresses, header_address_dropped, multipart_unsplit (a multipart without a "
    "usable boundary, its body sent as text), calendar_attached (a text/calendar alternative to the body, sent as "
    "the attachment invite.ics)",
    ["account", "defect"],
    registry=REGISTRY,
)
DELIVERIES = Counter(
    "smtp_gateway_deliveries_total",
    "Delivery attempts by path (inline: during the SMTP session; queue: the retry worker) and verdict "
    "(delivered, refused, queued, dead, internal_error)",
    ["account", "path", "verdict"],
    registry=REGISTRY,
)
CLIENT_GONE = Counter(
    "smtp_gateway_client_gone_total",
    "Messages whose client disconnected while their inline call ran; the call was recorded all the same",
    ["verdict"],
    registry=REGISTRY,
)
TLS_CLOSED_BEFORE_REPLY = Counter(
    "smtp_gateway_tls_closed_before_reply_total",
    "Messages past their final dot whose TLS client closed (a TCP FIN, a close_notify or a reset) before their "
    "reply: delivered or queued all the same, with no 250 the client saw (it may send the message again)",
    ["listener"],
    registry=REGISTRY,
)
LARGE_BYTES = Gauge(
    "smtp_gateway_large_message_bytes",
    "Bytes of large messages (over limits.large_message_threshold) held now, of limits.max_large_bytes",
    registry=REGISTRY,
)
LARGE_REFUSED = Counter(
    "smtp_gateway_large_messages_refused_total",
    "Large messages refused with 452 4.3.1 because limits.max_large_bytes were in use",
    registry=REGISTRY,
)
SPILLED = Counter(
    "smtp_gateway_messages_spilled_total",
    "Messages whose DATA went to a temporary file as it arrived (past limits.spill_above)",
    registry=REGISTRY,
)
SPILL_FAILURES = Counter(
    "smtp_gateway_spill_failures_total",
    "Messages refused with 452 4.3.1 because their DATA could not be written to limits.spill_dir (full, missing), "
    "or a large attachment not compacted within their file there (full, I/O error)",
    registry=REGISTRY,
)
RESENDS = Counter(
    "smtp_gateway_resends_total",
    "Messages not sent again because their idempotency key was seen within the window: answered (250 with the "
    "first message's id), in_progress (451: the first copy is still being delivered) or conflict (554: the key "
    "came with different content)",
    ["account", "result"],
    registry=REGISTRY,
)
IDEMPOTENCY_LATE = Counter(
    "smtp_gateway_idempotency_keys_late_total",
    "Idempotency keys the queue could not record when their message was taken (its backend down): unchecked "
    "(taken without looking for the key in the queue: a resend of another instance's message would not be "
    "recognised), recorded (once the queue was back), dropped (the in-memory backlog was full)",
    ["account", "result"],
    registry=REGISTRY,
)
INTERNAL_ERRORS = Counter(
    "smtp_gateway_internal_errors_total",
    "Unexpected exceptions (bugs), each logged once with its traceback",
    ["where"],
    registry=REGISTRY,
)


SESSIONS_ACTIVE = Gauge("smtp_gateway_sessions_active", "SMTP sessions open now", ["listener"], registry=REGISTRY)
SESSIONS_TLS = Counter(
    "smtp_gateway_sessions_tls_total",
    "SMTP sessions that became encrypted (implicit TLS or STARTTLS), by listener and negotiated TLS version",
    ["listener", "version"],
    registry=REGISTRY,
)
CONNECTIONS_REFUSED = Counter(
    "smtp_gateway_connections_refused_total",
    "Connections closed before a session began, by listener and reason: max_sessions, max_sessions_per_ip, "
    "draining, proxy_untrusted (no PROXY header accepted from that address), proxy_invalid, proxy_timeout",
    ["listener", "reason"],
    registry=REGISTRY,
)
REFUSALS = Counter(
    "smtp_gateway_refusals_total",
    'Every 4xx/5xx reply sent to an SMTP client, by basic and enhanced status code (e.g. "553 5.7.1")',
    ["code"],
    registry=REGISTRY,
)
LIMIT_HITS = Counter(
    "smtp_gateway_limit_hits_total",
    "Clients cut short by a limit: command_timeout, data_timeout, max_commands_before_data, messages_per_minute, "
    "max_auth_failures (per connection), max_recipients, max_message_size, max_large_bytes, command_call_limit, "
    "unknown_commands",
    ["limit"],
    registry=REGISTRY,
)
AUTH_DELAYED = Counter(
    "smtp_gateway_auth_delayed_total",
    "AUTH attempts made to wait first because their client IP failed too often recently",
    registry=REGISTRY,
)
AUTH_LOCKOUTS = Counter(
    "smtp_gateway_auth_lockouts_total",
    "Client IPs (IPv6: /64 networks) locked out of AUTH after too many failures",
    registry=REGISTRY,
)
AUTH_TRACKED = Gauge(
    "smtp_gateway_auth_failure_ips",
    "Client IPs (IPv6: /64 networks) whose recent SMTP AUTH failures are remembered (bounded by "
    "limits.max_tracked_ips), at each AUTH failure and every 10 s",
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "smtp_gateway_dead_letters_total",
    "Messages that became dead letters, by cause: refused (by the upstream, for good), expired (max_lifetime), "
    'held (ambiguous = "hold"), internal_error, corrupt (an unreadable queue record)',
    ["cause"],
    registry=REGISTRY,
)
TLS_CERTIFICATE_EXPIRY = Gauge(
    "smtp_gateway_tls_certificate_expiry_timestamp_seconds",
    "When the first of the certificates a TLS listener serves (tls.cert_file, and tls.extra_cert_file if set) "
    "expires, as a Unix time; set at start and at each reload that loads the certificates",
    ["listener"],
    registry=REGISTRY,
)
CONFIG_RELOADS = Counter(
    "smtp_gateway_config_reloads_total",
    "Configuration reloads (SIGHUP) by result: ok, invalid (the configuration was refused), tls_failed (the "
    "certificate files did not load); a refused reload keeps the running configuration",
    ["result"],
    registry=REGISTRY,
)
LEDGER_ROWS = Counter(
    "smtp_gateway_ledger_rows_total",
    "Message ledger rows written, by table: message, recipient, event, outbox (webhook deliveries), suppression, "
    "notice (failed recipients whose notice is to be decided)",
    ["table"],
    registry=REGISTRY,
)
LEDGER_BATCHES = Counter(
    "smtp_gateway_ledger_batches_total", "Message ledger batches written (one transaction each)", registry=REGISTRY
)
LEDGER_FLUSH_SECONDS = Histogram(
    "smtp_gateway_ledger_flush_seconds",
    "Time to write one message ledger batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
    registry=REGISTRY,
)
QUEUE_CLAIM_SECONDS = Histogram(
    "smtp_gateway_queue_claim_seconds",
    "Time the retry worker's claim of due messages took (one account's, leases taken), however deep the queue",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
LEDGER_BUFFERED = Gauge(
    "smtp_gateway_ledger_buffered_rows",
    "Message ledger rows waiting to be written now (a batch being written not included; one whose write "
    "failed is again)",
    registry=REGISTRY,
)
LEDGER_DROPPED = Counter(
    "smtp_gateway_ledger_dropped_rows_total",
    "Message ledger rows dropped: the buffer (ledger.buffer) was full, or rows were left at shutdown when the "
    "database could not take them; the messages themselves are unaffected",
    registry=REGISTRY,
)
LOG_LINES_DROPPED = Counter(
    "smtp_gateway_log_lines_dropped_total",
    "Log lines that could not be written (a full disk under the log file, the log pipe's reader gone) and were "
    "dropped; replies and deliveries are unaffected, and each later line is tried again",
    registry=REGISTRY,
)
DESCRIPTORS_EXHAUSTED = Counter(
    "smtp_gateway_descriptors_exhausted_total",
    "Times the process was out of file descriptors (RLIMIT_NOFILE): where=accept, a connection asyncio could "
    "not accept; where=check, the once-a-second check (both loops: uvloop closes such connections unseen)",
    ["where"],
    registry=REGISTRY,
)
LEDGER_WRITE_ERRORS = Counter(
    "smtp_gateway_ledger_write_errors_total",
    "Message ledger batches that could not be written (database unreachable, disk full); kept and tried again",
    registry=REGISTRY,
)
LEDGER_PRUNED = Counter(
    "smtp_gateway_ledger_pruned_total",
    "Messages whose ledger records were deleted after ledger.retention",
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "smtp_gateway_api_requests_total",
    "Requests to the operator endpoint's /api/v1, by route and HTTP status",
    ["route", "status"],
    registry=REGISTRY,
)
API_AUTH = Counter(
    "smtp_gateway_api_auth_total",
    "Bearer token checks of /api/v1 by result: ok, invalid, missing, locked_out",
    ["result"],
    registry=REGISTRY,
)
LOGIN_REFUSALS = Counter(
    "smtp_gateway_login_refusals_total",
    "Clients refused by a login's own controls, by account, login (* : the logins the account's provider checks, "
    "summed) and reason: network (AUTH from outside its networks), tls_required, recipient (not an allowed "
    "recipient), quota_messages, quota_bytes, expired_password",
    ["account", "login", "reason"],
    registry=REGISTRY,
)
LOGIN_CREDENTIALS = Counter(
    "smtp_gateway_login_credential_used_total",
    "Successful AUTHs by account, login (* : the provider's logins, summed) and the credential used: a password's "
    "label (or its position, 1, 2, ...), current or previous (a DMDS campaign apikey), oauth:<issuer>",
    ["account", "login", "credential"],
    registry=REGISTRY,
)
LOGIN_CREDENTIAL_LAST_USED = Gauge(
    "smtp_gateway_login_credential_last_used_timestamp_seconds",
    "When each credential last logged in (this process, since it started): an old password no device uses any "
    "more is safe to remove",
    ["account", "login", "credential"],
    registry=REGISTRY,
)
TEST_MESSAGES = Counter(
    "smtp_gateway_test_messages_total",
    "Messages of test-mode logins: taken through AUTH, policy and parsing, answered 250 with a TEST- id, never sent",
    ["account", "login"],
    registry=REGISTRY,
)
LOGIN_AUTH_FAILURES = Counter(
    "smtp_gateway_login_auth_failures_total",
    "Failed AUTHs naming a configured login (a wrong or expired password), by account and login; failures "
    "naming no configured login are only in smtp_gateway_auth_total",
    ["account", "login"],
    registry=REGISTRY,
)
CONSOLE_LOGINS = Counter(
    "smtp_gateway_console_logins_total",
    "Console sign-ins by result: ok, invalid (wrong name or password), locked_out (the client IP failed too often)",
    ["result"],
    registry=REGISTRY,
)
CONSOLE_ACTIONS = Counter(
    "smtp_gateway_console_actions_total",
    "Console admin actions (each also an audit log line): retry, requeue, delete, lift_lockout, unsuppress, "
    "test_send, sign_out",
    ["action"],
    registry=REGISTRY,
)
CONSOLE_ACTION_MESSAGES = Counter(
    "smtp_gateway_console_action_messages_total",
    "Messages changed by console queue actions (retry, requeue, delete)",
    ["action"],
    registry=REGISTRY,
)
CONSOLE_CSRF_REFUSED = Counter(
    "smtp_gateway_console_csrf_refused_total",
    "Console form posts refused (403) for a missing or wrong CSRF token",
    registry=REGISTRY,
)
CONSOLE_ERRORS = Counter(
    "smtp_gateway_console_errors_total",
    "Console requests that failed on an unexpected error (answered 500 with the console's error page; each "
    "also a console_error log line with its traceback)",
    registry=REGISTRY,
)
EVENT_POLLS = Counter(
    "smtp_gateway_event_polls_total",
    "Event API windows polled, by account and result: ok (read to its end), failed (the API could not answer: "
    "tried again at the next interval), busy (another instance holds the account's poll), fenced (its lease was "
    "taken over mid-window: nothing more written)",
    ["account", "result"],
    registry=REGISTRY,
)
EVENTS_READ = Counter(
    "smtp_gateway_events_total",
    "Upstream events read back, by account and type (sent, delivered, bounced, soft_bounced, not_sent, opened, "
    "clicked, ...; unknown: a vendor name no wire table maps, logged once per name): each event once, at the "
    "first poll that reads it, though the polls' windows overlap (by events.overlap)",
    ["account", "type"],
    registry=REGISTRY,
)
EVENTS_UNMATCHED = Counter(
    "smtp_gateway_events_unmatched_total",
    "Upstream events about no message this gateway sent (another system's mail on the account): not stored",
    ["account"],
    registry=REGISTRY,
)
EVENTS_MATCHED_LOST = Counter(
    "smtp_gateway_events_matched_lost_total",
    "Upstream events matched by address and time alone to the one recipient whose call's answer was lost (the "
    "upstream id they name was never learnt); an event that fits two such recipients is left unmatched. Each "
    "event once though the polls' windows overlap, as this process remembers the last 100,000 it counted: an "
    "instance that takes the account's poll over (or this one after a restart) may count again an event read "
    "within the overlap",
    ["account"],
    registry=REGISTRY,
)
EVENTS_UNREADABLE = Counter(
    "smtp_gateway_events_unreadable_total",
    "Upstream event rows that could not be read (not an object, no address, no time): each distinct row once, "
    "though the polls' windows overlap",
    ["account"],
    registry=REGISTRY,
)
EVENTS_CURSOR_AGE = Gauge(
    "smtp_gateway_events_cursor_age_seconds",
    "How far behind now an account's event poll has read (the lag, the overlap and any backlog): set at every "
    "poll from the last position stored, so it keeps growing while polls fail (the events API or the ledger "
    "down); not shown until this process has read the account's cursor once",
    ["account"],
    registry=REGISTRY,
)
SUPPRESSIONS = Gauge(
    "smtp_gateway_suppressions",
    "Addresses on each account's suppression list (this instance's copy)",
    ["account"],
    registry=REGISTRY,
)
SUPPRESSED_RECIPIENTS = Counter(
    "smtp_gateway_suppressed_recipients_total",
    "RCPT TO refused 550 5.1.1 because the address is on the account's suppression list",
    ["account"],
    registry=REGISTRY,
)
SUPPRESSION_SYNCS = Counter(
    "smtp_gateway_suppression_syncs_total",
    "Reads of the vendor's own invalid contacts (DMDS) into the suppression list, by result: ok, failed",
    ["account", "result"],
    registry=REGISTRY,
)
NOTICES = Counter(
    "smtp_gateway_notices_total",
    "Delivery status notices by result: sent (handed to delivery like any message), failed (refused), and why "
    "none was sent: null_sender, notice (about a notice), notify_off, no_data, rebuilt (its record rebuilt from a "
    "queue row without a notice's data: an older version's), suppressed, rate_limited, deleted (by an "
    "operator), held (ambiguous: it may have been delivered), no_account (no longer configured), "
    "no_longer_failed (the recipient was delivered or requeued before the decision)",
    ["account", "result"],
    registry=REGISTRY,
)
WEBHOOK_SENT = Counter(
    "smtp_gateway_webhook_deliveries_total",
    "Webhook deliveries the receiver took (a 2xx answer)",
    ["webhook"],
    registry=REGISTRY,
)
WEBHOOK_FAILED = Counter(
    "smtp_gateway_webhook_failures_total",
    "Webhook delivery attempts that failed, by reason class: http_3xx (a redirect: not followed), http_4xx, "
    "http_5xx, http_other (a status outside 200-599), timeout (sent, no answer came: a read timeout, a reset), "
    "invalid_answer (sent, what came back is not HTTP), connect, internal (an unforeseen error of the gateway's, "
    "logged as "
    "webhook_internal_error), expired (no more retries: max_age passed, the delivery failed for good), removed "
    "(the webhook is no longer configured: the delivery failed for good at once)",
    ["webhook", "reason"],
    registry=REGISTRY,
)
WEBHOOK_PENDING = Gauge(
    "smtp_gateway_webhook_pending",
    "Webhook deliveries not yet made (pending or being POSTed), in the shared outbox",
    ["webhook"],
    registry=REGISTRY,
)
WEBHOOK_DUPLICATES = Counter(
    "smtp_gateway_webhook_possible_duplicates_total",
    "Webhook deliveries POSTed again although the receiver may have taken them (the at-least-once window): "
    "answer_lost (the request was sent, no answer came, or one that is not HTTP), lease_expired (taken over "
    "after its lease: its instance stopped mid-POST, or a 2xx answer could not be recorded because the database "
    "failed)",
    ["webhook", "cause"],
    registry=REGISTRY,
)
HTTP_BAD_REQUESTS = Counter(
    "smtp_gateway_http_bad_requests_total",
    "Malformed HTTP requests to the operator endpoint (message API and console included), answered 4xx by the "
    "HTTP parser before any handler: logged as http_bad_request, once a minute per client address",
    registry=REGISTRY,
)

# The label values of the counters config/prometheus-alerts.yml alerts on with `increase(...) > 0`, known
# before any event: each series must exist at 0 from the start, since increase() over a series whose first
# sample is already 1 is 0 (the first dead letter, the first refused reload would never fire their alert).
# tests/test_ops_alerts.py checks that every literal label value in the code is listed here.
RELOAD_RESULTS = ("ok", "invalid", "tls_failed")
DEAD_CAUSES = ("refused", "expired", "held", "internal_error", "corrupt")
INTERNAL_ERROR_PLACES = (
    "accept",
    "api",
    "background",
    "dengage_froms_refresh",
    "event_loop",
    "events_poll",
    "inline_delivery",
    "invalid_contacts",
    "ledger_record",
    "ledger_writer",
    "notices",
    "queue_commit_unknown",
    "queue_delivery",
    "quota_return",
    "reload",
    "retry_worker",
    "smtp_session",
    "webhooks",
)
CONNECTION_REFUSAL_REASONS = (
    "draining",
    "max_sessions",
    "max_sessions_per_ip",
    "proxy_invalid",
    "proxy_timeout",
    "proxy_untrusted",
)
DESCRIPTOR_PLACES = ("accept", "check")


def zero_alerted(accounts: Iterable[str] = (), listeners: Iterable[str] = ()) -> None:
    """Create the alerted counters' series at 0: the fixed label values, and these accounts' and listeners'
    (at start, and the accounts again after a reload). A series that exists already keeps its count."""
    for result in RELOAD_RESULTS:
        CONFIG_RELOADS.labels(result=result)
    for cause in DEAD_CAUSES:
        DEAD_LETTERS.labels(cause=cause)
    for where in INTERNAL_ERROR_PLACES:
        INTERNAL_ERRORS.labels(where=where)
    for where in DESCRIPTOR_PLACES:
        DESCRIPTORS_EXHAUSTED.labels(where=where)
    for account in accounts:
        UPSTREAM_AUTH_REFUSED.labels(account=account)
    for listener in listeners:
        for reason in CONNECTION_REFUSAL_REASONS:
            CONNECTIONS_REFUSED.labels(listener=listener, reason=reason)


DNS_RESOLVER_FAILURES = Counter(
    "smtp_gateway_dns_resolver_failures_total",
    "DNS lookups (dns.check_sender_domain) that failed because the resolver itself is broken (unconfigured, or "
    "its check of a top-level domain failed too): a MAIL FROM answered 451 4.4.3; logged as dns_resolver_broken, "
    "at most once a minute",
    registry=REGISTRY,
)
QUEUE_COMMIT_UNKNOWN = Counter(
    "smtp_gateway_queue_commit_unknown_total",
    "New messages whose queue COMMIT's answer was lost (PostgreSQL: the connection cut after the COMMIT went), by "
    "what they turned out: stored (found: answered as stored), absent (452; not there when asked, or when it was to "
    "be withdrawn: it never landed, or a queued one was claimed and delivered before the queue answered us), "
    "withdrawn (could not be told within ~3 s: 452, and deleted once the queue answered), claimed (could not be "
    "told, and another owner claimed it before it could be deleted: it may be delivered although its client heard "
    "452, a duplicate if the client resends), abandoned (the process stopped before it could be deleted: the same "
    "window); logged as queue_commit_unknown",
    ["result"],
    registry=REGISTRY,
)
QUEUE_STORE_FAILURES = Counter(
    "smtp_gateway_queue_store_failures_total",
    "Messages the queue could not store (locked, read-only, full, unreachable): a message whose inline delivery "
    "did not settle it got 452 4.3.1; logged as spool_unavailable, once per outage",
    registry=REGISTRY,
)
