"""The whole send path against the sandbox answering in each documented shape ("seed": the names the seed
document shows, "alt": the other spellings), for both providers: logins, campaigns, identities, sends."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import httpx
import pytest

from gateway.ledger.model import Query
from gateway.providers.sandbox import SHAPES, Sandbox, SandboxState
from tests import configs
from tests.configs import NO_UPSTREAM, gateway_config, listener
from tests.docs_blocks import commands, doc_blocks
from tests.harness import (
    APIKEY,
    CAMPAIGNS,
    DENGAGE_API_PASSWORD,
    DENGAGE_USERKEY,
    LoopThread,
    Running,
    dengage_account,
    sandbox_for_tests,
)
from tests.ops_util import captured_with_context, sample
from tests.smtputil import message, send, session
from tests.spool_helpers import wait_for
from tests.test_cli import run_cli
from tests.test_dengage_e2e import UNREAD_TOKEN, login_answering_with_an_unread_key
from tests.test_dengage_e2e import message as dengage_message
from tests.test_dengage_e2e import send as dengage_send


@pytest.fixture(params=SHAPES)
def shaped(request: pytest.FixtureRequest, gateway_factory: Callable[..., Running]) -> Running:
    # Both providers' accounts: the tests' DMDS account `acme` and the dEngage account.
    return gateway_factory(
        sandbox=sandbox_for_tests(SandboxState(shape=request.param)), accounts={"acme": {}}, dengage={}
    )


def test_dmds_logins_campaigns_and_sends_in_either_shape(shaped: Running) -> None:
    replies = []
    with session(shaped) as client:  # a configured user: campaign 22
        replies.append(send(client, message(subject="configured user")))
    with session(shaped, user="acme-23", password=CAMPAIGNS[23]) as client:  # SMTP-API: the campaign's apikey
        replies.append(send(client, message(subject="smtp-api login")))
    with session(shaped, user="acme", password=APIKEY) as client:  # [NN]: the campaign from the listing
        replies.append(send(client, message(subject="[22]subject campaign")))
        unknown = send(client, message(subject="[99]no such campaign"))
    assert [code for code, _ in replies] == [250, 250, 250], replies
    # The reply names the batch id, whatever the answer called it.
    assert [text.rsplit(" ", 1)[1] for _, text in replies] == [r["upstream_id"] for r in shaped.sent]
    assert [(r["body"]["campana_id"], r["body"]["asunto"]) for r in shaped.sent] == [
        (22, "configured user"),
        (23, "smtp-api login"),
        (22, "subject campaign"),
    ]
    assert unknown == (554, "5.6.0 Unknown campaign 99")
    listing = [r for r in shaped.sandbox.state.requests if r["kind"] == "listing"]
    assert [(r["body"]["tipo"], r["body"]["numid"], r["status"]) for r in listing] == [
        ("api", 22, 200),
        ("api", 99, 200),
    ]
    assert shaped.lookups == ["23"]  # campania_apikey only for the SMTP-API login's key


def test_dengage_identities_and_sends_in_either_shape(shaped: Running) -> None:
    code, text = dengage_send(shaped, dengage_message("identities"))
    assert code == 250, text
    [sent] = shaped.calls("send", status=200)
    assert text.endswith(sent["upstream_id"])  # the transactional id, whatever the answer called it
    # The identities' creator is an address in the answer, but no sender identity.
    refused = dengage_send(shaped, dengage_message("creator"), mail_from="admin@sandbox-users.example")
    assert refused[0] == 553 and "permitted: crm.example, mail.crm.example" in refused[1]
    assert len(shaped.calls("login")) == 1 and len(shaped.calls("froms")) == 1


def test_sandbox_shape_switches_at_run_time(shaped: Running) -> None:
    other = "alt" if shaped.sandbox.state.shape == "seed" else "seed"
    assert httpx.post(f"{shaped.sandbox_url}/_sandbox/shape", json={"shape": other}).json() == {"shape": other}
    with session(shaped) as client:
        assert send(client, message(subject="after the switch"))[0] == 250
    [sent] = shaped.sent
    assert ("eeid" in sent["response"]) == (other == "seed")  # answered in the new shape
    assert httpx.post(f"{shaped.sandbox_url}/_sandbox/shape", json={"shape": "other"}).status_code == 400


def test_dmds_sent_count_is_recorded_never_as_delivered(shaped: Running) -> None:
    # DMDS takes the call but does not send to an address it holds invalid: `sent` is lower than the
    # recipients (contacts + copies), as the seed warns.
    httpx.post(f"{shaped.sandbox_url}/_sandbox/dmds", json={"unsent": ["dee@example.com"]}).raise_for_status()
    short = sample("smtp_gateway_dmds_sent_short_total", account="acme")
    with captured_with_context() as logs, session(shaped) as client:
        full = send(client, message(subject="everyone"), ["client@example.com"])
        partly = send(
            client,
            message(subject="one unsent", extra="Cc: dee@example.com\r\n"),
            ["client@example.com", "dee@example.com"],
        )
    assert full[0] == partly[0] == 250
    assert sample("smtp_gateway_dmds_sent_short_total", account="acme") == short + 1
    [fewer] = [e for e in logs if e["event"] == "dmds_sent_fewer_than_recipients"]
    assert (fewer["sent"], fewer["recipients"], fewer["eeid"]) == (1, 2, shaped.sent[1]["upstream_id"])
    # The count travels with the message's log lines (the message ledger records it from Outcome.sent).
    assert [e["upstream_sent"] for e in logs if e["event"] == "message_sent"] == [1, 1]
    accepted = [e for e in logs if e["event"] == "message_accepted"]
    assert [(e["rcpts"], e["upstream_sent"]) for e in accepted] == [(1, 1), (2, 1)]
    assert not any("delivered" in e for e in accepted)
    # The message ledger keeps it on the call's attempt event.
    assert shaped.app.ledger is not None and shaped.app.ledger_writer is not None
    shaped.loop.run(shaped.app.ledger_writer.flush())
    [found] = shaped.loop.run(shaped.app.ledger.find(Query(reply_id=partly[1].rsplit(" ", 1)[1]))).records
    record = shaped.loop.run(shaped.app.ledger.get(found.id))
    assert record is not None
    [attempt] = [e for e in record.events if e.kind == "attempt"]
    assert attempt.data is not None and attempt.data["sent"] == 1
    assert attempt.detail == "the upstream says it sent 1 mail(s) for 2 recipient(s)"


def test_dmds_sent_count_of_a_queued_message_is_logged_when_it_is_delivered(
    gateway_factory: Callable[..., Running],
) -> None:
    gw = gateway_factory(delivery={"retry_schedule": [0.2], "retry_jitter": 0.0, "poll_interval": 0.1})
    gw.fault(status=503, count=1, kind="send")
    with captured_with_context() as logs:
        with session(gw) as client:
            assert send(client, message(subject="queued first"))[0] == 250
        wait_for(lambda: any(e["event"] == "message_delivered" for e in logs), what="the retry delivered")
    [delivered] = [e for e in logs if e["event"] == "message_delivered"]
    assert (delivered["upstream_ids"], delivered["upstream_sent"]) == ([gw.sent[0]["upstream_id"]], 1)


# -- smtp-gateway check-upstream ------------------------------------------------------------------------------


@pytest.fixture(params=SHAPES)
def upstream(request: pytest.FixtureRequest, loop_thread: LoopThread) -> Iterator[Sandbox]:
    """The sandbox alone (no gateway), answering in one shape: check-upstream runs as its own process."""
    sandbox = sandbox_for_tests(SandboxState(shape=request.param))
    loop_thread.run(sandbox.start("127.0.0.1", 0))
    yield sandbox
    loop_thread.run(sandbox.stop())


def check_upstream(tmp_path: Path, sandbox: Sandbox, *args: str, **accounts: dict[str, Any]) -> CompletedProcess[str]:
    """`smtp-gateway check-upstream` with the tests' DMDS account `acme` and dEngage account `crm` (these keys
    changed) against `sandbox`."""
    port = sandbox.port
    config = gateway_config(
        tmp_path,
        port,
        listeners=[listener()],
        accounts={"acme": accounts.get("acme", {}), "crm": dengage_account(port, **accounts.get("crm", {}))},
    )
    return run_cli("check-upstream", "-c", str(configs.write(tmp_path / "gateway.toml", config)), *args)


def test_check_upstream_finds_everything_configured(tmp_path: Path, upstream: Sandbox) -> None:
    result = check_upstream(
        tmp_path, upstream, "--json", acme={"campaigns": [22, 23]}, crm={"sender_domains": ["crm.example"]}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    dmds, dengage = json.loads(result.stdout)
    assert (dmds["account"], dmds["provider"], dmds["ok"]) == ("acme", "DMDS", True)
    assert [c["call"] for c in dmds["calls"]] == [
        "GET /v1/version/",
        "GET /v1/campania/ (tipo=api)",
        "GET /v1/campania_apikey/22",
        "GET /v1/campania_apikey/23",
    ]
    assert all((c["reached"], c["authenticated"], c["recognised"]) == (True, True, True) for c in dmds["calls"])
    assert (dmds["configured"], dmds["found"], dmds["fixes"]) == (["22", "23"], ["22", "23"], [])
    # Which candidate name matched, for the campaign's apikey: the spelling of the shape.
    apikey = "camp_apikey" if upstream.state.shape == "seed" else "apikey"
    assert f"apikey={apikey}" in dmds["calls"][2]["read"]
    assert (dengage["provider"], dengage["ok"], dengage["configured"]) == ("dEngage", True, ["crm.example"])
    assert dengage["found"][0].startswith("CRM Billing <billing@crm.example> (id ")
    assert [c["call"] for c in dengage["calls"]] == ["POST /login", "GET /email/froms"]
    # No secret in the report: not the campaigns' apikeys, not the API user's key or password, not the token.
    for secret in (*CAMPAIGNS.values(), DENGAGE_USERKEY, DENGAGE_API_PASSWORD, "sbx-", APIKEY):
        assert secret not in result.stdout + result.stderr
    # Read-only: nothing was sent.
    assert [r for r in upstream.state.requests if r["kind"] == "send"] == []


def test_check_upstream_names_each_mismatch_and_what_to_fix(tmp_path: Path, upstream: Sandbox) -> None:
    result = check_upstream(
        tmp_path,
        upstream,
        acme={"campaigns": [22, 24]},
        crm={"sender_domains": ["crm.example", "other.example"]},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "account acme (DMDS, " in out and "): 2 problem(s)" in out
    assert "- campaign 24 (campaigns) has no apikey in DMDS: it is not an API campaign there" in out
    assert "- campaign 24 (campaigns) is not among the API campaigns the listing names" in out
    assert "- other.example (sender_domains) is in no From identity's domain (crm.example, mail.crm.example)" in out
    if upstream.state.shape == "alt":  # its campaigns carry a key the gateway does not read: named
        assert "GET /v1/campania/ (tipo=api): keys not expected: campaigns[].created" in out
    else:
        assert "keys not expected" not in out


def test_check_upstream_one_account_with_refused_credentials(tmp_path: Path, upstream: Sandbox) -> None:
    result = check_upstream(tmp_path, upstream, "crm", crm={"password": "not-the-password-s3cr3t"})
    assert result.returncode == 1
    assert "account acme" not in result.stdout  # only the account asked for
    assert "POST /login  HTTP 401  yes      NO" in result.stdout
    assert "dEngage refused the API user's credentials" in result.stdout
    assert "check the account's userkey and password" in result.stdout
    assert "s3cr3t" not in result.stdout + result.stderr


def test_check_upstream_names_a_login_answers_keys_never_its_token(tmp_path: Path) -> None:
    """A login answer with the token under a name the gateway does not read: check-upstream says which keys
    came (for TOKEN_KEYS), plain and --json, and never prints the answer, token included."""
    with login_answering_with_an_unread_key() as port:
        config = gateway_config(tmp_path, NO_UPSTREAM, listeners=[listener()])
        config["accounts"] = {"crm": dengage_account(port)}
        path = configs.write(tmp_path / "gateway.toml", config)
        for extra in ([], ["--json"]):
            result = run_cli("check-upstream", "-c", str(path), *extra)
            out = result.stdout + result.stderr
            assert result.returncode == 1, out
            assert "without a token under any name the gateway knows" in out and "keys: expires, jwt" in out, out
            assert UNREAD_TOKEN not in out, out


def test_check_upstream_when_the_listing_is_not_there(tmp_path: Path, upstream: Sandbox) -> None:
    httpx.post(f"http://127.0.0.1:{upstream.port}/_sandbox/dmds", json={"listing": False}).raise_for_status()
    result = check_upstream(tmp_path, upstream, "acme", "--json")
    assert result.returncode == 1
    [dmds] = json.loads(result.stdout)
    listing = dmds["calls"][1]
    assert (listing["status"], listing["recognised"], listing["ok"]) == (404, False, False)
    assert "the gateway checks campaigns with campania_apikey instead" in dmds["fixes"][0]
    assert dmds["calls"][2]["ok"]  # the user's campaign 22 has its apikey


def test_check_upstream_when_the_api_is_unreachable(tmp_path: Path) -> None:
    config = gateway_config(tmp_path, NO_UPSTREAM, listeners=[listener()])
    result = run_cli("check-upstream", "-c", str(configs.write(tmp_path / "gateway.toml", config)))
    assert result.returncode == 1
    assert "GET /v1/version/  no answer  NO" in result.stdout
    assert "DMDS cannot be reached at http://127.0.0.1:9" in result.stdout
    unknown = run_cli("check-upstream", "nosuch", "-c", str(tmp_path / "gateway.toml"))
    assert unknown.returncode == 2 and "no account 'nosuch' in the configuration (accounts: acme)" in unknown.stderr


def test_check_upstream_as_the_page_shows(tmp_path: Path, loop_thread: LoopThread) -> None:
    """docs/operations/upstream.md's commands, with the page's configuration path replaced by the tests'."""
    sandbox = sandbox_for_tests()
    loop_thread.run(sandbox.start("127.0.0.1", 0))
    try:
        [block] = doc_blocks("test_check_upstream_as_the_page_shows")
        lines = [command for command, _ in commands(block)]
        assert len(lines) == 2, lines
        config = gateway_config(
            tmp_path,
            sandbox.port,
            listeners=[listener()],
            accounts={"acme": {}, "crm": dengage_account(sandbox.port, sender_domains=["crm.example"])},
        )
        path = configs.write(tmp_path / "gateway.toml", config)
        every, one = (
            run_cli(*shlex.split(line.replace("/etc/smtp-gateway/gateway.toml", str(path)).split("#")[0])[1:])
            for line in lines
        )
        assert every.returncode == 0, every.stdout + every.stderr
        assert every.stdout.startswith("account acme (DMDS, ") and "\n\naccount crm (dEngage, " in every.stdout
        assert one.returncode == 0 and [a["account"] for a in json.loads(one.stdout)] == ["crm"]
    finally:
        loop_thread.run(sandbox.stop())


