"""Operators and the suppression lists: `smtp-gateway suppression list|remove` (on a running gateway's queue) and
`GET/DELETE /api/v1/suppressions` through curl under the API token; a removal applies to RCPT TO at once on the
instance that made it and within `suppression_refresh` on the others; an account that opts out takes mail for
its suppressed addresses."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

from gateway.ledger.model import SuppressionRow
from tests.harness import Running
from tests.spool_helpers import wait_for
from tests.test_ledger_api import API, base, bearer, curl
from tests.test_returnpath_e2e import send

CLI = [sys.executable, "-m", "gateway"]


def suppressed(gw: Running, *addresses: str, account: str = "acme") -> None:
    """Entries written straight into the shared table, as another instance's poll would."""
    returns = gw.app.returnpath.returns if gw.app.returnpath else None
    assert returns is not None
    now = time.time()
    rows = [SuppressionRow(account, a, "hard bounce", "bounced", now, "0123456789ABCDEF") for a in addresses]
    gw.loop.run(returns.suppress(rows))


def test_the_cli_lists_and_removes_and_rcpt_follows(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(return_path={"suppression_refresh": 0.2})
    suppressed(gw, "gone@example.com", "Other@Example.com")
    wait_for(lambda: send(gw, "gone@example.com")[0] == 550, what="the copy refreshed")
    spool = str(gw.settings.delivery.spool_path)
    listing = subprocess.run(
        [*CLI, "suppression", "list", "--spool", spool, "--json"], capture_output=True, text=True, check=True
    )
    entries = json.loads(listing.stdout)["suppressions"]
    assert sorted(e["address"] for e in entries) == ["gone@example.com", "other@example.com"]
    assert entries[0]["reason"] == "hard bounce" and entries[0]["source"] == "bounced"
    text = subprocess.run([*CLI, "suppression", "list", "--spool", spool], capture_output=True, text=True, check=True)
    assert "2 suppressed address(es)" in text.stdout and "gone@example.com" in text.stdout
    removed = subprocess.run(
        [*CLI, "suppression", "remove", "--spool", spool, "GONE@example.com"], capture_output=True, text=True
    )
    assert removed.returncode == 0 and "removed" in removed.stdout
    again = subprocess.run([*CLI, "suppression", "remove", "--spool", spool, "gone@example.com"], capture_output=True)
    assert again.returncode == 1
    wait_for(lambda: send(gw, "gone@example.com")[0] == 250, what="the removal seen by the running gateway")
    assert send(gw, "other@example.com")[0] == 550


def test_the_api_lists_and_removes_under_the_token(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(http=API, return_path={"suppression_refresh": 3600})
    suppressed(gw, "gone@example.com", "kept@example.com")
    url = f"{base(gw)}/api/v1/suppressions"
    assert curl(url)[0] == 401
    status, _, body = curl(url, *bearer())
    assert status == 200 and sorted(e["address"] for e in body["suppressions"]) == [
        "gone@example.com",
        "kept@example.com",
    ]
    status, _, one = curl(f"{url}?address=Gone@example.com&account=acme", *bearer())
    assert [e["address"] for e in one["suppressions"]] == ["gone@example.com"]
    assert curl(f"{url}?who=me", *bearer())[0] == 400
    gw.loop.run(gw.app.returnpath.suppressions.refresh(gw.app.returnpath.returns))  # type: ignore[union-attr]
    assert send(gw, "gone@example.com")[0] == 550
    status, _, gone = curl("-X", "DELETE", f"{url}/gone@example.com?account=acme", *bearer())
    assert status == 200 and gone == {"address": "gone@example.com", "account": "acme", "removed": 1}
    assert send(gw, "gone@example.com")[0] == 250  # this instance's copy at once, no refresh needed
    assert curl("-X", "DELETE", f"{url}/gone@example.com", *bearer())[0] == 404


def test_an_account_that_opts_out_takes_mail_for_suppressed_addresses(
    gateway_factory: Callable[..., Running],
) -> None:
    gw = gateway_factory(accounts={"acme": {"suppress_recipients": False}}, return_path={"suppression_refresh": 0.2})
    suppressed(gw, "gone@example.com")
    gw.loop.run(gw.app.returnpath.suppressions.refresh(gw.app.returnpath.returns))  # type: ignore[union-attr]
    code, text = send(gw, "gone@example.com")
    assert code == 250, text
