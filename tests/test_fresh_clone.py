"""A fresh clone has no ../shared/corpus: the tests that read it are skipped with one line saying where it was
looked for and how to provide it (failed under CI=true, where it must be there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_corpus_tests(corpus: Path, ci: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["SMTP_GATEWAY_CORPUS"] = str(corpus)
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "corpus", "tests"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_without_the_corpus_its_tests_skip_with_one_line(tmp_path: Path) -> None:
    done = run_corpus_tests(tmp_path / "corpus", ci=False)
    assert done.returncode == 0, done.stdout + done.stderr
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 1, done.stdout
    assert f"not at {tmp_path / 'corpus'}" in skipped[0]
    assert "../shared/corpus" in skipped[0] and "SMTP_GATEWAY_CORPUS" in skipped[0]
    count = int(skipped[0].split("[", 1)[1].split("]", 1)[0])
    assert count >= 9  # every test marked corpus, and nothing else ran
    assert f"{count} skipped" in done.stdout and "passed" not in done.stdout and "failed" not in done.stdout


def test_under_ci_a_missing_corpus_fails(tmp_path: Path) -> None:
    done = run_corpus_tests(tmp_path / "corpus", ci=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "skipped" not in done.stdout
    assert f"the shared MIME test corpus is not at {tmp_path / 'corpus'}" in done.stdout


def test_ci_runs_the_minimum_versions_on_the_distributions_python_and_the_readme_command_last() -> None:
    text = (ROOT / ".ci" / "run").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[-1] == "./install.sh --test && .venv/bin/python -m pytest -q -n auto"
    # Two runs of the suite (CI stays under 15 minutes): the minimum versions, then the README's command.
    assert len([line for line in lines if "-m pytest" in line]) == 2
    [min_install] = [line for line in lines if "VENV=.venv-min" in line]
    assert min_install.startswith('PYTHON="$stock_python" ')
    # The choice itself, run as CI runs it: Debian's own python3 here (3.11+), else python3.
    start = text.index("stock_python=python3")
    choice = text[start : text.index("\nfi\n", start) + 4]
    chosen = subprocess.run(
        ["bash", "-euc", choice + 'echo "$stock_python"'], capture_output=True, text=True, check=True
    ).stdout.strip()
    stock = Path("/usr/bin/python3")
    usable = (
        stock.exists()
        and subprocess.run([str(stock), "-c", "import sys; sys.exit(sys.version_info < (3, 11))"]).returncode == 0
    )
    assert chosen == ("/usr/bin/python3" if usable else "python3")


def test_a_spawned_process_never_outlives_its_test() -> None:
    """What conftest does after every test, passed or failed: whatever it started and left running (here a
    process that would wait a minute) is killed."""
    from tests.procs import reap, spawn

    proc = spawn(["sleep", "60"])
    reap()
    assert proc.returncode == -9
