"""A spool written before provider data was typed keeps working: its records (each provider's login and
message data as JSON, some logins with only the keys that applied to them) are delivered by the retry
worker with the same campaign, archive flag, batch and tags."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.core.model import Message, Principal, Submission
from gateway.core.records import CallRow, Decision
from gateway.providers.dengage.data import DengageLogin, DengageParams
from gateway.providers.dmds.data import DmdsLogin, DmdsParams
from gateway.queue import codec
from gateway.queue.sqlite import SqliteQueue
from gateway.queue.store import NewMessage
from tests.harness import Running
from tests.ops_util import sample as metric
from tests.spool_helpers import spool_rows, wait_for

# Records exactly as the previous version's codec wrote them (version 2, data as plain JSON objects).
DMDS_USER = (
    b'{"v":2,"principal":{"account":"acme","login":"scanner","allowed_senders":["@acme.example"],"default_from":null,'
    b'"force_from":false,"extra":{"campaign":22,"campaign_from_subject":false,"may_choose_campaign":false}},'
    b'"mail_from":"billing@acme.example","rcpt_tos":["ann@example.com"],"message":{"subject":"old user",'
    b'"from":["billing@acme.example","Billing"],"sender":null,"reply_to":null,"to":[["ann@example.com",""]],"cc":[],'
    b'"html":"<p>old user</p>","text":"old user","attachments":[],"options":{},"message_id":"<old-user@old>",'
    b'"x_headers":[]},"params":{"campaign":22,"archive":true,"batch":null}}'
)
# An SMTP-API login stored only its campaign; the client had named a batch to join.
DMDS_API_LOGIN = (
    b'{"v":2,"principal":{"account":"acme","login":"acme-23","allowed_senders":[],"default_from":null,'
    b'"force_from":false,"extra":{"campaign":23}},"mail_from":"billing@acme.example","rcpt_tos":["bob@example.com"],'
    b'"message":{"subject":"old api login","from":["billing@acme.example","Billing"],"sender":null,"reply_to":null,'
    b'"to":[["bob@example.com",""]],"cc":[],"html":"<p>old api login</p>","text":"old api login","attachments":[],'
    b'"options":{},"message_id":"<old-api-login@old>","x_headers":[]},'
    b'"params":{"campaign":23,"archive":false,"batch":"eeid-old-batch"}}'
)
# A message with a Reply-To to two contacts: one send_many_inline call, as planned before such messages got
# one send_one call per contact; DMDS documents reply-to for send_one calls only, so it is not sent (counted).
DMDS_REPLY_TO = (
    b'{"v":2,"principal":{"account":"acme","login":"scanner","allowed_senders":[],"default_from":null,'
    b'"force_from":false,"extra":{"campaign":22}},"mail_from":"billing@acme.example",'
    b'"rcpt_tos":["ann@example.com","dee@example.com"],"message":{"subject":"old reply-to",'
    b'"from":["billing@acme.example","Billing"],"sender":null,"reply_to":["support@acme.example",""],'
    b'"to":[["ann@example.com",""],["dee@example.com",""]],"cc":[],"html":"<p>old</p>","text":"old",'
    b'"attachments":[],"options":{},"message_id":"<old-reply-to@old>","x_headers":[]},'
    b'"params":{"campaign":22,"archive":false,"batch":null}}'
)
DENGAGE = (
    b'{"v":2,"principal":{"account":"crm","login":"erp","allowed_senders":[],"default_from":null,"force_from":false,'
    b'"extra":{"tags":["erp"]}},"mail_from":"billing@crm.example","rcpt_tos":["cy@example.com"],"message":{'
    b'"subject":"old dengage","from":["billing@crm.example","Billing"],"sender":null,"reply_to":null,'
    b'"to":[["cy@example.com",""]],"cc":[],"html":"<p>old dengage</p>","text":"old dengage","attachments":[],'
    b'"options":{},"message_id":"<old-dengage@old>","x_headers":[]},'
    b'"params":{"tags":["crm","erp"],"template":null,"ref":"5f1d0c0e2b7a4c1e9d3f6a8b0c2e4f60"}}'
)
# id -> (account, record, the call its provider plans: key and recipients)
OLD = {
    "OLDDMDSUSER00001": ("acme", DMDS_USER, CallRow("0", "ann@example.com")),
    "OLDDMDSAPI000001": ("acme", DMDS_API_LOGIN, CallRow("0", "bob@example.com")),
    "OLDDMDSREPLYTO01": ("acme", DMDS_REPLY_TO, CallRow("0", "ann@example.com,dee@example.com")),
    "OLDDENGAGE000001": ("crm", DENGAGE, CallRow("cy@example.com", "cy@example.com")),
}
MSG = Message("s", None, None, None, (), (), "<p>x</p>", "x")
FAST = {"retry_schedule": [0.3], "retry_jitter": 0.0, "poll_interval": 0.2}


async def _write_spool(path: Path) -> None:
    """The spool as the previous version left it: each message queued after a failed first attempt."""
    store = SqliteQueue(path)
    await store.open()
    now = time.time()
    try:
        for msg_id, (account, record, call) in OLD.items():
            decision = Decision("queued", {call.key: call}, 1, now, "HTTP 503 (upstream unavailable)")
            await store.insert(
                NewMessage(msg_id, account, "old@sender", "old", record, decision, created=now, expires=now + 3600)
            )
    finally:
        await store.close()


def test_records_of_the_previous_version_are_delivered(gateway_factory: Callable[..., Running], tmp_path: Path) -> None:
    spool = tmp_path / "old-spool.sqlite3"
    asyncio.run(_write_spool(spool))
    dropped = metric("smtp_gateway_fields_not_sent_total", account="acme", field="reply_to")
    gw = gateway_factory(accounts={"acme": {}}, dengage={}, delivery={**FAST, "spool_path": str(spool)})
    wait_for(lambda: spool_rows(spool) == [] or None, what="the old records delivered")
    dmds = {r["body"]["asunto"]: r["body"] for r in gw.sent if r["provider"] == "dmds"}
    assert (dmds["old user"]["campana_id"], dmds["old user"].get("archive")) == (22, True)
    assert "eeid" not in dmds["old user"]
    api = dmds["old api login"]
    assert (api["campana_id"], api.get("archive"), api["reuse_eeid"], api["eeid"]) == (23, None, True, "eeid-old-batch")
    reply_to = dmds["old reply-to"]
    assert [c["email"] for c in reply_to["contactos"]] == ["ann@example.com", "dee@example.com"]
    assert "reply-to" not in reply_to
    assert metric("smtp_gateway_fields_not_sent_total", account="acme", field="reply_to") == dropped + 1
    [dengage] = gw.calls("send", "dengage", status=200)
    assert dengage["to"] == "cy@example.com" and dengage["body"]["tags"] == ["crm", "erp"]


def test_provider_data_reads_back_what_the_queue_stored() -> None:
    """Each provider's data comes back from the queue's JSON as it went in; a provider given another
    provider's data (a bug) is told so."""
    values = (
        DmdsLogin(campaign=22, may_choose_campaign=True),
        DmdsParams(campaign=23, archive=True, batch="eeid-1"),
        DengageLogin(tags=("erp",)),
        DengageParams(tags=("crm", "erp"), template="2206f32b-8d1a-4058-929c-de600493862a", ref="r" * 32),
    )
    for value in values:
        stored = codec.decode(
            *codec.encode(Submission(Principal("a", "l", extra=value), "f@x.example", (), MSG, value))
        )
        assert type(value).read(stored.principal.extra) == value
        assert type(value).read(stored.params) == value
    with pytest.raises(TypeError, match="DengageLogin given where DmdsLogin was expected"):
        DmdsLogin.read(DengageLogin())
