"""The Queue and dead letters page: a selection (gateway/delivery/admin.py, the same as `queue list`/`dead`
with filters), and retry now, requeue and delete of one message or many, after a confirmation naming the
count, by the same code as `smtp-gateway queue retry|requeue|delete`."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.console.runtime import Gateway
from gateway.core.errors import SpoolUnavailable
from gateway.delivery.admin import (
    ACTIONS,
    ELIGIBLE,
    SCAN_LIMIT,
    Action,
    BadSelection,
    Listing,
    QueueAdmin,
    Results,
    Selection,
    parse_age,
)
from gateway.ledger.recorder import Recorder

FILTERS = ("state", "account", "login", "domain", "reason", "older_than")
PAGE = 200
# The most a listing shows, and so the most ids one form carries ("tick all shown"): with the form's other
# fields well under the 1000 fields aiohttp (from 3.13) takes in one form; a form over it is answered 413.
MAX_PAGE = 500
# The most one action takes: "every one matching" posts its filters, never the ids, and is resolved here
# among the oldest MAX_IDS messages of its states (a listing reads as many); the page and the confirmation say
# so when more are in the queue, and the admin runs it again for the rest.
MAX_IDS = SCAN_LIMIT
VERBS = {"retry": "Retry now", "requeue": "Requeue", "delete": "Delete"}


def selection(params: Mapping[str, str]) -> Selection:
    """A Selection from the page's fields; BadSelection names a bad one."""
    state = params.get("state", "queue")
    if state not in ("queue", "dead"):
        raise BadSelection("state: queue or dead")
    older = params.get("older_than", "").strip()

    def text(name: str) -> str | None:
        return params.get(name, "").strip() or None

    return Selection(
        state == "dead",
        text("account"),
        text("login"),
        text("domain"),
        text("reason"),
        parse_age(older) if older else None,
    )


def admin(gw: Gateway, actor: str) -> QueueAdmin:
    assert gw.store is not None
    writer = gw.ledger_writer
    recorder = Recorder(
        writer.put if writer is not None else (lambda rows: None), actor, enabled=gw.settings.ledger.enabled
    )
    return QueueAdmin(gw.store, recorder, gw.ledger)


async def listing(gw: Gateway, params: Mapping[str, str]) -> dict[str, Any]:
    given = {k: params[k].strip() for k in FILTERS if params.get(k, "").strip()}
    given.setdefault("state", "queue")
    out: dict[str, Any] = {
        "given": given,
        "items": [],
        "counts": {},
        "error": None,
        "listing": None,
        "verbs": VERBS,
        "more": False,
        "show_more": None,
    }
    try:
        limit = min(max(int(params.get("limit") or PAGE), 1), MAX_PAGE)
    except ValueError:
        limit = PAGE
    out["limit"] = limit
    if gw.store is None:
        return {**out, "error": "the queue is not open"}
    now = time.time()
    try:
        chosen = selection(params)
        # One more than shown: the page says when more match than it shows.
        found: Listing = await admin(gw, "").select(chosen, now, limit + 1, scan=MAX_IDS)
        counts = await gw.store.counts(now)
        out.update(items=found.items[:limit], listing=found, counts=counts, now=now)
        out["in_states"] = in_states(counts, chosen)
        out["more"] = len(found.items) > limit
        if out["more"] and limit < MAX_PAGE:
            out["show_more"] = {**given, "limit": str(MAX_PAGE)}
        out["actions"] = [a for a in ACTIONS if set(ELIGIBLE[a]) & set(chosen.states)]
        out["described"] = chosen.describe()
    except BadSelection as exc:
        out["error"] = str(exc)
    except SpoolUnavailable as exc:
        out["error"] = f"the queue cannot be read now: {exc.reason}"
    return out


async def chosen_ids(gw: Gateway, form: Mapping[str, str], ids: Sequence[str], name: Action) -> tuple[list[str], str]:
    """The ids a form acts on: those ticked, or (scope=all) every message its filters select now among the
    oldest MAX_IDS of its states; and what they are. BadSelection: more ticked than a listing shows (a crafted
    form)."""
    if form.get("scope") == "all":
        assert gw.store is not None  # the caller answers 503 without a queue
        chosen = selection(form)
        now = time.time()
        found = await admin(gw, "").select(chosen, now, MAX_IDS, scan=MAX_IDS)
        ids = [item.id for item in found.items]
        total = in_states(await gw.store.counts(now), chosen) if found.truncated else found.scanned
        if total <= found.scanned:
            return ids, f"every one of the {chosen.describe()}"
        # Never "every one" when more are in the queue than one action reads: it says which it takes, and
        # what becomes of the rest (retried messages stay queued, so a second retry takes the same oldest).
        rest = "the rest are tried at their own next attempt" if name == "retry" else "run it again for the rest"
        return ids, (
            f"the {chosen.describe()} among the oldest {found.scanned:,} of the {total:,} {noun(chosen)}"
            f" (one action reads at most {MAX_IDS:,}; {rest})"
        )
    picked = list(dict.fromkeys(i.strip().upper() for i in ids if i.strip()))
    if len(picked) > MAX_PAGE:
        raise BadSelection(f"at most {MAX_PAGE} ticked at once: choose every one matching for more")
    return picked, "the messages ticked"


def in_states(counts: Mapping[str, Mapping[str, Any]], chosen: Selection) -> int:
    """How many messages are in the selection's states, whatever its filters (store.counts)."""
    return sum(int(counts[state]["count"]) for state in chosen.states if state in counts)


def noun(chosen: Selection) -> str:
    return "dead letters" if chosen.dead else "queued and in-flight messages"


def digest(ids: Sequence[str]) -> str:
    """Names a resolved selection in the confirmation's form: the action re-resolves the filters and goes on
    only if they still select exactly these messages (else it asks again, with the new count)."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:32]


def action(name: str) -> Action:
    for known in ACTIONS:
        if name == known:
            return known
    raise BadSelection(f"action: one of {', '.join(ACTIONS)}")


async def act(gw: Gateway, who: str, name: Action, ids: Sequence[str]) -> Results:
    return await admin(gw, who).act(name, ids, time.time(), gw.settings.delivery.max_lifetime)
