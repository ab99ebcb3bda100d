"""A certificate out of its validity period at a reload, and the certificates' expiry as a metric.

`serve` refuses to start with a tls.cert_file that has expired or is not valid yet
(gateway/config/preflight.py); a SIGHUP reload that took one would only defer that failure to the next restart,
so the reload is refused like a certificate that does not load: the listeners keep the certificate they have,
tls_reload_failed says why, and the reload counter counts tls_failed.
smtp_gateway_tls_certificate_expiry_timestamp_seconds{listener} lets an alert fire before the certificate
expires."""

from __future__ import annotations

import datetime
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.config import Settings, load_settings, preflight
from gateway.ops.metrics import TLS_CERTIFICATE_EXPIRY
from tests.configs import gateway_config, listener, write
from tests.devices_util import captured_logs, events
from tests.harness import Running
from tests.ops_util import sample
from tests.test_config_refusals import refused

EXPIRY = "smtp_gateway_tls_certificate_expiry_timestamp_seconds"
RELOADS = "smtp_gateway_config_reloads_total"


def _write_pair(cert_file: Path, key_file: Path, begins: datetime.timedelta, ends: datetime.timedelta) -> float:
    """A self-signed pair over the gateway's files, valid from now+begins to now+ends; its expiry (Unix time)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + begins)
        .not_valid_after(now + ends)
        .sign(key, hashes.SHA256())
    )
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return (now + ends).timestamp()


def _served_expiry(gw: Running) -> float:
    """The expiry of the certificate the implicit-TLS listener serves to a new client."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", gw.port("implicit"))) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()


def _reload(gw: Running, with_config: bool) -> bool:
    if with_config:
        config = gateway_config(gw.tmp, gw.sandbox.port)

        def source() -> Settings:
            return load_settings(None, **config)

        gw.app.source = source
    else:
        gw.app.source = None  # no configuration file: a reload loads the certificates only
    return gw.loop.run(gw.app.reload())


@pytest.mark.parametrize("with_config", [True, False], ids=["reload", "certificates-only"])
@pytest.mark.parametrize(
    "window, said",
    [
        ((datetime.timedelta(days=-400), datetime.timedelta(days=-2)), "expired on"),
        ((datetime.timedelta(days=2), datetime.timedelta(days=400)), "not valid before"),
    ],
    ids=["expired", "not-yet-valid"],
)
def test_a_reload_onto_a_certificate_out_of_its_validity_is_refused(
    gateway: Running, with_config: bool, window: tuple[datetime.timedelta, datetime.timedelta], said: str
) -> None:
    tls = gateway.app.settings.tls
    assert tls.cert_file and tls.key_file
    served = _served_expiry(gateway)
    assert sample(EXPIRY, listener="implicit") == served  # set at start
    _write_pair(tls.cert_file, tls.key_file, *window)
    # What `serve` says of it: a problem, the gateway does not start (a not-yet-valid one started: review cli2).
    assert any(said in f.text and f.problem for f in preflight.files(gateway.app.settings))
    refused = sample(RELOADS, result="tls_failed")
    with captured_logs() as logs:
        assert not _reload(gateway, with_config)
    [failed] = events(logs, "tls_reload_failed")
    assert said in failed["reason"] and str(tls.cert_file) in failed["reason"]
    assert not events(logs, "tls_reloaded")
    assert sample(RELOADS, result="tls_failed") == refused + 1
    # The listeners kept the certificate they had, and the gauge says so.
    assert _served_expiry(gateway) == served
    assert sample(EXPIRY, listener="implicit") == served


def test_a_renewed_certificate_sets_the_expiry_gauge_at_reload(gateway: Running) -> None:
    tls = gateway.app.settings.tls
    assert tls.cert_file and tls.key_file
    renewed = _write_pair(tls.cert_file, tls.key_file, datetime.timedelta(days=-1), datetime.timedelta(days=90))
    assert _reload(gateway, with_config=True)
    assert _served_expiry(gateway) == renewed
    for name in ("starttls", "implicit"):
        assert sample(EXPIRY, listener=name) == renewed
    sooner = _write_pair(tls.cert_file, tls.key_file, datetime.timedelta(days=-1), datetime.timedelta(days=10))
    assert _reload(gateway, with_config=False)
    assert sample(EXPIRY, listener="implicit") == sooner
    listeners = {s.labels["listener"] for metric in TLS_CERTIFICATE_EXPIRY.collect() for s in metric.samples}
    assert "plain" not in listeners  # no certificate there


def test_a_certificate_valid_from_a_minute_ahead_is_taken(gateway: Running) -> None:
    """A CA that does not backdate, and a deploy hook that reloads at once on a host a minute behind: the new
    certificate is served (NOT_BEFORE_SLACK), at reload and by the start-up check, not refused until the next
    reload."""
    tls = gateway.app.settings.tls
    assert tls.cert_file and tls.key_file
    renewed = _write_pair(tls.cert_file, tls.key_file, datetime.timedelta(minutes=1), datetime.timedelta(days=90))
    assert not [f for f in preflight.files(gateway.app.settings) if f.problem]
    assert _reload(gateway, with_config=True)
    assert _served_expiry(gateway) == renewed


def test_a_certificate_not_valid_yet_is_refused_at_start(tmp_path: Path) -> None:
    """check-config and serve refused only an expired certificate: one whose notBefore is still to come started,
    and every client refused it (while a reload refused it, the test above)."""
    config = gateway_config(tmp_path, listeners=[listener("implicit", "implicit")])
    cert = Path(config["tls"]["cert_file"])
    _write_pair(cert, Path(config["tls"]["key_file"]), datetime.timedelta(days=2), datetime.timedelta(days=400))
    begins = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_before_utc
    path = write(tmp_path / "gateway.toml", config)
    refused(
        tmp_path,
        path,
        1,
        f"tls.cert_file {cert} is not valid before {begins:%Y-%m-%d %H:%M} UTC (its notBefore): check the "
        "machine's clock or the certificate",
    )
