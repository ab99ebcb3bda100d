"""The wheel a user installs with pip: its metadata (licence, classifiers, project URLs) and the example
configuration inside it, which `smtp-gateway example-config` prints."""

from __future__ import annotations

import email.parser
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.test_first_contact import _env

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "example.toml"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [built] = out.glob("smtp_gateway-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_ships_the_example_configuration(wheel: zipfile.ZipFile) -> None:
    assert wheel.read("gateway/examples/example.toml") == EXAMPLE.read_bytes()
    assert "gateway/py.typed" in wheel.namelist()


def test_the_wheel_metadata(wheel: zipfile.ZipFile) -> None:
    [name] = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    meta = email.parser.Parser().parsestr(wheel.read(name).decode())
    classifiers = meta.get_all("Classifier") or []
    assert "License :: OSI Approved :: MIT License" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert "Topic :: Communications :: Email :: Mail Transport Agents" in classifiers
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert set(urls) == {"Repository", "Documentation", "Issues"}
    # The address is a placeholder until the repository's public home is settled; the docs say so.
    assert urls["Repository"] in (ROOT / "docs" / "install.md").read_text()
    assert meta["Requires-Python"] == ">=3.11"
    assert [n for n in wheel.namelist() if n.endswith("LICENSE")] != []
    assert sorted(p.name for p in ROOT.glob("LICEN[CS]E*")) == ["LICENSE"]  # one licence file


def test_example_config_prints_it_and_it_is_a_valid_configuration(tmp_path: Path) -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "gateway", "example-config"], env=_env(), capture_output=True, text=True, check=True
    )
    assert printed.stdout == EXAMPLE.read_text()
    path = tmp_path / "gateway.toml"
    path.write_text(printed.stdout)
    checked = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config-only", "-c", str(path)],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr.endswith("configuration OK\n")
