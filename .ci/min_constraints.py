"""Print pip constraints that pin every requirement in pyproject.toml to its declared lower bound.

CI installs the project a second time with these (`pip install -c`) and runs the test suite on them, so a
lower bound that does not work fails CI instead of a user's install.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

_REQ = re.compile(r"\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*(?P<spec>[^;]*?)\s*(?P<marker>;.*)?")


def constraints(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(extra)
    lines = []
    for req in reqs:
        m = _REQ.fullmatch(req)
        lower = re.search(r">=\s*([^,\s]+)", m["spec"]) if m else None
        if m is None or lower is None:
            raise SystemExit(f"{pyproject}: {req!r} has no lower bound (>=)")
        lines.append(f"{m['name']}=={lower.group(1)}{' ' + m['marker'] if m['marker'] else ''}")
    return lines


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    print("\n".join(constraints(root / "pyproject.toml")))
    sys.exit(0)
