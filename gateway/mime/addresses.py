"""Address headers (From, Sender, Reply-To, To, Cc) read by one rule of our own, the same on every Python.

email.utils.getaddresses reads a malformed header differently per patch level (CVE-2023-27043's fix:
Debian 12's 3.11.2 returns nothing for `a@b.example <c@d.example>`, 3.11.7 two addresses), and the sender
policy must check exactly the address a message is sent as. So the rule is RFC 5322's address-list, with
its obsolete forms (comments anywhere, empty list elements, source routes, a group's missing `;` at the
end), plus the one liberty mail programs and Postfix take: a display name may hold unquoted specials such
as `@` and `.` (`scanner@acme.example <scanner@acme.example>` reads as the quoted
`"scanner@acme.example" <scanner@acme.example>`; the address is the one in angle brackets). What does not
fit (two addresses without a comma, text after `>`, an unclosed quote, comment or `<`) is a syntax error:
any reading of it would be a guess, and a different guess than the recipient's mail program may make.

An element without any `@` (`root`, `Cron Daemon`) is returned as it is: the caller treats it as no
address, as sendmail treats `From: root`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WORDS = ("atom", "quoted")


class AddressSyntaxError(ValueError):
    """The header is not an address list; the text says what is wrong and what to write (for the reply)."""


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "atom", "quoted", "comment", "literal", or the special character itself
    text: str  # quoted string and comment: the content, unescaped; otherwise as written
    raw: str  # as written
    space: bool  # white space before it


def parse_address_list(value: str) -> list[tuple[str, str]]:
    """(display name, address) for each mailbox of the header, a group's members in its place.

    Raises AddressSyntaxError. Display names are raw (encoded words and all), as email.utils gives them.
    """
    return _Parser(_tokens(value)).address_list()


# One token at a time: white space, an atom (a run of anything but specials and white space), a special,
# or a complete quoted string (backslash escapes inside). Comments nest, so they are read by _comment().
_TOKEN = re.compile(r'([ \t\r\n]+)|([^()<>\[\]:;@\\,." \t\r\n]+)|([<>:;@,.])|"((?:[^"\\]|\\.)*)"', re.S)
_ESCAPE = re.compile(r"\\(.)", re.S)


def _tokens(value: str) -> list[_Token]:
    out: list[_Token] = []
    i, n, space = 0, len(value), False
    while i < n:
        m = _TOKEN.match(value, i)
        if m is not None:
            i = m.end()
            if m.lastindex == 1:
                space = True
                continue
            raw = m.group()
            if m.lastindex == 2:
                out.append(_Token("atom", raw, raw, space))
            elif m.lastindex == 3:
                out.append(_Token(raw, raw, raw, space))
            else:
                content = m.group(4)
                out.append(_Token("quoted", _ESCAPE.sub(r"\1", content) if "\\" in content else content, raw, space))
            space = False
            continue
        c, start = value[i], i
        if c == '"':
            raise AddressSyntaxError('a quoted name is not closed with "')
        if c == "(":
            text, i = _comment(value, i + 1)
            out.append(_Token("comment", text, value[start:i], space))
        elif c == "[":
            end = value.find("]", i + 1)
            if end < 0:
                raise AddressSyntaxError("a domain literal is not closed with ]")
            i = end + 1
            out.append(_Token("literal", value[start:i], value[start:i], space))
        else:  # ) ] \
            raise AddressSyntaxError(f"a stray {c} (put a name with special characters in quotes)")
        space = False
    return out


def _comment(value: str, i: int) -> tuple[str, int]:
    """A comment's content (nested comments kept with their parentheses) and the index after it."""
    text: list[str] = []
    depth = 1
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            text.append(value[i + 1])
            i += 2
            continue
        i += 1
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return "".join(text), i
        text.append(c)
    raise AddressSyntaxError("a comment is not closed with )")


