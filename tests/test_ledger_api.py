"""The message API on the operator endpoint, through curl and httpx against the real gateway: off without
tokens (404 saying how to enable it), 401 without or with a wrong token, 200 with the right one, lookups
and paging, a batch's shared eeid (300), bad parameters (400), the per-IP lockout (429), HTTPS, and the
rule that refuses a plain-HTTP API on a non-loopback address."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from pydantic import ValidationError

from gateway.config import HttpSettings, load_settings
from gateway.config.reload import plan_reload
from gateway.ops.metrics import REGISTRY
from gateway.smtp.tls import write_self_signed
from tests.configs import hash_for_tests
from tests.docs_blocks import doc_blocks
from tests.harness import Running
from tests.spool_helpers import send

TOKEN = "api-token-for-the-tests"
TOKEN_HASH = hash_for_tests(TOKEN)
API = {"port": 0, "api_tokens": [{"name": "ci", "token_hash": TOKEN_HASH}]}


def base(gw: Running, scheme: str = "http") -> str:
    assert gw.app.operator is not None
    return f"{scheme}://127.0.0.1:{gw.app.operator.port}"


def flushed(gw: Running) -> None:
    assert gw.app.ledger_writer is not None
    gw.loop.run(gw.app.ledger_writer.flush())


def curl(*args: str) -> tuple[int, dict[str, str], Any]:
    """Status, headers (lower-case names) and JSON body of one curl request."""
    if shutil.which("curl") is None:
        pytest.skip("curl not installed (apt-get install curl)")
    out = subprocess.run(
        ["curl", "-sS", "-D", "-", *args], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    status_line, *lines = head.splitlines()
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, json.loads(body) if body.strip() else None


def bearer(token: str = TOKEN) -> list[str]:
    return ["-H", f"Authorization: Bearer {token}"]


def test_without_tokens_the_api_is_off_and_says_how_to_enable_it(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(http={"port": 0})
    status, _, body = curl(f"{base(gw)}/api/v1/messages", *bearer())
    assert status == 404 and body["error"] == "not_enabled" and "[[http.api_tokens]]" in body["message"]
    assert curl(f"{base(gw)}/api/v1/messages/ABCDEF0123456789")[0] == 404
    assert httpx.get(f"{base(gw)}/healthz").status_code == 200  # the rest of the endpoint is unaffected


def test_the_token_is_required_and_checked(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(http=API)
    url = f"{base(gw)}/api/v1/messages"
    status, headers, body = curl(url)
    assert status == 401 and headers["www-authenticate"] == 'Bearer realm="smtp-gateway"'
    assert headers["cache-control"] == "no-store"  # errors too
    assert body["error"] == "unauthorized"
    status, headers, body = curl(url, *bearer("not-the-token"))
    assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"]
    assert TOKEN not in json.dumps(body)
    status, _, body = curl(url, *bearer())
    assert status == 200 and body == {"messages": [], "next": None, "limit": 50, "filters": {}}
    assert curl(url, "-H", f"Authorization: Basic {TOKEN}")[0] == 401


def test_records_by_id_and_search_with_paging(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(http=API)
    replies = [send(gw.port(), f"Report {n}", to=("ops@example.net",))[1].rsplit(" ", 1)[1] for n in range(3)]
    flushed(gw)
    url = f"{base(gw)}/api/v1/messages"

    status, headers, record = curl(f"{url}/{replies[0]}", *bearer())
    assert status == 200
    assert headers["cache-control"] == "no-store"  # a record carries addresses and the subject
    assert record["reply_id"] == replies[0] and record["subject"] == "Report 0" and record["state"] == "sent"
    assert [e["kind"] for e in record["events"]] == ["accepted", "attempt"]
    assert record["request"][0]["body"]["contacto"] == {"email": "ops@example.net"}
    assert curl(f"{url}/{record['id']}", *bearer())[2] == record  # by the local id too
    assert curl(f"{url}/{record['id'].lower()}", *bearer())[2] == record
    status, _, body = curl(f"{url}/no-such-id", *bearer())
    assert status == 404 and body["error"] == "not_found"

    first = curl("-G", url, "--data-urlencode", "recipient=OPS@example.net", "-d", "limit=2", *bearer())[2]
    assert [m["subject"] for m in first["messages"]] == ["Report 2", "Report 1"]
    assert "events" not in first["messages"][0] and first["filters"] == {"recipient": "OPS@example.net"}
    second = curl(
        "-G", url, "-d", "recipient=ops@example.net", "-d", "limit=2", "-d", f"cursor={first['next']}", *bearer()
    )[2]
    assert [m["subject"] for m in second["messages"]] == ["Report 0"] and second["next"] is None
    assert [
        m["reply_id"] for m in curl("-G", url, "-d", "state=sent", "-d", "login=scanner", *bearer())[2]["messages"]
    ] == replies[::-1]
    assert curl("-G", url, "-d", "since=2999-01-01T00:00:00Z", *bearer())[2]["messages"] == []

    for bad, word in (
        ("limit=501", "limit"),
        ("state=lost", "state"),
        ("since=yesterday", "since"),
        ("since=nan", "since"),  # float() reads it: NaN selected nothing on SQLite, everything on PostgreSQL
        ("until=NaN", "until"),
        ("until=inf", "until"),
        ("since=-1e400", "since"),
        ("color=red", "color"),
        ("cursor=xyz", "cursor"),
    ):
        status, _, body = curl("-G", url, "-d", bad, *bearer())
        assert status == 400 and body["error"] == "bad_request" and word in body["message"], bad


def test_an_eeid_shared_by_a_batch_names_several_messages(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(http=API)
    eeid = send(gw.port(), "Batch part 1")[1].rsplit(" ", 1)[1]
    code, text = send(gw.port(), "Batch part 2", extra=f"X-Gateway-Batch: {eeid}\r\n")
    assert code == 250 and text.endswith(eeid)
    flushed(gw)
    status, _, body = curl(f"{base(gw)}/api/v1/messages/{eeid}", *bearer())
    assert status == 300 and body["error"] == "ambiguous"
    assert sorted(m["subject"] for m in body["messages"]) == ["Batch part 1", "Batch part 2"]
    found = curl("-G", f"{base(gw)}/api/v1/messages", "-d", f"upstream_id={eeid}", *bearer())[2]
    assert len(found["messages"]) == 2


def test_failed_tokens_lock_the_client_ip_out(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(http=API, limits={"auth_failures_per_ip": 2, "auth_lockout_failures": 2, "auth_delay_max": 0})
    url = f"{base(gw)}/api/v1/messages"
    assert [curl(url, *bearer("wrong"))[0] for _ in range(2)] == [401, 401]
    status, headers, body = curl(url, *bearer())  # even the right token, while locked out
    assert status == 429 and int(headers["retry-after"]) > 0 and body["error"] == "too_many_failures"


def test_a_locked_out_client_is_logged_once_a_minute_and_counted_each_time(
    gateway_factory: Callable[..., Running],
) -> None:
    """A locked-out request costs no hash: its warning line is sampled (one per address a minute, as SMTP's
    auth_locked_out), not one per 429; smtp_gateway_api_auth_total{result="locked_out"} counts each."""
    gw = gateway_factory(http=API, limits={"auth_failures_per_ip": 2, "auth_lockout_failures": 2, "auth_delay_max": 0})
    url = f"{base(gw)}/api/v1/messages"
    locked = REGISTRY.get_sample_value("smtp_gateway_api_auth_total", {"result": "locked_out"}) or 0.0
    with structlog.testing.capture_logs() as logs, httpx.Client(timeout=10) as client:
        statuses = [client.get(url, headers={"Authorization": f"Bearer wrong-{i}"}).status_code for i in range(22)]
    assert statuses == [401, 401] + [429] * 20
    lines = [e for e in logs if e["event"] == "api_auth_locked_out"]
    assert [(e["log_level"], e["suppressed"]) for e in lines] == [("warning", 0)]
    assert REGISTRY.get_sample_value("smtp_gateway_api_auth_total", {"result": "locked_out"}) == locked + 20


async def test_tokens_sent_together_are_limited_like_ones_sent_in_turn(
    gateway_factory: Callable[..., Running],
) -> None:
    """Attempts being checked count toward the lockout with the failures: a batch of wrong tokens sent at
    once gets no more of them checked than the lockout allows, and the right token after them is refused."""
    limits = {"auth_failures_per_ip": 1, "auth_lockout_failures": 3, "auth_delay_max": 1.0}
    gw = gateway_factory(http=API, limits=limits)
    url = f"{base(gw)}/api/v1/messages"
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None)) as http:

        async def attempt(token: str) -> int:
            return (await http.get(url, headers={"Authorization": f"Bearer {token}"})).status_code

        assert await attempt("wrong-0") == 401  # from now on each attempt first waits 1 s
        results = await asyncio.gather(*(attempt(f"wrong-{n}") for n in range(1, 25)))
        assert results.count(401) <= 2 and results.count(429) >= 22, sorted(results)
        assert await attempt(TOKEN) == 429


def test_the_endpoint_serves_https_with_its_own_certificate(
    gateway_factory: Callable[..., Running], tmp_path: Any
) -> None:
    cert, key = write_self_signed(tmp_path / "http-tls")
    gw = gateway_factory(http={**API, "tls_cert_file": str(cert), "tls_key_file": str(key)})
    status, _, body = curl("--cacert", str(cert), f"{base(gw, 'https')}/api/v1/messages", *bearer())
    assert status == 200 and body["messages"] == []
    assert subprocess.run(["curl", "-s", f"{base(gw)}/healthz"], capture_output=True, check=False).returncode != 0


def test_the_documented_token_recipe_makes_a_hash_the_api_takes(
    gateway_factory: Callable[..., Running], tmp_path: Any
) -> None:
    """docs/after-250.md, "Enabling it": a random token, its hash by `smtp-gateway hash-password`."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed (apt-get install openssl)")
    (block,) = doc_blocks("test_the_documented_token_recipe_makes_a_hash_the_api_takes")
    recipe = block.text.replace("smtp-gateway", str(Path(sys.executable).parent / "smtp-gateway")) + '\necho "$token"'
    out = subprocess.run(["sh", "-c", recipe], capture_output=True, text=True, timeout=60, check=True).stdout
    token_hash, token = out.split()
    gw = gateway_factory(http={"port": 0, "api_tokens": [{"name": "ops", "token_hash": token_hash}]})
    assert curl(f"{base(gw)}/api/v1/messages", *bearer(token))[0] == 200


