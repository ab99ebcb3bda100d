"""What each TLS profile accepts, proved with real handshakes from Python's ssl (the fast counterpart of the
testssl.sh runs in docs/devices.md): protocol versions per profile, the TLS 1.2 suites `intermediate` offers
(AEAD only, no CBC), and the old suites `legacy` adds for printers."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.smtp.tls import write_self_signed
from tests.configs import listener
from tests.devices_util import captured_logs, events
from tests.harness import Running
from tests.spool_helpers import wait_for

VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
ACCEPTED = {
    "modern": {"TLSv1.3"},
    "intermediate": {"TLSv1.2", "TLSv1.3"},
    "legacy": {"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"},
}
INTERMEDIATE_TLS12 = {
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
}


def client_context(version: str | None = None, ciphers: str = "ALL:@SECLEVEL=0") -> ssl.SSLContext:
    """A client as permissive as an old device: any version, any suite OpenSSL still knows."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1/1.1: that is the point
        context.minimum_version = VERSIONS[version] if version else ssl.TLSVersion.TLSv1
        context.maximum_version = VERSIONS[version] if version else ssl.TLSVersion.TLSv1_3
    context.set_ciphers(ciphers)
    return context


def handshake(port: int, context: ssl.SSLContext) -> tuple[str, str] | None:
    """(protocol, suite) the server agreed to, or None if it refused the handshake."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            with context.wrap_socket(sock) as tls:
                version, cipher = tls.version(), tls.cipher()
                assert version is not None and cipher is not None
                return version, cipher[0]
        except (ssl.SSLError, ConnectionResetError):
            return None


def tls12_suites(aead: bool) -> list[str]:
    """Every TLS 1.2-and-below suite this OpenSSL can offer, AEAD or not."""
    return [c["name"] for c in client_context().get_ciphers() if c["protocol"] != "TLSv1.3" and c["aead"] == aead]


@pytest.fixture
def profiles(gateway_factory: Callable[..., Running], tmp_path: Path) -> Running:
    """One implicit-TLS listener per profile, with an ECDSA certificate and an RSA one beside it."""
    rsa_cert, rsa_key = write_self_signed(tmp_path / "rsa", key_type="rsa")
    return gateway_factory(
        tls={"extra_cert_file": str(rsa_cert), "extra_key_file": str(rsa_key)},
        listeners=[listener(p, "implicit", tls_profile=p) for p in ACCEPTED]
        + [listener("legacy-starttls", "starttls", tls_profile="legacy")],
    )


@pytest.mark.parametrize("profile", list(ACCEPTED))
def test_protocol_versions_per_profile(profiles: Running, profile: str) -> None:
    accepted = {v for v in VERSIONS if handshake(profiles.port(profile), client_context(v)) is not None}
    assert accepted == ACCEPTED[profile]


def test_intermediate_offers_no_cbc_or_other_non_aead_suite(profiles: Running) -> None:
    non_aead = tls12_suites(aead=False)
    assert any("-SHA" in s and "CBC" not in s for s in non_aead)  # the client really offers CBC suites
    offer_all = client_context("TLSv1.2", ":".join(non_aead) + ":@SECLEVEL=0")
    assert handshake(profiles.port("intermediate"), offer_all) is None
    # The same offer is taken by the legacy listener: the refusal above is the profile's doing.
    assert handshake(profiles.port("legacy"), offer_all) is not None


def test_intermediate_tls12_suites_are_exactly_the_ecdhe_aead_ones(profiles: Running) -> None:
    accepted = set()
    for suite in tls12_suites(aead=True):
        agreed = handshake(profiles.port("intermediate"), client_context("TLSv1.2", suite + ":@SECLEVEL=0"))
        if agreed is not None:
            accepted.add(agreed[1])
    assert accepted == INTERMEDIATE_TLS12


@pytest.mark.parametrize(
    "suite",
    ["ECDHE-ECDSA-AES128-SHA", "ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES256-SHA", "AES128-SHA", "AES256-SHA"],
)
def test_legacy_takes_the_old_suites_over_tls1(profiles: Running, suite: str) -> None:
    agreed = handshake(profiles.port("legacy"), client_context("TLSv1", suite + ":@SECLEVEL=0"))
    assert agreed == ("TLSv1", suite)


def test_legacy_prefers_the_strongest_suite(profiles: Running) -> None:
    """Server order: a device offering everything gets an ECDHE AEAD suite, not the first one it lists."""
    weakest_first = client_context("TLSv1.2", "DES-CBC3-SHA:AES128-SHA:ECDHE-RSA-AES128-GCM-SHA256:@SECLEVEL=0")
    assert handshake(profiles.port("legacy"), weakest_first) == ("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256")


def test_rsa_only_device_needs_the_rsa_certificate(gateway_factory: Callable[..., Running]) -> None:
    """With only the ECDSA certificate, a device limited to RSA key exchange has no suite in common."""
    running = gateway_factory(listeners=[listener("legacy", "implicit", tls_profile="legacy")])
    assert handshake(running.port("legacy"), client_context("TLSv1", "AES128-SHA:@SECLEVEL=0")) is None
    assert handshake(running.port("legacy"), client_context("TLSv1", "ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0"))


@pytest.mark.parametrize(
    ("ciphers", "advice", "not_advised"),
    [
        # Every suite it offers is in intermediate: the RSA certificate is all it needs, not legacy's
        # TLS 1.0/1.1, CBC and @SECLEVEL=0.
        ("ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384", "tls.extra_cert_file", "legacy"),
        # RSA key exchange only: legacy, and the RSA certificate.
        ("AES128-SHA:AES128-GCM-SHA256:@SECLEVEL=0", 'tls_profile = "legacy" and an RSA certificate', None),
        # ECDSA CBC only: legacy; the ECDSA certificate it has does.
        ("ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0", 'tls_profile = "legacy"', "extra_cert_file"),
    ],
    ids=["ecdhe-rsa", "static-rsa", "ecdsa-cbc"],
)
def test_the_no_shared_cipher_hint_names_legacy_only_where_the_offer_needs_it(
    gateway_factory: Callable[..., Running], ciphers: str, advice: str, not_advised: str | None
) -> None:
    """An intermediate listener with only the ECDSA certificate, and a TLS 1.2 client with these suites."""
    running = gateway_factory(listeners=[listener("implicit", "implicit")])
    with captured_logs() as logs:
        assert handshake(running.port("implicit"), client_context("TLSv1.2", ciphers)) is None
        wait_for(lambda: events(logs, "tls_handshake_failed"), 10, "the failure line")
    [line] = events(logs, "tls_handshake_failed")
    assert line["reason"] == "NO_SHARED_CIPHER" and line["profile"] == "intermediate"
    assert advice in line["hint"], line["hint"]
    assert not_advised is None or not_advised not in line["hint"], line["hint"]


def test_each_listener_has_its_own_context(profiles: Running) -> None:
    listeners = profiles.app.listeners
    assert listeners is not None
    contexts = {name: tls.context for name, tls in listeners.tls.items()}
    assert len({id(c) for c in contexts.values()}) == len(contexts) == 4
    assert contexts["modern"].minimum_version == ssl.TLSVersion.TLSv1_3
    assert contexts["intermediate"].minimum_version == ssl.TLSVersion.TLSv1_2
    assert contexts["legacy"].minimum_version == ssl.TLSVersion.TLSv1


def test_the_quick_start_key_is_private_from_its_creation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Created 0600, not written with the umask's mode and chmodded afterwards: with no chmod at all (the
    # process killed in between), the key is still the owner's only.
    monkeypatch.setattr(Path, "chmod", lambda self, mode: None)
    old = os.umask(0)
    try:
        _, key = write_self_signed(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_a_reused_key_others_can_read_is_warned_of(tmp_path: Path) -> None:
    _, key = write_self_signed(tmp_path)
    with captured_logs() as logs:
        write_self_signed(tmp_path)  # private: reused silently
        key.chmod(0o644)
        assert write_self_signed(tmp_path)[1] == key  # reused all the same, and said so
    [warned] = events(logs, "tls_key_readable")
    assert (warned["log_level"], warned["path"], warned["mode"]) == ("warning", str(key), "0644")
