"""The tests' gateway configuration, built in one place: a dict for `load_settings(None, **config)`, or a TOML
file (`write`) for a gateway in a subprocess. Every listener asks for any free port (0): a test reads the
ports the gateway bound from its `ready` event (tests/procs.py), never guesses one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.auth.passwords import hash_password
from gateway.smtp.tls import write_self_signed

APIKEY = "test-account-apikey"
USER, PASSWORD = "scanner", "scanner-password"
# The scrypt cost N of the tests' hashes. The gateway's default (2**14) costs 40-50 ms of CPU per verification,
# and nearly every test verifies one at AUTH (and the console's admin and API token hashes): at 2**10 (a
# sixteenth: 2-3 ms) the suite spends its CPU on what it tests. Tests about the cost itself (timing parity, the default
# parameters, `hash-password`'s output) hash at the default.
TEST_SCRYPT_N = 2**10


def hash_for_tests(password: str) -> str:
    """A hash of `password` at the tests' scrypt cost (TEST_SCRYPT_N; r and p the gateway's defaults)."""
    return hash_password(password, n=TEST_SCRYPT_N)


PASSWORD_HASH = hash_for_tests(PASSWORD)
# The discard port: nothing listens there, for configurations whose upstream is never called.
NO_UPSTREAM = 9


def listener(name: str = "plain", tls: str = "none", **keys: Any) -> dict[str, Any]:
    """A [[listeners]] entry on 127.0.0.1, any free port; plain ones allow AUTH without TLS (loopback)."""
    entry: dict[str, Any] = {"name": name, "address": "127.0.0.1", "port": 0, "tls": tls}
    if tls == "none":
        entry["allow_insecure_auth"] = True
    return {**entry, **keys}


def gateway_config(
    tmp: Path,
    upstream: int | str = NO_UPSTREAM,
    *,
    listeners: list[dict[str, Any]] | None = None,
    extra_users: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """The test account `acme` (DMDS, user USER with campaign 22) against the sandbox at `upstream` (a URL,
    or a port on 127.0.0.1),
    the queue in `tmp`, no sender-domain DNS checks. `listeners`: by default plain, STARTTLS and implicit
    TLS (a self-signed certificate is written for TLS ones). `extra_users`: [[accounts.acme.users]] added.

    `overrides` are top-level keys: a section's keys replace the base's one by one (`accounts` per
    account), a key given as None is removed (TOML has no null); anything else replaces the whole value."""
    if listeners is None:
        listeners = [listener("plain"), listener("starttls", "starttls"), listener("implicit", "implicit")]
    config: dict[str, Any] = {
        "hostname": "gw.test",
        "listeners": listeners,
        "accounts": {
            "acme": {
                "dmdsid": "acme",
                "api_base": upstream if isinstance(upstream, str) else f"http://127.0.0.1:{upstream}",
                "apikey": APIKEY,
                "sender_domains": {"acme.example": "dmds-acme@nl.acme.example"},
                "http_timeout": 5.0,
                # No delivery status notices unless a test asks (docs/after-250.md): a notice is a message too,
                # and would take the sandbox faults a test sets for its own messages.
                "dsn": {"notify": "off"},
                "users": [{"username": USER, "password_hash": PASSWORD_HASH, "campaign": 22}, *(extra_users or [])],
            }
        },
        "delivery": {"spool_path": str(tmp / "spool.sqlite3"), "inline_budget": 5.0},
        "dns": {"check_sender_domain": False},
    }
    if any(entry.get("tls", "starttls") != "none" for entry in listeners) and overrides.get("tls", {}) is not None:
        cert, key = write_self_signed(tmp / "tls")
        config["tls"] = {"cert_file": str(cert), "key_file": str(key)}
    for key_, value in overrides.items():
        if key_ == "accounts":
            config[key_] = {name: _merged(config[key_].get(name, {}), acct) for name, acct in value.items()}
        elif isinstance(value, dict) and isinstance(config.get(key_), dict):
            config[key_] = _merged(config[key_], value)
        elif value is None:
            config.pop(key_, None)
        else:
            config[key_] = value
    return config


def serve_config(tmp: Path, upstream: int | str = NO_UPSTREAM, **overrides: Any) -> dict[str, Any]:
    """For `smtp-gateway serve` in a subprocess: one plain listener and JSON logs (the tests read log events)."""
    overrides.setdefault("listeners", [listener("plain")])
    overrides["log"] = {"format": "json", **overrides.get("log", {})}
    return gateway_config(tmp, upstream, **overrides)


def write(path: Path, config: dict[str, Any]) -> Path:
    """`config` as a TOML file at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml(config))
    return path


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = {**base, **changes}
    return {k: v for k, v in out.items() if v is not None}


def toml(config: dict[str, Any]) -> str:
    """A config dict as a TOML file (tables, arrays of tables, inline tables in arrays)."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str | Path):
            return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{value(k)} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(type(v))

    def table(path: str, body: dict[str, Any]) -> None:
        scalars = {k: v for k, v in body.items() if not _is_table(v) and v is not None}  # TOML has no null
        for key, v in scalars.items():
            lines.append(f"{value(key)} = {value(v)}")
        for key, v in body.items():
            name = f"{path}.{value(key)}" if path else value(key)
            if isinstance(v, dict) and _is_table(v):
                lines.append(f"\n[{name}]")
                table(name, v)
            elif isinstance(v, list) and _is_table(v):
                for item in v:
                    lines.append(f"\n[[{name}]]")
                    table(name, item)

    table("", config)
    return "\n".join(lines) + "\n"


def _is_table(v: Any) -> bool:
    """Dicts of dicts/lists, or non-empty lists of dicts, become tables; small dicts inline."""
    if isinstance(v, list):
        return bool(v) and all(isinstance(x, dict) for x in v)
    return isinstance(v, dict) and not _inline(v)


def _inline(v: dict[str, Any]) -> bool:
    # Maps of plain values (sender_domains, login_aliases) are written inline; sections are tables.
    return all(isinstance(x, str) for x in v.values()) and all("@" in x or "." in k for k, x in v.items())
