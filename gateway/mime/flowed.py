"""Pure: a text/plain; format=flowed body (RFC 3676) as mail clients display it, its paragraphs joined.

Thunderbird, Apple Mail and many phone clients send text-only mail flowed: long lines are cut into lines
that end in a space (a soft break), and a line that starts with a space, ">" or "From " gets one more
space in front (space-stuffing). Shown as it travels, every soft break becomes a hard one (under delsp=yes
mid-word) and stuffed lines keep their extra space; clients join and unstuff them, and so does this."""

from __future__ import annotations

_QUOTE = ">"
# A signature separator ends in a space but is never joined with the next line (RFC 3676 §4.3).
_SIGNATURE = "-- "


def unflow(text: str, delsp: bool = False) -> str:
    """`text` (lines ending in "\\n") with soft line breaks joined, space-stuffing removed and quoted lines
    (RFC 3676 §4.5: ">" marks, their count the quote depth) written with their marks and one space. A
    paragraph is never joined across quote depths: a flowed line followed by another depth ends its
    paragraph, as a fixed line does. `delsp`: the parameter delsp=yes, under which the soft break's space
    is not part of the text (languages written without spaces) and is removed when lines are joined."""
    ends_in_newline = text.endswith("\n")
    lines = (text[:-1] if ends_in_newline else text).split("\n")
    out: list[str] = []
    paragraph: list[str] = []  # the lines of the paragraph being joined, as they will be joined
    depth_of_paragraph = 0
    for line in lines:
        content = line.lstrip(_QUOTE)
        depth = len(line) - len(content)
        if content.startswith(" "):
            content = content[1:]  # stuffed (after the quote marks, which are never stuffed themselves)
        if paragraph and depth != depth_of_paragraph:
            out.append(_quoted(depth_of_paragraph, "".join(paragraph)))
            paragraph = []
        flowed = content.endswith(" ") and content != _SIGNATURE
        if flowed and delsp:
            content = content[:-1]
        paragraph.append(content)
        depth_of_paragraph = depth
        if not flowed:
            out.append(_quoted(depth, "".join(paragraph)))
            paragraph = []
    if paragraph:  # the text ends with a soft break: what was joined is the last paragraph
        out.append(_quoted(depth_of_paragraph, "".join(paragraph)))
    return "\n".join(out) + ("\n" if ends_in_newline else "")


def _quoted(depth: int, content: str) -> str:
    if not depth:
        return content
    return _QUOTE * depth + (" " + content if content else "")