def _display(tokens: list[_Token]) -> str:
    """A display name from its tokens: words joined by one space, `.` and `@` kept where they stand, and
    any comments after it in parentheses (as email.utils gives it)."""
    out: list[str] = []
    previous: _Token | None = None
    for tok in tokens:
        if tok.kind == "comment":
            continue
        if out and (tok.space or (previous is not None and previous.kind in _WORDS and tok.kind in _WORDS)):
            out.append(" ")
        out.append(tok.text)
        previous = tok
    name = "".join(out)
    comments = [tok.text for tok in tokens if tok.kind == "comment"]
    if comments:
        name = f"{name} ({' '.join(comments)})" if name else " ".join(comments)
    return name


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i].kind if self.i < len(self.tokens) else None

    def address_list(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        while True:
            while self.peek() == ",":  # obs-addr-list: empty elements, a trailing comma
                self.i += 1
            if self.peek() is None:
                return found
            found += self.address(in_group=False)
            following = self.peek()
            if following is None:
                return found
            if following == ",":
                continue
            raise AddressSyntaxError(f"unexpected {self._describe()} (separate addresses with commas)")

    def address(self, in_group: bool) -> list[tuple[str, str]]:
        phrase = self._phrase()
        following = self.peek()
        if following == ":":
            if in_group:
                raise AddressSyntaxError("a group inside a group")
            self.i += 1
            return self._group()
        if following == "<":
            self.i += 1
            address = self._angle()
            return [(_display(phrase), address)]
        if following == ">":
            raise AddressSyntaxError("a > without its <")
        return [self._bare(phrase)]

    def _phrase(self) -> list[_Token]:
        start = self.i
        while self.peek() not in (None, "<", ">", ":", ",", ";"):
            self.i += 1
        return self.tokens[start : self.i]

    def _group(self) -> list[tuple[str, str]]:
        members: list[tuple[str, str]] = []
        while True:
            while self.peek() == ",":
                self.i += 1
            if self.peek() in (";", None):  # a group's missing ';' at the very end is forgiven
                if self.peek() == ";":
                    self.i += 1
                    self._comments()
                return members
            members += self.address(in_group=True)
            if self.peek() not in (",", ";", None):
                raise AddressSyntaxError(f"unexpected {self._describe()} in a group (separate addresses with commas)")

    def _angle(self) -> str:
        start = self.i
        while self.peek() not in (None, ">", "<"):
            self.i += 1
        if self.peek() != ">":
            raise AddressSyntaxError("an address in <...> is not closed with >")
        inner = [tok for tok in self.tokens[start : self.i] if tok.kind != "comment"]
        self.i += 1
        self._comments()
        if self.peek() not in (",", ";", None):
            raise AddressSyntaxError(
                f"text after the address <{''.join(t.raw for t in inner)}> (put the name before it, or separate "
                "addresses with commas)"
            )
        if inner and inner[0].kind == "@":  # obs-route: <@relay.example,@other.example:user@example.com>
            colon = next((k for k, tok in enumerate(inner) if tok.kind == ":"), None)
            if colon is None:
                raise AddressSyntaxError("a source route in <...> without its ':'")
            inner = inner[colon + 1 :]
        return _addr_spec(inner)

    def _bare(self, phrase: list[_Token]) -> tuple[str, str]:
        words = [tok for tok in phrase if tok.kind != "comment"]
        name = " ".join(tok.text for tok in phrase if tok.kind == "comment")
        if not any(tok.kind == "@" for tok in words):
            return name, "".join(tok.raw for tok in words)  # no address at all: the caller ignores it
        return name, _addr_spec(words)

    def _comments(self) -> None:
        while self.peek() == "comment":
            self.i += 1

    def _describe(self) -> str:
        tok = self.tokens[self.i]
        return f"text {tok.raw!r}" if tok.kind in ("atom", "quoted", "literal") else f"'{tok.raw}'"


def _addr_spec(tokens: list[_Token]) -> str:
    """local-part@domain from its tokens: words (or, in the domain, a literal) separated by dots, white space
    and comments around the dots allowed (RFC 5322's obsolete forms). Two words in a row are a name
    written without <...> around the address."""
    text: list[str] = []
    previous: str | None = None
    for tok in tokens:
        if tok.kind in (*_WORDS, "literal") and previous in (*_WORDS, "literal"):
            raise AddressSyntaxError("a name before the address without <...> around it (write Name <address>)")
        if tok.kind not in (*_WORDS, "literal", ".", "@"):
            raise AddressSyntaxError(f"'{tok.raw}' inside an address")
        text.append(tok.raw)
        previous = tok.kind
    return "".join(text)
