"""docs/reference/replies.md: the reply table of gateway/core/replies.py (each entry's docstring says when it
is sent), the enhanced codes given to the SMTP library's own replies, and links into Troubleshooting."""

from __future__ import annotations

import ast
import inspect
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.core import replies
from gateway.core.replies import Reply
from tools.docgen.markdown import anchor, code, sentence, table
from tools.docgen.notes import Notes

ROOT = Path(__file__).resolve().parents[2]
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
TITLE = "SMTP replies"
GROUPS = (
    (2, "Success (2xx)", "success"),
    (4, "Temporary failures (4xx)", "temporary"),
    (5, "Permanent failures (5xx)", "permanent"),
)


class _Placeholder:
    """Stands for an argument of a reply built per use (`queued(queue_id)`): shown as `<queue_id>`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return f"<{self.name}>"

    def __format__(self, spec: str) -> str:
        return str(self)


@dataclass(frozen=True)
class Entry:
    name: str  # AUTH_INVALID, or queued() for a reply built per use
    reply: Reply
    doc: str

    @property
    def ident(self) -> str:
        """The row's anchor: the constant's name in lower case with hyphens (auth-invalid, queued)."""
        return self.name.rstrip("()").lower().replace("_", "-")


def entries() -> list[Entry]:
    """Every entry of the reply table in the module's order: its constants and the functions that build a
    Reply per use, each with its docstring ("" when it has none)."""
    source = inspect.getsource(replies)
    body = ast.parse(source).body
    found = []
    for i, node in enumerate(body):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            value = getattr(replies, name, None)
            if isinstance(value, Reply):
                after = body[i + 1] if i + 1 < len(body) else None
                doc = ""
                if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                    doc = str(after.value.value)
                found.append(Entry(name, value, inspect.cleandoc(doc)))
        elif isinstance(node, ast.FunctionDef) and isinstance(node.returns, ast.Constant | ast.Name):
            returns = node.returns.value if isinstance(node.returns, ast.Constant) else node.returns.id
            if returns == "Reply":
                function = getattr(replies, node.name)
                args = [_Placeholder(p) for p in inspect.signature(function).parameters]
                found.append(Entry(f"{node.name}()", function(*args), ast.get_docstring(node) or ""))
    return found


def slugify(heading: str) -> str:
    """A heading's anchor as the site's Markdown (its toc extension's default) makes it; the strict site build
    fails on a link to an anchor that does not exist, so a difference cannot go unseen."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


_CODES = re.compile(r"[2-5]\d\d [245]\.\d+\.\d+ ")


@dataclass(frozen=True)
class _Span:
    text: str  # a reply as Troubleshooting shows it, e.g. "553 5.7.1 <addr>: Sender address rejected: ..."
    section: str  # the heading above it


def _troubleshooting_spans() -> list[_Span]:
    """The replies in the first column of Troubleshooting's tables under "## SMTP replies"."""
    spans: list[_Span] = []
    section = ""
    inside = False
    for line in TROUBLESHOOTING.read_text().splitlines():
        if line.startswith("## "):
            inside = line[3:].strip() == "SMTP replies"
        elif line.startswith("### "):
            section = line[4:].strip()
        elif inside and section and line.startswith("| `"):
            first = line.split(" | ", 1)[0]
            codes = ""
            for text in re.findall(r"`([^`]+)`", first):
                # "`503 5.5.1 Need MAIL command first`, `Need RCPT command first`": the codes of the one before
                m = _CODES.match(text)
                codes = m[0] if m else codes
                spans.append(_Span(text if m else codes + text, section))
    return spans


def _literal_pieces(text: str) -> list[str]:
    """The parts of a reply's text that are not placeholders, longest first."""
    return sorted((p for p in re.split(r"<[a-z_]+>", text) if p.strip()), key=len, reverse=True)


def fix_section(reply: Reply, spans: list[_Span]) -> str | None:
    """The Troubleshooting section that lists this reply: by its whole text, else by the start of its longest
    literal part, else by its codes alone when they appear in one section only."""
    prefix = f"{reply.code} {reply.status} "
    candidates = [s for s in spans if s.text.startswith(prefix)]
    exact = [s for s in candidates if reply.text in s.text]
    if exact:
        return exact[0].section
    pieces = _literal_pieces(reply.text)
    if pieces:
        start = pieces[0].strip()[:24].lower()
        near = [s for s in candidates if start in s.text.lower()]
        if near:
            return near[0].section
    sections = {s.section for s in candidates}
    return sections.pop() if len(sections) == 1 else None


# Replies the code always sends with a text of its own (Reply.with_text), none of it the table's default: what
# Troubleshooting lists them by (a client never sees "From header address rejected").
SENT_AS: dict[str, str] = {
    "QUOTA_TOO_BIG": "Message larger than the byte quota of <login> (...)",
    "HEADER_FROM_REJECTED": "From: header domain X is not a permitted sender domain for this account",
    "CAMPAIGN_NOT_PERMITTED": "Login <login> may not choose the campaign",
}


def as_sent(entry: Entry) -> Reply:
    """The entry's reply as a client gets it, where its text is always replaced (SENT_AS)."""
    text = SENT_AS.get(entry.name)
    return entry.reply if text is None else Reply(entry.reply.code, entry.reply.status, text)


def _rewordings() -> dict[str, str]:
    # The library's texts the reply module words differently (a private table of the module).
    reworded: dict[str, str] = getattr(replies, "_REWORDED", {})
    return {old: new for old, new in reworded.items() if old != new}


def render(notes: Notes) -> str:
    out = [f"# {TITLE}\n"]
    if notes.intro:
        out.append(notes.intro + "\n")
    spans = _troubleshooting_spans()
    table_entries = entries()
    for klass, heading, ident in GROUPS:
        rows: list[tuple[str, ...]] = []
        chosen = sorted((e for e in table_entries if e.reply.code // 100 == klass), key=_order(table_entries))
        for entry in chosen:
            section = fix_section(as_sent(entry), spans)
            fix = f"[{section}](../troubleshooting.md#{slugify(section)})" if section else ""
            when = " ".join(t for t in (sentence(entry.doc), notes.item(entry.name.rstrip("()"))) if t)
            rows.append(
                (
                    anchor(entry.ident) + code(f"{entry.reply.code} {entry.reply.status}"),
                    code(entry.reply.text),
                    when,
                    fix,
                    code(entry.name),
                )
            )
        out.append(f"## {heading} {{#{ident}}}\n")
        out.append(table(["reply", "text", "sent when", "fix", "in the code"], rows))
    out.append("## The SMTP library's own replies {#library}\n")
    out.append(
        "Replies the SMTP library (aiosmtpd) sends itself, e.g. `500 Command not recognized`, carry no enhanced "
        "status code of their own; the gateway adds one by the basic code, and drops a leading `Error: `:\n"
    )
    enhanced = sorted(replies.DEFAULT_ENHANCED.items())
    out.append(table(["basic code", "enhanced code added"], [(str(c), code(e)) for c, e in enhanced]))
    reworded = _rewordings()
    if reworded:
        out.append("\nSome of its texts are worded as the gateway's own:\n")
        out.append(table(["the library's text", "sent as"], [(code(a), code(b)) for a, b in reworded.items()]))
    notes.check_used()
    return "\n".join(out)


def _order(all_entries: list[Entry]) -> Any:
    """Rows by code, then enhanced code, then the module's order."""
    position = {e.name: i for i, e in enumerate(all_entries)}

    def key(entry: Entry) -> tuple[int, tuple[int, ...], int]:
        status = tuple(int(p) for p in entry.reply.status.split("."))
        return entry.reply.code, status, position[entry.name]

    return key
