"""text/plain; format=flowed (RFC 3676): soft line breaks joined (their space removed under delsp=yes),
space-stuffing removed, quote depths kept apart, the signature separator a hard break; only for parts that
declare format=flowed. Through mime.parse and through a gateway to the upstream's html."""

from __future__ import annotations

import pytest

from gateway import mime
from gateway.mime.flowed import unflow
from tests.harness import Running
from tests.smtputil import send, session

HEAD = b"From: billing@acme.example\r\nTo: client@example.com\r\nSubject: flowed\r\nMIME-Version: 1.0\r\n"


@pytest.mark.parametrize(
    ("text", "delsp", "shown"),
    [
        # A soft break (the line ends in a space) joins; the space stays part of the text.
        ("This is a \nparagraph that wraps.\nNext line.\n", False, "This is a paragraph that wraps.\nNext line.\n"),
        # delsp=yes: the soft break's space is removed (mid-word breaks); a space between words was doubled.
        ("para \ngraph, wraps as  \nclients write it.\n", True, "paragraph, wraps as clients write it.\n"),
        # Space-stuffing: one leading space is removed, from any line (RFC 3676 §4.4).
        (" From here on: stuffed.\n  indented\n", False, "From here on: stuffed.\n indented\n"),
        # Quoted lines: joined within one depth, never across depths; written with their marks and a space.
        (
            "> quoted and \n> joined\n>> deeper \nback at depth 0\n",
            False,
            "> quoted and joined\n>> deeper \nback at depth 0\n",
        ),
        ("> a stuffed quote \n> line\n>\n", False, "> a stuffed quote line\n>\n"),
        # The signature separator ends in a space but is a hard break (RFC 3676 §4.3).
        ("Regards,\n-- \nAna \nGarcia\n", False, "Regards,\n-- \nAna Garcia\n"),
        # No soft break, no stuffing: unchanged; also without a final line break, and a final soft break.
        ("one\ntwo\n\nthree", False, "one\ntwo\n\nthree"),
        ("ends soft \n", False, "ends soft \n"),
        ("", True, ""),
    ],
)
def test_unflow_as_rfc_3676_says(text: str, delsp: bool, shown: str) -> None:
    assert unflow(text, delsp=delsp) == shown


def _flowed(params: bytes, body: bytes) -> bytes:
    return HEAD + b"Content-Type: text/plain; charset=utf-8" + params + b"\r\n\r\n" + body


BODY = b"This is a long para \r\ngraph that wraps, as  \r\nclients write it.\r\n From here on: stuffed.\r\n"


def test_a_flowed_part_is_sent_as_clients_show_it() -> None:
    message = mime.parse(_flowed(b"; Format=Flowed; DelSp=Yes", BODY))  # parameter values ignore case
    assert message.text == "This is a long paragraph that wraps, as clients write it.\nFrom here on: stuffed.\n"
    assert "This is a long paragraph that wraps, as clients write it.\nFrom here on: stuffed." in message.html


def test_only_a_part_that_declares_format_flowed_is_reflowed() -> None:
    assert mime.parse(_flowed(b"", BODY)).text == BODY.decode().replace("\r\n", "\n")
    assert mime.parse(_flowed(b"; format=fixed", BODY)).text == BODY.decode().replace("\r\n", "\n")
    # Without delsp=yes the soft break's space is text: joined as it is.
    assert mime.parse(_flowed(b"; format=flowed", BODY)).text == (
        "This is a long para graph that wraps, as  clients write it.\nFrom here on: stuffed.\n"
    )


def test_a_flowed_part_of_a_multipart_is_reflowed_and_an_attached_one_is_not() -> None:
    attached = HEAD + b"Content-Type: text/plain; format=flowed\r\n\r\nsoft \r\nbreak\r\n"
    raw = (
        HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain; format=flowed; delsp=yes\r\n\r\n" + BODY + b"\r\n"
        b"--b\r\nContent-Type: message/rfc822\r\n\r\n" + attached + b"\r\n--b--\r\n"
    )
    message = mime.parse(raw)
    assert message.text is not None and message.text.startswith("This is a long paragraph that wraps, as clients")
    [eml] = message.attachments
    assert b"soft \r\nbreak" in eml.data  # an attached message travels as it arrived


def test_a_flowed_message_reaches_the_upstream_reflowed(gateway: Running) -> None:
    with session(gateway) as client:
        code, text = send(client, _flowed(b"; format=flowed; delsp=yes", BODY))
    assert code == 250, text
    html = gateway.sent[-1]["body"]["html"]
    assert "This is a long paragraph that wraps, as clients write it.\nFrom here on: stuffed." in html
