"""Address headers by the gateway's own rule (gateway/mime/addresses.py): one reading of every header on
every Python patch level, whatever email.utils does with it there."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.mime.addresses import AddressSyntaxError, parse_address_list
from gateway.mime.parser import _SIMPLE_MAILBOX, _mailboxes


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # The CVE-2023-27043 case: 3.11.2 (Debian) reads nothing, 3.11.7 two addresses; here a name and one.
        ("a@b.example <c@d.example>", [("a@b.example", "c@d.example")]),
        ('"a@b.example" <c@d.example>', [("a@b.example", "c@d.example")]),
        ("Alice <a@x.example>, Bob <b@y.example>", [("Alice", "a@x.example"), ("Bob", "b@y.example")]),
        ('"Doe, John" <j@x.example>', [("Doe, John", "j@x.example")]),
        ("John Q. Public <jqp@x.example>", [("John Q. Public", "jqp@x.example")]),
        ("=?utf-8?q?J=C3=B6rg?= <j@x.example>", [("=?utf-8?q?J=C3=B6rg?=", "j@x.example")]),
        ("a@x.example (Alice)", [("Alice", "a@x.example")]),
        (
            "Pete(A nice \\) chap) <pete(his account)@silly.test(his host)>",
            [("Pete (A nice ) chap)", "pete@silly.test")],
        ),
        ("john . doe @ example . com", [("", "john.doe@example.com")]),
        ('"john doe"@x.example', [("", '"john doe"@x.example')]),
        ("<@relay.example,@other.example:u@x.example>", [("", "u@x.example")]),
        ("<test@x.example>,", [("", "test@x.example")]),  # obsolete syntax: empty list elements
        (", a@x.example,, b@y.example", [("", "a@x.example"), ("", "b@y.example")]),
        (
            "team: a@x.example, B <b@y.example>;, c@z.example",
            [("", "a@x.example"), ("B", "b@y.example"), ("", "c@z.example")],
        ),
        ("Undisclosed recipients:;", []),
        ("undisclosed-recipients:", []),  # a group's missing ';' at the end
        ("root (Cron Daemon)", [("Cron Daemon", "root")]),  # no @: the caller counts it as no address
        ("", []),
    ],
)
def test_address_lists(value: str, expected: list[tuple[str, str]]) -> None:
    assert parse_address_list(value) == expected


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("Bob <bob@x.example> Bobby <bobby@x.example>", "text after the address <bob@x.example>"),
        ("x <a@b.example> y", "text after the address <a@b.example>"),
        ("Foo <a@b.example>>", "text after the address <a@b.example>"),
        ("<a@b.example", "an address in <...> is not closed with >"),
        ("a@b.example>", "a > without its <"),
        ('"Alice <a@x.example>', 'a quoted name is not closed with "'),
        ("Alice (friend <a@x.example>", "a comment is not closed with )"),
        ("Alice) <a@x.example>", "a stray )"),
        ("Alice alice@x.example", "a name before the address without <...> around it (write Name <address>)"),
        ("<Undisclosed-Recipient:@mailman.example;>", "':' inside an address"),
        ("a: b: c@x.example;;", "a group inside a group"),
        ("a@x.example b@y.example", "a name before the address without <...> around it"),
    ],
)
def test_what_is_not_an_address_list_is_an_error(value: str, why: str) -> None:
    with pytest.raises(AddressSyntaxError) as err:
        parse_address_list(value)
    assert str(err.value).startswith(why)


_NAME = st.text(st.sampled_from("abcXYZ .-'=?_é"), max_size=12)
_PART = st.text(st.sampled_from("abc123.-_+"), min_size=1, max_size=8)


@given(name=_NAME, local=_PART, domain=_PART, spaces=st.sampled_from(["", " ", "  ", "\t"]))
def test_the_one_mailbox_fast_path_agrees_with_the_parser(name: str, local: str, domain: str, spaces: str) -> None:
    for value in (f"{name}{spaces}<{local}@{domain}>", f"{spaces}{local}@{domain}{spaces}"):
        if _SIMPLE_MAILBOX.match(value):
            assert _mailboxes([value]) == parse_address_list(value), value


@given(value=st.text(st.sampled_from('ab@.<>,:;()"[]\\ \té=?'), max_size=40))
def test_any_text_is_an_address_list_or_a_syntax_error(value: str) -> None:
    try:
        found = parse_address_list(value)
    except AddressSyntaxError:
        return
    assert all(isinstance(name, str) and isinstance(addr, str) for name, addr in found)
