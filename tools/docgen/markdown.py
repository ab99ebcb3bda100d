"""Markdown building blocks of the generated pages: tables whose cells cannot break a row, and anchors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def cell(text: str) -> str:
    """Text for one table cell: on one line, its pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def code(text: str) -> str:
    """Inline code that may itself hold backticks."""
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def anchor(ident: str) -> str:
    """A stable link target inside a table cell (mkdocs checks links to it)."""
    return f'<a id="{ident}"></a>'


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def join_words(items: Sequence[str], last: str = "or") -> str:
    """`a`, `b` or `c`."""
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} {last} {items[-1]}"


def sentence(text: str) -> str:
    """`text` ending with a full stop (help texts are written without one)."""
    text = text.strip()
    return text if not text or text[-1] in ".!?" else text + "."