def report_check(tmp_path: Path, sandbox: Sandbox) -> dict[str, Any]:
    """check-upstream of the dEngage account alone with events enabled: its report (JSON)."""
    events = {"enabled": True, "tag": "smtp-gateway"}
    result = check_upstream(tmp_path, sandbox, "crm", "--json", crm={"events": events})
    assert result.returncode in (0, 1), result.stdout + result.stderr
    [dengage] = json.loads(result.stdout)
    return dict(dengage)


def test_check_upstream_reads_the_dengage_report_when_events_are_enabled(tmp_path: Path, upstream: Sandbox) -> None:
    dengage = report_check(tmp_path, upstream)
    assert dengage["ok"], dengage["fixes"]
    assert [c["call"] for c in dengage["calls"]] == [
        "POST /login",
        "GET /email/froms",
        "GET /transactional/email/report (the last hour)",
    ]
    [asked] = [r for r in upstream.state.requests if r["kind"] == "report"]
    # The window and the page by the [I] names, the tag the poller filters by (the sandbox refuses others).
    assert set(asked["query"]) == {"beginTime", "endTime", "limit", "offset", "tag"}
    assert [r for r in upstream.state.requests if r["kind"] == "send"] == []


@pytest.mark.parametrize(
    ("style", "fault", "problem"),
    [
        ("html", {"status": 404}, "the path or api_base is wrong"),  # no report at that path
        ("bare", {"mode": "err"}, "no list of rows under a known name"),  # an answer in another shape
    ],
)
def test_check_upstream_says_when_the_dengage_report_cannot_be_read(
    tmp_path: Path, upstream: Sandbox, style: str, fault: dict[str, Any], problem: str
) -> None:
    url = f"http://127.0.0.1:{upstream.port}/_sandbox"
    httpx.post(f"{url}/dengage", json={"fault_style": style}).raise_for_status()
    httpx.post(f"{url}/faults", json={**fault, "kind": "report", "provider": "dengage"}).raise_for_status()
    dengage = report_check(tmp_path, upstream)
    assert not dengage["ok"]
    report = dengage["calls"][-1]
    assert (report["call"], report["reached"], report["recognised"]) == (
        "GET /transactional/email/report (the last hour)",
        True,
        False,
    )
    [fix] = dengage["fixes"]
    assert problem in fix and "REPORT_WIRE['report']" in fix and "gateway/providers/dengage/eventwire.py" in fix
    assert "<html" not in json.dumps(dengage)  # a proxy's page is not repeated in the report
