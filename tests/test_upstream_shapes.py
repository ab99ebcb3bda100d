"""The whole send path against the sandbox answering in each documented shape ("seed": the names the seed
document shows, "alt": the other spellings), for both providers: logins, campaigns, identities, sends."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from gateway.providers.sandbox import SHAPES, SandboxState
from tests.harness import APIKEY, CAMPAIGNS, Running, sandbox_for_tests
from tests.ops_util import captured_with_context, sample
from tests.smtputil import message, send, session
from tests.spool_helpers import wait_for
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
