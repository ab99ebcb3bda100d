"""The fenced blocks of the documentation and the marks that say which test runs them.

A shell block (``console``, ``sh``, ``shell``, ``bash``, or any block with a ``$ `` prompt line) must be marked
on the line just before its fence:

    <!-- test: tests/test_docs.py::test_quickstart_output -->     run (or its output checked) by that test
    <!-- not run: needs a real DMDS account -->                    an example, with the reason it is not run

Any other block may carry a ``test:`` mark too (an output a test compares). A test named by a mark finds its
blocks with :func:`doc_blocks` and must call it in its own body, so a mark cannot point at a test that never
reads the block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHELL = frozenset({"console", "sh", "shell", "bash"})
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)[^\n]*$")
_MARK = re.compile(r"^\s*<!--\s*(?P<kind>test|not run):\s*(?P<text>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    lang: str
    text: str  # the content, the fence's indentation removed
    mark: str | None  # "test" or "not run"
    mark_text: str  # the tests named (comma-separated), or the reason

    @property
    def is_shell(self) -> bool:
        return self.lang in SHELL or any(line.startswith("$ ") for line in self.text.splitlines())

    @property
    def tests(self) -> list[str]:
        """The tests a ``test:`` mark names, as "tests/file.py::name"."""
        if self.mark != "test":
            return []
        return [t.strip() for t in self.mark_text.split(",") if t.strip()]

    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    """Every page a reader sees: the README, CONTRIBUTING and the docs site."""
    found = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [p for p in found if p.is_file()]


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence, lang = len(m["indent"]), m["fence"], m["lang"].lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence[0] * len(fence)):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1  # the closing fence
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = _MARK.match(prev)
        out.append(
            Block(
                page=str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
                line=start + 1,
                lang=lang,
                text="\n".join(body) + "\n",
                mark=mark["kind"] if mark else None,
                mark_text=mark["text"] if mark else "",
            )
        )
    return out


def all_blocks() -> list[Block]:
    return [b for page in pages() for b in blocks(page)]


def doc_blocks(test: str) -> list[Block]:
    """The blocks whose mark names ``test`` (its function name), in page order; at least one."""
    found = [b for b in all_blocks() if any(t.rpartition("::")[2] == test for t in b.tests)]
    assert found, f"no documentation block is marked <!-- test: ...::{test} -->"
    return found


def commands(block: Block) -> list[tuple[str, list[str]]]:
    """A block's commands with the output shown after each: ``$ `` lines in a console block (a line ending
    in a backslash continues the command), or every command of a sh block (no output shown)."""
    result: list[tuple[str, list[str]]] = []
    lines = block.text.splitlines()
    prompt = any(line.startswith("$ ") for line in lines)
    i = 0
    while i < len(lines):
        line = lines[i]
        if prompt and not line.startswith("$ "):
            if result:
                result[-1][1].append(line)
            i += 1
            continue
        command = line[2:] if prompt else line
        while command.endswith("\\") and i + 1 < len(lines):
            i += 1
            command = command[:-1].rstrip() + " " + lines[i].strip()
        i += 1
        command = re.sub(r"\s+#\s.*$", "", command).strip()  # a trailing comment
        if command and not command.startswith("#"):
            result.append((command, []))
    return result
