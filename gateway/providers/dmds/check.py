"""`smtp-gateway check-upstream` for a DMDS account: the version call, the campaign listing and the apikey of
each configured campaign, and with `events` enabled the return path's calls (a page of events, the invalid
contacts, one whitelist check), each read as the gateway reads it (read-only: nothing is sent or changed)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import orjson

from gateway.core.errors import Deferred
from gateway.core.events import zone
from gateway.providers.checks import AccountCheck, CallCheck, not_reached, probe, probe_return_path
from gateway.providers.dmds import eventwire, wire
from gateway.providers.dmds.events import DmdsEvents
from gateway.upstream.response import HttpResponse
from gateway.upstream.shape import Reading

if TYPE_CHECKING:
    from gateway.providers.dmds.provider import DmdsProvider

WIRE_FILE = "gateway/providers/dmds/wire.py"
EVENTWIRE_FILE = "gateway/providers/dmds/eventwire.py"
# The whitelist check asks about an address no one has (a GET only reads; POST/PUT/DELETE would change it).
CHECKED_ADDRESS = "check-upstream@example.com"


def configured_campaigns(provider: DmdsProvider) -> dict[int, str]:
    """Every campaign numid the configuration names, with where."""
    settings = provider.settings
    found = {numid: "campaigns" for numid in settings.campaigns}
    for user in settings.users:
        if user.campaign is not None:
            found.setdefault(user.campaign, f"users[{user.username}].campaign")
    return dict(sorted(found.items()))


def _listing(response: HttpResponse, reading: Reading) -> frozenset[int] | str:
    """The listing's numids, or why it cannot be read (a wire.ListingUnusable's words)."""
    try:
        return wire.campaign_listing(response, reading)
    except wire.ListingUnusable as exc:
        return str(exc)


async def check_account(provider: DmdsProvider) -> AccountCheck:
    w = wire.WIRE
    report = AccountCheck(provider.account, "DMDS", provider.http.base_url, things="campaigns")
    configured = configured_campaigns(provider)
    report.configured = [str(n) for n in configured]

    version = CallCheck(f"GET {w['version']}")
    report.calls.append(version)
    answered, found_version = await probe(version, lambda: provider.get("version", w["version"]), wire.version)
    if not_reached(report, "DMDS", "check the account's apikey (or apikey_file)"):
        return report
    if answered:
        version.recognised = found_version is not None
        if found_version is None:
            version.problem = f"HTTP {version.status} without a version the gateway recognises"
            report.fixes.append(
                f"the version call ({version.call}, its path inferred) answered HTTP {version.status} without a "
                f"version: correct WIRE['version'] or ANSWERS['version'] in {WIRE_FILE} (only this check uses it)"
            )

    path, body = wire.listing_request(None)
    listing = CallCheck(f"GET {w['campaigns']} ({w['campaigns_type']}={w['campaign_type_api']})")
    report.calls.append(listing)
    answered, listed = await probe(listing, lambda: provider.get("campaigns", path, body), _listing)
    listed_numids: frozenset[int] | None = None
    if answered:
        listing.recognised = not isinstance(listed, str)
        if isinstance(listed, str):
            listing.problem = listed
            report.fixes.append(
                f"the campaign listing ({listing.call}) cannot be read: {listed}; the gateway checks campaigns "
                f"with campania_apikey instead; correct WIRE['campaigns'] or ANSWERS['campaigns'], ANSWERS['numid'] "
                f"in {WIRE_FILE}"
            )
        elif listed is not None:
            listed_numids = listed
            report.found = [str(n) for n in sorted(listed)]

    for numid, where in configured.items():
        lookup = CallCheck(f"GET {w['campaign_apikey'].format(numid=numid)}")
        report.calls.append(lookup)
        answered, key = await probe(lookup, _lookup(provider, numid), wire.campaign_apikey)
        if answered:
            lookup.recognised = True
            if key is None:
                report.fixes.append(
                    f"campaign {numid} ({where}) has no apikey in DMDS: it is not an API campaign there; create "
                    "it as an API campaign, or remove it from the configuration"
                )
        elif lookup.status is not None and lookup.status < 300:
            lookup.recognised = False
            report.fixes.append(
                f"campania_apikey answered for campaign {numid} in a shape the gateway does not know "
                f"({lookup.problem}; keys not expected: {', '.join(lookup.unexpected) or 'none'}): logins of "
                f"this campaign are deferred (454), never refused; add the key's or the status' name to "
                f"ANSWERS['apikey'] or ANSWERS['status'] in {WIRE_FILE}"
            )
        else:
            report.fixes.append(f"campaign {numid}: {lookup.problem}")
        if listed_numids is not None and numid not in listed_numids:
            report.fixes.append(
                f"campaign {numid} ({where}) is not among the API campaigns the listing names: check its type "
                "in DMDS (only API campaigns can be sent to)"
            )
    if provider.settings.events.enabled:
        await _check_return_path(provider, report)
    return report


async def _check_return_path(provider: DmdsProvider, report: AccountCheck) -> None:
    """The event and contact calls, whose paths, parameters and answers are all [I] (eventwire.EVENT_WIRE):
    a page of the last hour's events, the invalid contacts, and the whitelist check of an address no one has.
    Each is a GET, as the poller makes it; a failure here is what the poller would say once and retry."""
    ew = eventwire.EVENT_WIRE
    settings = provider.settings.events
    tz, size = zone(settings.timezone), settings.page_size
    until = time.time()
    body = orjson.dumps(eventwire.events_body(until - 3600, until, 0, size, tz))
    checks = [
        (
            CallCheck(f"{ew['events_method']} {ew['events']} (the last hour)"),
            lambda: provider.get("ver_eventos", ew["events"], body, method=ew["events_method"]),
            lambda r, reading: eventwire.read_events(r, provider.account, tz, size, 0, reading),
            "EVENT_WIRE['events'], ['events_method'], ['since'], ['until'], ['datetime'] or EVENT_ANSWERS['events']",
        ),
        (
            CallCheck(f"GET {ew['invalid']}"),
            lambda: provider.get("contactos_invalidos", ew["invalid"]),
            lambda r, reading: eventwire.read_contacts(r, reading),
            "EVENT_WIRE['invalid'] or EVENT_ANSWERS['contacts']",
        ),
        (
            CallCheck(f"GET {ew['whitelist'].format(email=CHECKED_ADDRESS)}"),
            lambda: provider.get("whitelist", eventwire.whitelist_path(CHECKED_ADDRESS)),
            lambda r, reading: eventwire.read_whitelisted(r, CHECKED_ADDRESS),
            "EVENT_WIRE['whitelist'] or EVENT_ANSWERS['message']",
        ),
    ]
    for call, send, parse, names in checks:
        await probe_return_path(report, call, send, parse, names, EVENTWIRE_FILE)
        if call is checks[0][0] and call.ok:
            await _check_numbering(provider, report, until)


async def _check_numbering(provider: DmdsProvider, report: AccountCheck, until: float) -> None:
    """How ver_eventos numbers its pages (`pagina` from 1 or from 0: [I]), as the poller finds out: the last
    hour's pagina=1 and pagina=0 compared. Nothing to fix either way (the poller adapts); an hour without
    events cannot tell."""
    ew = eventwire.EVENT_WIRE
    call = CallCheck(f"{ew['events_method']} {ew['events']} (pagina 1 and 0: how pages are numbered)")
    report.calls.append(call)
    source = provider.event_source()
    if not isinstance(source, DmdsEvents):  # events off: not asked (the caller checks)
        return
    try:
        first, _, _ = await source.first_page(until - 3600, until)
    except Deferred as exc:
        call.failed(exc)
        report.fixes.append(f"{call.call}: {call.problem}")
        return
    call.reached, call.authenticated, call.recognised = True, True, True
    call.read = (
        f"pagina counts from {first}"
        if first is not None
        else "cannot tell: the last hour has no events, or the two answers share some rows but not all"
        " (the poller asks both until a window tells)"
    )


def _lookup(provider: DmdsProvider, numid: int) -> Callable[[], Awaitable[HttpResponse]]:
    return lambda: provider.get("campaign_apikey", wire.WIRE["campaign_apikey"].format(numid=numid))
