"""Hand-written text merged into a generated page: tools/docgen/notes/<page>.md.

The text before the first `## ` heading is the page's introduction (any Markdown); each `## NAME` section is
the note on the item NAME (an event, a reply, a key: what the page's rows are named by), one paragraph, shown
in that item's row. A note on an item the code no longer has is an error, so notes cannot go stale silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

NOTES_DIR = Path(__file__).resolve().parent / "notes"
_HEADING = re.compile(r"^## +(?P<name>\S+) *$")
_LEADING_COMMENT = re.compile(r"\A\s*<!--.*?-->\s*", re.S)  # what the file is for: not merged


class NotesError(Exception):
    """A notes file that cannot be merged (a note on nothing, a note of several paragraphs)."""


@dataclass
class Notes:
    path: Path
    intro: str = ""
    items: dict[str, str] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)

    def item(self, name: str) -> str:
        """The note on `name` ("" when there is none)."""
        self.used.add(name)
        return self.items.get(name, "")

    def check_used(self) -> None:
        """Raise NotesError when a note names an item the page did not show."""
        stale = sorted(set(self.items) - self.used)
        if stale:
            raise NotesError(f"{self.path}: notes on items the code no longer has: {', '.join(stale)}")


def load(page: str, directory: Path = NOTES_DIR) -> Notes:
    path = directory / f"{page}.md"
    notes = Notes(path)
    if not path.is_file():
        return notes
    text = _LEADING_COMMENT.sub("", path.read_text(), count=1)
    current: str | None = None
    chunks: dict[str | None, list[str]] = {None: []}
    for line in text.splitlines():
        m = _HEADING.match(line)
        if m is not None:
            current = m["name"]
            if current in chunks:
                raise NotesError(f"{path}: two notes on {current}")
            chunks[current] = []
        else:
            chunks[current].append(line)
    notes.intro = "\n".join(chunks.pop(None)).strip()
    for name, lines in chunks.items():
        assert name is not None
        body = "\n".join(lines).strip()
        if "\n\n" in body:
            raise NotesError(f"{path}: the note on {name} has several paragraphs (a table row holds one)")
        notes.items[name] = " ".join(body.split())
    return notes
