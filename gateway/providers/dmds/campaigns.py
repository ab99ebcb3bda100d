"""Pure: which DMDS campaign a message goes to, from the login, a "[NN]" Subject prefix or a header.

A DMDS login's Principal.extra is a DmdsLogin (gateway/providers/dmds/data.py)."""

from __future__ import annotations

import re

from gateway.core import replies
from gateway.core.errors import ContentRejected, PolicyRejected
from gateway.core.model import Principal
from gateway.providers.dmds.data import DmdsLogin

_SUBJECT_PREFIX = re.compile(r"^\s*\[([0-9]{1,12})\]\s*")
_NUMID = re.compile(r"[0-9]{1,12}")
# An eeid as DMDS answers it: a UUID [V] (the vendor's one example, "3abc993d-8i88-...", has a typo in it).
_EEID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
CAMPAIGN_OPTION = "campaign"
BATCH_OPTION = "batch"


def resolve_campaign(principal: Principal, subject: str, options: dict[str, str]) -> tuple[int, str]:
    """Return (campaign numid, subject to send). The "[NN]" prefix is removed, as DMDS does."""
    login = DmdsLogin.read(principal.extra)
    if login.campaign_from_subject:
        m = _SUBJECT_PREFIX.match(subject)
        if m is None:
            # DMDS silently discards such mail; we refuse it while the client can still see why.
            raise ContentRejected(reply=replies.CAMPAIGN_REQUIRED)
        return int(m.group(1)), subject[m.end() :]
    override = options.get(CAMPAIGN_OPTION)
    if override is not None:
        if not login.may_choose_campaign:
            raise PolicyRejected(
                reply=replies.CAMPAIGN_NOT_PERMITTED.with_text(f"Login {principal.login} may not choose the campaign")
            )
        if not _NUMID.fullmatch(override.strip()):  # str.isdigit() also takes "²" and Arabic-Indic digits
            raise ContentRejected(f"X-Gateway-Campaign must be a campaign number, got {override.strip()!r}")
        return int(override.strip()), subject
    if login.campaign is None:
        raise ContentRejected(reply=replies.CAMPAIGN_REQUIRED)
    return login.campaign, subject


def option_flag(options: dict[str, str], name: str, default: bool) -> bool:
    value = options.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def batch_option(options: dict[str, str]) -> str | None:
    """The batch (eeid) an `X-Gateway-Batch` header names; refused (554 5.6.0) when it is not a UUID: DMDS
    would refuse the call or, worse, take an eeid of some other batch."""
    value = (options.get(BATCH_OPTION) or "").strip()
    if not value:
        return None
    if not _EEID.fullmatch(value):
        raise ContentRejected(f"X-Gateway-Batch {value[:60]!r} is not a UUID", reply=replies.BAD_BATCH)
    return value.lower()
