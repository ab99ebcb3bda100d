"""Operators and the suppression lists: `smtp-gateway suppression list|remove` (on a running gateway's queue) and
`GET/DELETE /api/v1/suppressions` through curl under the API token; a removal applies to RCPT TO at once on the
instance that made it and within `suppression_refresh` on the others; an account that opts out takes mail for
its suppressed addresses."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from urllib.parse import quote

from gateway.ledger.model import SuppressionRow
from tests.console_util import Client, console_gateway
from tests.console_util import base as console_base
from tests.harness import Running
from tests.ops_util import captured_with_context
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


async def test_the_console_lists_filters_and_removes_and_rcpt_follows(gateway_factory: Callable[..., Running]) -> None:
    """The console's Suppressions page: every account's entries, a filter by a part of an address, a removal
    audited and applied to RCPT TO at once by this instance; refused without the form's CSRF token."""
    gw = console_gateway(gateway_factory, return_path={"suppression_refresh": 3600})
    suppressed(gw, "gone@example.com", "kept@example.org")
    gw.loop.run(gw.app.returnpath.suppressions.refresh(gw.app.returnpath.returns))  # type: ignore[union-attr]
    assert send(gw, "gone@example.com")[0] == 550
    async with Client(console_base(gw)) as admin:
        assert (await admin.get("/console/suppressions"))[0] == 303  # signed in only
        await admin.signin()
        status, _, page = await admin.get("/console/suppressions")
        assert status == 200 and "gone@example.com" in page and "kept@example.org" in page
        assert "hard bounce" in page and "/console/messages/0123456789ABCDEF" in page
        _, _, page = await admin.get("/console/suppressions?address=@example.org&account=acme")
        assert "kept@example.org" in page and "gone@example.com" not in page
        fields = {"account": "acme", "address": "gone@example.com"}
        status, _, page = await admin.post("/console/suppressions/remove", fields)  # no token
        assert status == 403 and "security token" in page
        assert send(gw, "gone@example.com")[0] == 550
        with captured_with_context() as logs:
            status, response, _ = await admin.form("/console/suppressions", "/console/suppressions/remove", fields)
        assert status == 303 and "removed=gone%40example.com" in response.headers["Location"]
        [audit] = [e for e in logs if e["event"] == "console_action"]
        assert (audit["action"], audit["count"], audit["address"]) == ("unsuppress", 1, "gone@example.com")
        status, _, page = await admin.get(response.headers["Location"])
        assert "gone@example.com: removed (1 entry)" in page and "kept@example.org" in page
        assert "<td>gone@example.com</td>" not in page
        # The outcome line comes only from this session's own removal: a link with another text, count or tag
        # (or this one's, in another session) shows no outcome.
        words = "Your session is about to expire: sign in again at https://console-login.example"
        tag = urllib.parse.parse_qs(urllib.parse.urlsplit(response.headers["Location"]).query).get("tag", [""])[0]
        for forged in (
            {"removed": words, "n": "1"},
            {"removed": words, "n": "1", "tag": tag},
            {"removed": "gone@example.com", "n": "5", "tag": tag},
            {"removed": "x@example.com", "n": "0"},
        ):
            _, _, page = await admin.get("/console/suppressions?" + urllib.parse.urlencode(forged))
            assert forged["removed"] not in page and 'class="done"' not in page, forged
    async with Client(console_base(gw)) as other:
        await other.signin()
        _, _, page = await other.get(response.headers["Location"])
        assert 'class="done"' not in page, "another session shows this one's outcome"
    assert send(gw, "gone@example.com")[0] == 250  # this instance's copy at once
    assert send(gw, "kept@example.org")[0] == 550


def test_an_idn_address_as_typed_is_found_and_removed_by_the_cli_and_the_api(
    gateway_factory: Callable[..., Running],
) -> None:
    """Entries are kept in the form RCPT TO checks (IDNA domain); the address typed with its Unicode domain
    names the same entry in `suppression list --address|remove` and the API's filter and DELETE."""
    gw = gateway_factory(http=API, return_path={"suppression_refresh": 3600})
    suppressed(gw, "a@xn--bcher-kva.example", "b@xn--bcher-kva.example")
    spool = str(gw.settings.delivery.spool_path)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "suppression", *args, "--spool", spool], capture_output=True, text=True)

    listed = json.loads(cli("list", "--address", "A@Bücher.example", "--json").stdout)["suppressions"]
    assert [e["address"] for e in listed] == ["a@xn--bcher-kva.example"]
    removed = cli("remove", "a@Bücher.example")
    assert removed.returncode == 0 and "removed" in removed.stdout, removed.stdout
    url = f"{base(gw)}/api/v1/suppressions"
    typed = quote("b@Bücher.example")
    _, _, one = curl(f"{url}?address={typed}", *bearer())
    assert [e["address"] for e in one["suppressions"]] == ["b@xn--bcher-kva.example"]
    gw.loop.run(gw.app.returnpath.suppressions.refresh(gw.app.returnpath.returns))  # type: ignore[union-attr]
    assert send(gw, "b@xn--bcher-kva.example")[0] == 550
    status, _, gone = curl("-X", "DELETE", f"{url}/{typed}?account=acme", *bearer())
    assert status == 200 and gone["removed"] == 1, gone
    assert send(gw, "b@xn--bcher-kva.example")[0] == 250  # this instance's copy at once
