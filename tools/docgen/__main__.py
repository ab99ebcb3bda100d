"""`python -m tools.docgen`: write the reference pages; `--check`: only say which differ (exit 1), with diffs."""

from __future__ import annotations

import argparse
import sys

from tools.docgen import COMMAND, ROOT, generate, stale
from tools.docgen.logevents import ScanError
from tools.docgen.notes import NotesError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.docgen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is not current")
    args = parser.parse_args(argv)
    try:
        pages = generate()
    except (ScanError, NotesError) as exc:
        print(f"docgen: {exc}", file=sys.stderr)
        return 2
    differ = stale(pages)
    for path in differ:
        where = path.relative_to(ROOT)
        if args.check:
            print(differ[path], end="")
            print(f"docgen: {where} is not what the code says", file=sys.stderr)
        else:
            path.write_text(pages[path])
            print(f"docgen: wrote {where}", file=sys.stderr)
    if args.check and differ:
        print(f"docgen: run `{COMMAND}` and commit the pages", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
