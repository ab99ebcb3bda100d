"""Table-driven unit tests of the pure sender policy (gateway/policy/senders.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.core.errors import PolicyRejected
from gateway.core.model import Address, Message, Principal
from gateway.policy import senders
from gateway.providers.dmds.config import DmdsAccount
from gateway.providers.dmds.provider import sender_policy

ACCOUNT = sender_policy(
    DmdsAccount(
        dmdsid="acme",
        apikey="k",  # type: ignore[arg-type]
        sender_domains={
            "acme.example": "dmds-acme@nl.acme.example",
            "Other.Example.": "bounce@rp.other.example",
            "bücher.example": "dmds-buecher@nl.bücher.example",
        },
    )
)
ANY = Principal(account="acme", login="scanner")


def limited(*entries: str, **kwargs: object) -> Principal:
    return Principal(account="acme", login="scanner", allowed_senders=entries, **kwargs)  # type: ignore[arg-type]


def not_owned(address: str) -> str:
    return f"553 5.7.1 <{address}>: Sender address rejected: not owned by scanner"


def reply_of(exc: pytest.ExceptionInfo[PolicyRejected]) -> str:
    return str(exc.value.reply)


# ---- address syntax -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "smtputf8", "normalized"),
    [
        ("billing@acme.example", False, "billing@acme.example"),
        ("Billing@ACME.Example", False, "Billing@acme.example"),  # domain lower-cased, local part kept
        ("x@bücher.example", True, "x@xn--bcher-kva.example"),  # IDN domain -> xn-- form
        ("x@xn--bcher-kva.example", False, "x@xn--bcher-kva.example"),
    ],
)
def test_normalize_address_accepts(address: str, smtputf8: bool, normalized: str) -> None:
    assert senders.check_recipient(address, smtputf8) == normalized


@pytest.mark.parametrize(
    ("address", "smtputf8", "reply"),
    [
        ("a..b@example.com", False, "553 5.1.3 <a..b@example.com>: An email address cannot have two periods in a row."),
        ("nobody", False, "553 5.1.3 <nobody>: An email address must have an @-sign."),
        (
            '"john doe"@acme.example',
            False,
            '553 5.1.3 <"john doe"@acme.example>: Quoting the part before the @-sign is not allowed here.',
        ),
        (
            "x@localhost",
            False,
            "553 5.1.3 <x@localhost>: The part after the @-sign is not valid. It should have a period.",
        ),
        (
            "x@acme.test",
            False,
            "553 5.1.3 <x@acme.test>: The part after the @-sign is a special-use or reserved name "
            "that cannot be used with email.",
        ),
        (
            "jö@acme.example",
            False,
            "553 5.1.3 <jö@acme.example>: Internationalized characters before the @-sign are not supported: 'ö'.",
        ),
        (
            "jö@acme.example",
            True,
            "553 5.6.7 <jö@acme.example>: Internationalized characters before the @-sign are not supported "
            "by the upstream API",
        ),
    ],
)
def test_recipient_syntax_refusals(address: str, smtputf8: bool, reply: str) -> None:
    with pytest.raises(PolicyRejected) as exc:
        senders.check_recipient(address, smtputf8)
    assert reply_of(exc) == reply


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("acme.example", "acme.example"),
        ("ACME.example.", "acme.example"),
        ("Bücher.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ],
)
def test_ascii_domain(domain: str, expected: str) -> None:
    assert senders.ascii_domain(domain) == expected


def test_permitted_domains_and_return_paths_are_normalized() -> None:
    assert ACCOUNT.domains == {"acme.example", "other.example", "xn--bcher-kva.example"}
    assert dict(ACCOUNT.return_paths) == {
        "dmds-acme@nl.acme.example": "acme.example",
        "bounce@rp.other.example": "other.example",
        "dmds-buecher@nl.xn--bcher-kva.example": "xn--bcher-kva.example",
    }


# ---- MAIL FROM ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("principal", "address"),
    [
        (ANY, "billing@acme.example"),
        (ANY, "BILLING@Acme.Example"),
        (ANY, "dmds-acme@nl.acme.example"),  # a permitted domain's return-path
        (ANY, "DMDS-ACME@NL.ACME.EXAMPLE"),
        (ANY, "x@other.example"),
        (ANY, "x@xn--bcher-kva.example"),
        (limited("billing@acme.example"), "billing@acme.example"),
        (limited("billing@acme.example"), "Billing@acme.example"),
        (limited("@acme.example"), "anyone@acme.example"),
        (limited("acme.example"), "anyone@acme.example"),
        (limited("bücher.example"), "x@xn--bcher-kva.example"),
        # the return-path belongs to the domain: usable by a login limited to addresses of that domain
        (limited("billing@acme.example"), "dmds-acme@nl.acme.example"),
        (limited("@acme.example"), "dmds-acme@nl.acme.example"),
    ],
)
def test_sender_permitted(principal: Principal, address: str) -> None:
    assert senders.check_sender(ACCOUNT, principal, address, smtputf8=False).lower() == address.lower()


@pytest.mark.parametrize(
    ("principal", "address", "reply"),
    [
        (ANY, "x@evil.example", not_owned("x@evil.example")),
        # a subdomain of a permitted domain is not permitted
        (ANY, "x@nl.acme.example", not_owned("x@nl.acme.example")),
        # some other address at the return-path's domain
        (ANY, "other@nl.acme.example", not_owned("other@nl.acme.example")),
        (
            limited("billing@acme.example"),
            "sales@acme.example",
            not_owned("sales@acme.example"),
        ),
        (
            limited("@acme.example"),
            "x@other.example",
            not_owned("x@other.example"),
        ),
        # limited to acme.example: other.example's return-path is not theirs
        (
            limited("billing@acme.example"),
            "bounce@rp.other.example",
            not_owned("bounce@rp.other.example"),
        ),
        # allowed_senders cannot widen the account's permitted domains
        (
            limited("@evil.example"),
            "x@evil.example",
            not_owned("x@evil.example"),
        ),
        (ANY, "", "553 5.7.1 Null sender <> not accepted: this gateway does not relay bounces"),
        (ANY, "<>", "553 5.7.1 Null sender <> not accepted: this gateway does not relay bounces"),
        (
            ANY,
            "bad@@acme.example",
            "553 5.1.3 <bad@@acme.example>: The part after the @-sign contains invalid characters: '@'.",
        ),
        (
            ANY,
            "jö@acme.example",
            "553 5.1.3 <jö@acme.example>: Internationalized characters before the @-sign are not supported: 'ö'.",
        ),
    ],
)
def test_sender_refused(principal: Principal, address: str, reply: str) -> None:
    with pytest.raises(PolicyRejected) as exc:
        senders.check_sender(ACCOUNT, principal, address, smtputf8=False)
    assert reply_of(exc) == reply


def test_sender_utf8_local_part_with_smtputf8_is_5_6_7() -> None:
    with pytest.raises(PolicyRejected) as exc:
        senders.check_sender(ACCOUNT, ANY, "jö@acme.example", smtputf8=True)
    assert exc.value.reply.code == 553
    assert exc.value.reply.status == "5.6.7"


@pytest.mark.parametrize(
    ("entries", "address", "domain", "may"),
    [
        ((), "x@acme.example", "acme.example", True),
        (("a@acme.example",), "a@acme.example", "acme.example", True),
        (("a@acme.example",), "b@acme.example", "acme.example", False),
        (("@acme.example",), "b@acme.example", "acme.example", True),
        (("acme.example",), "b@acme.example", "acme.example", True),
        (("acme.example",), "b@other.example", "other.example", False),
        ((" A@ACME.example ",), "a@acme.example", "acme.example", True),
        (("a@acme.example", "@other.example"), "z@other.example", "other.example", True),
    ],
)
def test_login_may_use(entries: tuple[str, ...], address: str, domain: str, may: bool) -> None:
    assert senders.login_may_use(limited(*entries), address, domain) is may


# ---- header From / Sender / Reply-To / To / Cc ----------------------------------------------------


def msg(
    from_: str | None = "billing@acme.example",
    sender: str | None = None,
    reply_to: str | None = None,
    to: tuple[str, ...] = ("client@example.com",),
    cc: tuple[str, ...] = (),
) -> Message:
    return Message(
        subject="s",
        from_=Address(from_, "Billing") if from_ is not None else None,
        sender=Address(sender) if sender is not None else None,
        reply_to=Address(reply_to) if reply_to is not None else None,
        to=tuple(Address(a) for a in to),
        cc=tuple(Address(a) for a in cc),
        html="<p>x</p>",
        text=None,
    )


MAIL_FROM = "dmds-acme@nl.acme.example"


@pytest.mark.parametrize(
    ("principal", "message", "expected_from"),
    [
        (ANY, msg(), Address("billing@acme.example", "Billing")),
        (ANY, msg(from_="x@other.example"), Address("x@other.example", "Billing")),
        (ANY, msg(from_="x@bücher.example"), Address("x@xn--bcher-kva.example", "Billing")),
        # no From: the envelope sender, or the login's default_from
        (ANY, msg(from_=None), Address("billing@acme.example")),
        (limited(default_from="scanner@acme.example"), msg(from_=None), Address("scanner@acme.example")),
        # a default does not replace a From that is there
        (limited(default_from="scanner@acme.example"), msg(), Address("billing@acme.example", "Billing")),
        # forced: replaces any From, even one not permitted; keeps the display name
        (
            limited(default_from="scanner@acme.example", force_from=True),
            msg(from_="root@printer.example.net"),
            Address("scanner@acme.example", "Billing"),
        ),
        (limited("@acme.example"), msg(sender="ops@acme.example"), Address("billing@acme.example", "Billing")),
    ],
)
def test_from_policy_accepts(principal: Principal, message: Message, expected_from: Address) -> None:
    mail_from = "billing@acme.example" if message.from_ is None else MAIL_FROM
    out = senders.apply_from_policy(ACCOUNT, principal, message, mail_from, smtputf8=True)
    assert out.from_ == expected_from
    assert replace(out, from_=message.from_) == message


def test_from_policy_returns_the_same_message_when_nothing_changes() -> None:
    message = msg(sender="ops@acme.example", reply_to="help@example.com", cc=("c@example.com",))
    assert senders.apply_from_policy(ACCOUNT, ANY, message, MAIL_FROM, smtputf8=False) is message


def test_header_addresses_travel_normalized() -> None:
    message = msg(reply_to="help@bücher.example", to=("a@bücher.example",), cc=("c@Bücher.example",))
    out = senders.apply_from_policy(ACCOUNT, ANY, message, MAIL_FROM, smtputf8=True)
    assert out.reply_to == Address("help@xn--bcher-kva.example")
    assert out.to == (Address("a@xn--bcher-kva.example"),)
    assert out.cc == (Address("c@xn--bcher-kva.example"),)


@pytest.mark.parametrize(
    ("principal", "message", "reply"),
    [
        (
            ANY,
            msg(from_="ceo@evil.example"),
            "550 5.7.1 From: header domain evil.example is not a permitted sender domain for this account",
        ),
        (
            ANY,
            msg(sender="relay@evil.example"),
            "550 5.7.1 Sender: header domain evil.example is not a permitted sender domain for this account",
        ),
        # the return-path is an envelope address, not a From
        (
            ANY,
            msg(from_="dmds-acme@nl.acme.example"),
            "550 5.7.1 From: header domain nl.acme.example is not a permitted sender domain for this account",
        ),
        (
            limited("billing@acme.example"),
            msg(from_="sales@acme.example"),
            "550 5.7.1 From: header <sales@acme.example> is not owned by scanner",
        ),
        (
            limited("@acme.example"),
            msg(sender="x@other.example"),
            "550 5.7.1 Sender: header <x@other.example> is not owned by scanner",
        ),
        # a default From does not apply when the message has one
        (
            limited(default_from="scanner@acme.example"),
            msg(from_="root@printer.example.net"),
            "550 5.7.1 From: header domain printer.example.net is not a permitted sender domain for this account",
        ),
        # force_from without default_from forces nothing
        (
            limited(force_from=True),
            msg(from_="root@printer.example.net"),
            "550 5.7.1 From: header domain printer.example.net is not a permitted sender domain for this account",
        ),
        (
            ANY,
            msg(from_="a..b@acme.example"),
            "550 5.1.3 From: header <a..b@acme.example>: An email address cannot have two periods in a row.",
        ),
        (
            ANY,
            msg(sender="nobody"),
            "550 5.1.3 Sender: header <nobody>: An email address must have an @-sign.",
        ),
        (
            ANY,
            msg(reply_to="help@localhost"),
            "550 5.1.3 Reply-To: header <help@localhost>: The part after the @-sign is not valid. "
            "It should have a period.",
        ),
        (
            ANY,
            msg(to=("ok@example.com", "a..b@example.com")),
            "550 5.1.3 To: header address <a..b@example.com>: An email address cannot have two periods in a row. "
            "(the address is not a recipient of this message)",
        ),
        (
            ANY,
            msg(cc=("c@acme.test",)),
            "550 5.1.3 Cc: header address <c@acme.test>: The part after the @-sign is a special-use or reserved "
            "name that cannot be used with email. (the address is not a recipient of this message)",
        ),
        (
            ANY,
            msg(from_="jö@acme.example"),
            "553 5.6.7 From: header <jö@acme.example>: Internationalized characters before the @-sign are not "
            "supported by the upstream API",
        ),
    ],
)
def test_from_policy_refusals(principal: Principal, message: Message, reply: str) -> None:
    with pytest.raises(PolicyRejected) as exc:
        senders.apply_from_policy(ACCOUNT, principal, message, MAIL_FROM, smtputf8=True)
    assert reply_of(exc) == reply


def test_missing_from_with_return_path_envelope_is_refused() -> None:
    # No From and MAIL FROM is the return-path: the From would be in nl.acme.example, not a sender domain.
    with pytest.raises(PolicyRejected) as exc:
        senders.apply_from_policy(ACCOUNT, ANY, msg(from_=None), MAIL_FROM, smtputf8=False)
    assert reply_of(exc) == (
        "550 5.7.1 From: header domain nl.acme.example is not a permitted sender domain for this account"
    )


def test_invalid_header_only_addresses_dropped_when_the_listener_says() -> None:
    message = msg(to=("scan@printer.local", "ok@example.com"), cc=("a..b@example.com",))
    checked = senders.apply_from_policy(
        ACCOUNT, ANY, message, MAIL_FROM, smtputf8=True, drop_invalid_header_addresses=True
    )
    assert [a.email for a in checked.to] == ["ok@example.com"] and checked.cc == ()
    assert checked.defects == (
        "header_address_dropped: To <scan@printer.local>: The part after the @-sign is a special-use or reserved "
        "name that cannot be used with email.",
        "header_address_dropped: Cc <a..b@example.com>: An email address cannot have two periods in a row.",
    )
    # From, Sender and Reply-To are never dropped: they say who sent the message and where replies go.
    with pytest.raises(PolicyRejected):
        senders.apply_from_policy(
            ACCOUNT, ANY, msg(reply_to="help@localhost"), MAIL_FROM, smtputf8=True, drop_invalid_header_addresses=True
        )