def test_the_documented_curl_keeps_the_token_off_the_command_line(gateway_factory: Callable[..., Running]) -> None:
    """docs/after-250.md's way of sending the token with curl works, and no curl command in the docs has the
    token in its arguments (readable by every local user in `ps` while it runs)."""
    if shutil.which("curl") is None:
        pytest.skip("curl not installed (apt-get install curl)")
    gw = gateway_factory(http={"port": 0, "api_tokens": [{"name": "ops", "token_hash": TOKEN_HASH}]})
    (block,) = doc_blocks("test_the_documented_curl_keeps_the_token_off_the_command_line")
    script = block.text.replace("http://127.0.0.1:8080", base(gw))
    run = subprocess.run(
        ["sh", "-c", script],
        env={"PATH": os.environ["PATH"], "token": TOKEN},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and json.loads(run.stdout)["messages"] == [], run
    on_argv = re.compile(r"curl\b[^|\n]*(?:\$token|\$\{token\}|Bearer)")
    for page in Path("docs").rglob("*.md"):
        for line in page.read_text().splitlines():
            assert not on_argv.search(line), f"{page}: {line}"


def test_a_plain_http_api_on_a_public_address_is_refused() -> None:
    tokens = [{"name": "ci", "token_hash": TOKEN_HASH}]
    with pytest.raises(ValidationError, match="tls_cert_file"):
        HttpSettings(address="0.0.0.0", port=8080, api_tokens=tokens)  # type: ignore[arg-type]
    assert HttpSettings(address="0.0.0.0", port=8080, api_tokens=tokens, allow_api_without_tls=True)  # type: ignore[arg-type]
    assert HttpSettings(address="::1", port=8080, api_tokens=tokens)  # type: ignore[arg-type]
    assert HttpSettings(address="0.0.0.0", port=8080)  # no API: health and metrics only
    with pytest.raises(ValidationError, match="hash-password"):
        HttpSettings(api_tokens=[{"name": "ci", "token_hash": TOKEN}])  # type: ignore[list-item]


def test_tokens_reload_without_a_restart() -> None:
    old = load_settings(None, http={"port": 8080})
    new = load_settings(None, http={"port": 8080, "api_tokens": [{"name": "ci", "token_hash": TOKEN_HASH}]})
    plan = plan_reload(old, new)
    assert plan.changed == ["http.api_tokens"] and plan.restart_needed == []
    assert plan.settings.http.api_tokens == new.http.api_tokens
    moved = load_settings(None, http={"port": 9090, "api_tokens": [{"name": "ci", "token_hash": TOKEN_HASH}]})
    assert plan_reload(old, moved).restart_needed == ["http.port"]
    # [ledger] applies at once too (the writer and the recorder take the new values).
    quieter = load_settings(None, http={"port": 8080}, ledger={"enabled": False, "retention": 3600})
    plan = plan_reload(old, quieter)
    assert plan.changed == ["ledger"] and plan.restart_needed == [] and not plan.settings.ledger.enabled


def test_a_reload_turns_the_ledger_off_and_on(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(http=API)
    off = gw.settings.model_copy(update={"ledger": gw.settings.ledger.model_copy(update={"enabled": False})})
    gw.app.source = lambda: off
    assert gw.loop.run(gw.app.reload())
    send(gw.port(), "not recorded")
    on = gw.settings.model_copy(update={"ledger": gw.settings.ledger.model_copy(update={"keep_requests": False})})
    gw.app.source = lambda: on
    assert gw.loop.run(gw.app.reload())
    send(gw.port(), "recorded without its request")
    flushed(gw)
    found = curl("-G", f"{base(gw)}/api/v1/messages", *bearer())[2]["messages"]
    assert [m["subject"] for m in found] == ["recorded without its request"]
    assert curl(f"{base(gw)}/api/v1/messages/{found[0]['id']}", *bearer())[2]["request"] is None
