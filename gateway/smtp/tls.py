"""TLS material: server contexts for Mozilla's three profiles, and self-signed certificates for tests."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import structlog

from gateway.smtp import tickets

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

log = structlog.get_logger("gateway.smtp")
Profile = Literal["modern", "intermediate", "legacy"]


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    minimum: ssl.TLSVersion
    # OpenSSL cipher string for TLS 1.2 and below (TLS 1.3 suites are all AEAD and stay OpenSSL's defaults).
    ciphers: str
    server_preference: bool


# Mozilla Server Side TLS guidelines 5.7 (https://ssl-config.mozilla.org/guidelines/5.7.json), adapted:
# modern = TLS 1.3 only, client's cipher order.
# intermediate = TLS 1.2 + 1.3, client's order, ECDHE with AEAD suites (AES-GCM, ChaCha20-Poly1305) only: no
#   CBC suite, so nothing for LUCKY13-style padding oracles (testssl.sh's finding on the old setting).
# legacy = Mozilla's "old": TLS 1.0 - 1.3, server's order (strongest first), adding the ECDHE CBC suites and
#   the RSA key-exchange suites old printers use (those need an RSA certificate: tls.extra_cert_file).
#   OpenSSL 3 refuses TLS 1.0/1.1 handshakes (SHA-1 signatures) above security level 0, hence @SECLEVEL=0.
#   DES-CBC3-SHA is used only where the system's OpenSSL still provides it (Debian 12's does not).
# Mozilla's DHE-RSA suites are left out everywhere: Python's ssl loads no DH parameters, so OpenSSL would
# never choose them, and a client that can do TLS 1.2 with AEAD also does ECDHE.
_AEAD = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
PROFILES: dict[Profile, ProfileSpec] = {
    "modern": ProfileSpec(ssl.TLSVersion.TLSv1_3, _AEAD, server_preference=False),
    "intermediate": ProfileSpec(ssl.TLSVersion.TLSv1_2, _AEAD, server_preference=False),
    "legacy": ProfileSpec(
        ssl.TLSVersion.TLSv1,
        _AEAD + ":ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA:"
        "ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES256-SHA384:ECDHE-ECDSA-AES256-SHA:"
        "ECDHE-RSA-AES256-SHA:AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA256:AES256-SHA256:AES128-SHA:"
        "AES256-SHA:DES-CBC3-SHA:@SECLEVEL=0",
        server_preference=True,
    ),
}


class CertificateError(Exception):
    """A certificate or key file cannot be loaded (missing, unreadable, not PEM, key does not match)."""


def server_context(profile: Profile, chains: list[tuple[Path, Path]], keys: Sequence[str] = ()) -> ssl.SSLContext:
    """A fresh server-side SSLContext for `profile` holding every (cert_file, key_file) pair of `chains`.

    Several pairs of different key types (RSA and ECDSA) coexist; OpenSSL picks what the client supports.
    `keys`: each pair's settings keys, named in the CertificateError of a pair that does not load.
    """
    spec = PROFILES[profile]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        # Python deprecates TLSVersion.TLSv1 as a value; enabling it is exactly what "legacy" is for.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = spec.minimum
    context.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    context.set_ciphers(spec.ciphers)
    if spec.server_preference:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    # No renegotiation (a CPU sink for clients that ask for it over and over) and no TLS compression (CRIME).
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    # TLS 1.3: one session ticket after a handshake, not OpenSSL's two: a client resumes with one, and each
    # ticket costs its encryption and a record on every new connection.
    context.num_tickets = 1
    for i, (cert_file, key_file) in enumerate(chains):
        try:
            context.load_cert_chain(str(cert_file), str(key_file))
        except (OSError, ssl.SSLError) as exc:
            key = f"{keys[i]} " if i < len(keys) else ""
            raise CertificateError(f"{key}{cert_file} / {key_file}: {exc}") from None
    tickets.apply(context, profile)  # workers of `serve --workers N` read each other's session tickets
    return context


def describe_certificate(cert_file: Path) -> dict[str, str]:
    """Subject, expiry and SHA-256 fingerprint of the first certificate in a PEM file, for the logs."""
    # cryptography (~10 MiB) is loaded by processes with a TLS listener, not by every process.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return {
        "subject": cert.subject.rfc4514_string(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
    }


# How far a certificate's notBefore may be ahead of this machine's clock and still be served: a CA that does not
# backdate, and a deploy hook that reloads at once on a host a second or a minute behind, would otherwise have
# the new certificate refused (a reload keeps the old one until the next). The gateway's own self-signed one is
# backdated as much. Clients with the right time accept it; one a few minutes behind refuses it either way.
NOT_BEFORE_SLACK = datetime.timedelta(minutes=5)


def validity(cert_file: Path) -> tuple[datetime.datetime, datetime.datetime]:
    """When the first certificate of a PEM file begins and ends being valid (UTC). Raises ValueError."""
    from cryptography import x509  # (see describe_certificate)

    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def write_self_signed(
    directory: Path, hostname: str = "localhost", key_type: Literal["ec", "rsa"] = "ec"
) -> tuple[Path, Path]:
    """Create (or reuse) cert.pem/key.pem in `directory` for `hostname`, localhost and 127.0.0.1."""
    from cryptography import x509  # (see describe_certificate)
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if cert_path.exists() and key_path.exists():
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            # A reused private key others on the machine can read (made by hand, or copied): reused all the
            # same, as the operator's file; `chmod 600` it.
            log.warning("tls_key_readable", path=str(key_path), mode=f"{mode:04o}")
        return cert_path, key_path
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        ec.generate_private_key(ec.SECP256R1())
        if key_type == "ec"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [x509.DNSName(hostname), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_private(
        key_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _write_private(path: Path, data: bytes) -> None:
    """Write `path` readable by its owner only from its first byte: created 0600 (whatever the umask), and an
    existing file made 0600 before it is written (not written with the umask's mode and chmodded after)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)
        f.write(data)
