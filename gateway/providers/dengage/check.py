"""`smtp-gateway check-upstream` for a dEngage account: the API user's login and the From identities, each
read as the gateway reads it, against the sender domains and addresses the configuration names, and with
`events` enabled a page of the transactional email report (read-only: nothing is sent or changed)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson

from gateway.core.errors import UpstreamRejected, UpstreamUnavailable
from gateway.core.events import EventPage, zone
from gateway.policy import ascii_domain, domain_of
from gateway.providers.checks import AccountCheck, CallCheck, not_reached, probe, probe_return_path
from gateway.providers.dengage import eventwire, wire
from gateway.providers.dengage.session import JSON
from gateway.upstream.response import HttpResponse
from gateway.upstream.shape import Reading

if TYPE_CHECKING:
    from gateway.providers.dengage.provider import DengageProvider

WIRE_FILE = "gateway/providers/dengage/wire.py"
EVENTWIRE_FILE = "gateway/providers/dengage/eventwire.py"


def configured_senders(provider: DengageProvider) -> dict[str, str]:
    """The sender domains and addresses the configuration names, with where: each needs an identity."""
    settings = provider.settings
    found = {domain: "sender_domains" for domain in settings.sender_domains}
    for user in settings.users:
        for entry in user.allowed_senders:
            found.setdefault(entry.strip().lstrip("@").lower(), f"users[{user.username}].allowed_senders")
        if user.default_from:
            found.setdefault(user.default_from.lower(), f"users[{user.username}].default_from")
    return found


async def check_account(provider: DengageProvider) -> AccountCheck:
    settings, w = provider.settings, wire.WIRE
    report = AccountCheck(provider.account, "dEngage", provider.http.base_url, things="identities")
    configured = configured_senders(provider)
    report.configured = list(configured)

    login = CallCheck(f"POST {w['login']}")
    report.calls.append(login)
    body = orjson.dumps(wire.login_body(settings.api_userkey, settings.api_password))
    _, token = await probe(
        login,
        lambda: provider.http.request(
            "login", "POST", str(w["login"]), headers=JSON, content=body, limiter=provider.limiter
        ),
        wire.login_token,
    )
    if login.status is not None and login.status < 300 and token is None:
        # Answered 2xx, and no token under any known name: the answer's shape, not the credentials.
        login.authenticated, login.recognised = None, False
        report.fixes.append(
            f"the login answered HTTP {login.status} without a token under any name the gateway knows ("
            f"{login.problem}): add the name to TOKEN_KEYS in {WIRE_FILE}"
        )
        return report
    fix = (
        "add this machine's address to the list"
        if "allowlist" in (login.problem or "")
        else "check the account's userkey and password (or userkey_file, password_file)"
    )
    if not_reached(report, "dEngage", fix):
        return report
    if token is None:
        # Answered, and neither a token nor a refusal of the credentials (a proxy's or WAF's 401 page, a 5xx).
        report.fixes.append(f"{login.call}: {login.problem}")
        return report
    login.recognised = True
    headers = {**JSON, "Authorization": f"Bearer {token.value}"}
    await _check_froms(provider, report, configured, headers)
    if settings.events.enabled:
        await _check_report(provider, report, headers)
    return report


async def _check_froms(
    provider: DengageProvider, report: AccountCheck, configured: dict[str, str], headers: dict[str, str]
) -> None:
    settings, w = provider.settings, wire.WIRE
    froms = CallCheck(f"GET {w['froms']}")
    report.calls.append(froms)
    answered, identities = await probe(
        froms,
        lambda: provider.http.request("froms", "GET", str(w["froms"]), headers=headers, limiter=provider.limiter),
        wire.from_identities,
    )
    if not answered or identities is None:
        froms.recognised = False if froms.status is not None and froms.status < 300 else None
        # A problem that names its own fix (an unreadable status field) gets no IDENTITY_KEYS hint.
        names_fix = WIRE_FILE in (froms.problem or "")
        report.fixes.append(
            f"the identities ({froms.call}) cannot be read: {froms.problem}"
            + (f"; correct IDENTITY_KEYS in {WIRE_FILE}" if froms.recognised is False and not names_fix else "")
        )
        return
    froms.recognised = True
    report.found = [f"{i.name} <{i.address}>" + (f" (id {i.id})" if i.id else "") for i in identities]
    domains = {ascii_domain(domain_of(i.address)) for i in identities}
    if not identities:
        report.fixes.append("the account has no From identities: add one in dEngage (Settings > Email Froms)")
    for entry, where in configured.items():
        if ascii_domain(domain_of(entry)) not in domains:
            report.fixes.append(
                f"{entry} ({where}) is in no From identity's domain ({', '.join(sorted(domains)) or 'none'}): add "
                "an identity for it in dEngage, or change the configuration"
            )
    if settings.from_identity_field and any(i.id is None for i in identities):
        report.fixes.append(
            f"from_identity_field is set but the identities answer gives no id for some of them: correct "
            f"IDENTITY_KEYS['id'] in {WIRE_FILE}, or unset from_identity_field"
        )


async def _check_report(provider: DengageProvider, report: AccountCheck, headers: dict[str, str]) -> None:
    """The report call the return path polls, whose path and `limit`/`offset` names are [I]
    (eventwire.REPORT_WIRE): the last hour's first page, read as the poller reads it. A failure here is what
    the poller would say once (events_poll_failed) and retry at every interval."""
    settings = provider.settings.events
    tz, size = zone(settings.timezone), settings.page_size
    until = time.time()
    path = eventwire.report_path(until - 3600, until, 0, size, settings.tag, tz)
    call = CallCheck(f"GET {eventwire.REPORT_WIRE['report']} (the last hour)")

    def read(response: HttpResponse, reading: Reading) -> EventPage:
        try:
            data: Any = eventwire.report_data(response, wire.check_status)
        except UpstreamRejected as exc:
            # dEngage's own refusal of the query (a 400 naming a parameter): its names are the guess to correct,
            # not a refusal of anything sent (the poller says the same once and retries).
            raise UpstreamUnavailable(f"dEngage refused the report query: {exc.reason}") from None
        return eventwire.read_report(data, provider.account, tz, size, 0, reading)

    await probe_return_path(
        report,
        call,
        lambda: provider.http.request("report", "GET", path, headers=headers, limiter=provider.limiter),
        read,
        "REPORT_WIRE['report'], ['since'], ['until'], ['limit'], ['offset'] or REPORT_ANSWERS['rows']",
        EVENTWIRE_FILE,
    )
