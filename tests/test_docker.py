"""The Docker image's files, without a Docker engine (none runs here; `docker compose config` needs the
compose plugin, absent too): what the Dockerfile bakes in cannot override a mounted configuration, the
image's own configuration is the one its HEALTHCHECK, EXPOSE and VOLUME assume, the build context holds
what the build copies and no secrets, and compose gives the drain the time it takes."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from gateway.cli import build_parser
from gateway.config import DeliverySettings, load_settings
from gateway.smtp.server import STORE_GRACE
from gateway.smtp.tls import write_self_signed
from tests.docs_blocks import doc_blocks
from tests.harness import Running

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instructions():
        if word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def copied() -> dict[str, str]:
    """COPY (from the build context, not --from a stage): destination -> source."""
    out = {}
    for word, rest in instructions():
        if word == "COPY" and not rest.startswith("--from"):
            *sources, dest = rest.split()
            for source in sources:
                out[dest if not dest.endswith("/") else dest + Path(source).name] = source
    return out


def test_the_image_sets_no_setting_a_mounted_config_could_not_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = image_env()
    assert [k for k in env if k.startswith("GATEWAY_") and k != "GATEWAY_CONFIG"] == []
    mounted = tmp_path / "gateway.toml"
    mounted.write_text(
        '[http]\naddress = "10.0.0.7"\nport = 9100\n[delivery]\nspool_path = "/data/queue.sqlite3"\n'
        '[log]\nformat = "console"\n'
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GATEWAY_CONFIG", str(mounted))  # the mount, at the image's config path
    settings = load_settings()
    assert (settings.http.address, settings.http.port) == ("10.0.0.7", 9100)
    assert settings.delivery.spool_path == Path("/data/queue.sqlite3")
    assert settings.log.format == "console"


def test_the_images_own_configuration_is_what_healthcheck_expose_and_volume_assume() -> None:
    config_path = image_env()["GATEWAY_CONFIG"]
    source = copied()[config_path]
    settings = load_settings(ROOT / source)
    args = dict(instructions())
    assert f"http://127.0.0.1:{settings.http.port}/healthz" in args["HEALTHCHECK"]
    assert settings.http.address == "0.0.0.0"
    exposed = {int(p) for p in args["EXPOSE"].split()}
    assert exposed == {lst.port for lst in settings.listeners} | {settings.http.port}
    volume = Path(yaml.safe_load(args["VOLUME"])[0])
    assert volume in settings.delivery.spool_path.parents
    assert settings.log.format == "json"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            verdict = not negate
    return verdict


def test_the_build_context_holds_what_the_build_copies_and_no_secrets() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    needed = [*copied().values(), "gateway/cli/__init__.py", "gateway/__init__.py"]
    assert [p for p in needed if _ignored(p, patterns)] == []
    for private in (
        ".git/config",
        ".venv/bin/python",
        "var/spool.sqlite3",
        "config/gateway.toml",
        "config/secrets.env",
        "config/tls/privkey.pem",
        "tests/conftest.py",
        "gateway/__pycache__/app.cpython-311.pyc",
    ):
        assert _ignored(private, patterns), private


def test_compose_gives_the_drain_its_time() -> None:
    compose = yaml.safe_load((ROOT / "config" / "docker-compose.yml").read_text())
    gateway = compose["services"]["gateway"]
    grace = re.fullmatch(r"(\d+)s", gateway["stop_grace_period"])
    assert grace is not None
    drain = build_parser().parse_args(["serve"]).drain_timeout
    assert gateway["stop_signal"] == "SIGTERM"
    delivery = DeliverySettings()  # a message past its final "." gets its reply first (budget, then storing it)
    assert int(grace[1]) > drain + delivery.inline_budget + STORE_GRACE + delivery.shutdown_timeout
    assert "./gateway.toml:/etc/smtp-gateway/gateway.toml:ro" in gateway["volumes"]


def test_the_pages_give_the_tls_key_to_the_images_uid() -> None:
    """A 0600 root key stops the container at start: Install and the compose file say which uid must read it
    (review firstcontact2 F7), and it is the Dockerfile's."""
    [uid] = re.findall(r"useradd [^\n]*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    docker = (ROOT / "docs" / "install.md").read_text().partition("## Docker")[2]
    compose = (ROOT / "config" / "docker-compose.yml").read_text()
    for text in (docker, compose):
        assert f"chgrp {uid} " in text and "chmod 0640" in text
    assert f"**The TLS key must be readable by uid {uid}**" in docker


def _healthcheck_command(instruction: str) -> str:
    """The Python code of a HEALTHCHECK's `CMD python -c "..."`."""
    found = re.search(r'CMD python -c "(.*)"\s*$', instruction)
    assert found, instruction
    return found[1]


def test_the_documented_https_healthcheck_passes_against_a_tls_endpoint(
    gateway_factory: Callable[..., Running], tmp_path: Path
) -> None:
    """With a certificate on the operator endpoint the image's HEALTHCHECK (plain HTTP) fails every time, and
    docs/install.md says so and gives the one that works (proxy3 F2): both run against such an endpoint."""
    cert, key = write_self_signed(tmp_path / "http-tls")
    gw = gateway_factory(http={"port": 0, "tls_cert_file": str(cert), "tls_key_file": str(key)})
    assert gw.app.operator is not None
    port = str(gw.app.operator.port)

    def probe(code: str) -> int:
        code = code.replace(":8080/", f":{port}/")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, check=False).returncode

    shipped = _healthcheck_command(dict(instructions())["HEALTHCHECK"])
    assert probe(shipped) != 0  # what the doc warns of
    (block,) = doc_blocks("test_the_documented_https_healthcheck_passes_against_a_tls_endpoint")
    documented = re.sub(r"\\\n", " ", block.text)
    assert "FROM smtp-gateway" in documented
    assert probe(_healthcheck_command(documented.splitlines()[-1])) == 0
