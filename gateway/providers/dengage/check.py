"""`smtp-gateway check-upstream` for a dEngage account: the API user's login and the From identities, each
read as the gateway reads it, against the sender domains and addresses the configuration names (read-only:
nothing is sent or changed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from gateway.policy import ascii_domain, domain_of
from gateway.providers.checks import AccountCheck, CallCheck, not_reached, probe
from gateway.providers.dengage import wire
from gateway.providers.dengage.session import JSON

if TYPE_CHECKING:
    from gateway.providers.dengage.provider import DengageProvider

WIRE_FILE = "gateway/providers/dengage/wire.py"


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
    await provider.limiter.acquire()
    answered, token = await probe(
        login,
        lambda: provider.http.request("login", "POST", str(w["login"]), headers=JSON, content=body),
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
    login.recognised = True
    assert token is not None

    froms = CallCheck(f"GET {w['froms']}")
    report.calls.append(froms)
    headers = {**JSON, "Authorization": f"Bearer {token.value}"}
    await provider.limiter.acquire()
    answered, identities = await probe(
        froms, lambda: provider.http.request("froms", "GET", str(w["froms"]), headers=headers), wire.from_identities
    )
    if not answered or identities is None:
        froms.recognised = False if froms.status is not None and froms.status < 300 else None
        # A problem that names its own fix (an unreadable status field) gets no IDENTITY_KEYS hint.
        names_fix = WIRE_FILE in (froms.problem or "")
        report.fixes.append(
            f"the identities ({froms.call}) cannot be read: {froms.problem}"
            + (f"; correct IDENTITY_KEYS in {WIRE_FILE}" if froms.recognised is False and not names_fix else "")
        )
        return report
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
    return report
