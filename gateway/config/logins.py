"""Per-login controls resolved: a user's rules over its account's defaults, network names expanded; and the
checks `check-config`, `serve` and a reload make (unknown or invalid networks, overlaps, contradictions),
each error naming where it is."""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.config.base import AccountBase, LoginRules, UserSettings
from gateway.policy.recipients import RecipientRules

if TYPE_CHECKING:
    from gateway.config.settings import Settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@dataclass(frozen=True, slots=True)
class Quota:
    """A login's quotas; 0: no limit."""

    messages_per_hour: int = 0
    messages_per_day: int = 0
    bytes_per_hour: int = 0
    bytes_per_day: int = 0

    def __bool__(self) -> bool:
        return any((self.messages_per_hour, self.messages_per_day, self.bytes_per_hour, self.bytes_per_day))


@dataclass(frozen=True, slots=True)
class Rules:
    """One login's controls as they apply (empty networks: anywhere; recipients None: any)."""

    networks: tuple[Network, ...] = ()
    require_tls: bool = False
    tls_exempt: tuple[Network, ...] = ()
    recipients: RecipientRules | None = None
    quota: Quota = field(default_factory=Quota)
    test_mode: bool = False


QUOTA_KEYS = ("messages_per_hour", "messages_per_day", "bytes_per_hour", "bytes_per_day")


def _pick(user: LoginRules | None, account: LoginRules, name: str, default: Any) -> Any:
    """The user's value, else the account's, else `default`."""
    for level in (user, account):
        value = getattr(level, name) if level is not None else None
        if value is not None:
            return value
    return default


def _quota(user: LoginRules | None, account: LoginRules) -> Quota:
    """Each quota key of the user's table, else of the account's (0: no limit)."""
    values = {}
    for key in QUOTA_KEYS:
        value = getattr(user.quota, key) if user is not None and user.quota is not None else None
        if value is None and account.quota is not None:
            value = getattr(account.quota, key)
        values[key] = value or 0
    return Quota(**values)


def _network(entry: str, named: Mapping[str, Sequence[Network]], where: str) -> list[Network]:
    text = entry.strip()
    if NAME.match(text) and not text.isdigit():
        if text in named:
            return list(named[text])
        defined = ", ".join(sorted(named)) or "none is defined"
        raise ValueError(
            f"{where}: unknown network {text!r}: give a network (192.168.20.0/24), an address, or a name "
            f"defined under [networks] ({defined})"
        )
    try:
        return [ipaddress.ip_network(text, strict=True)]
    except ValueError as exc:
        hint = ""
        with contextlib.suppress(ValueError):
            hint = f": did you mean {ipaddress.ip_network(text, strict=False)}?"
        raise ValueError(f"{where}: {text!r} is not a valid network ({exc}){hint}") from None


def networks(entries: Sequence[str], named: Mapping[str, Sequence[Network]], where: str) -> tuple[Network, ...]:
    """`entries` (networks, addresses, [networks] names) as networks. ValueError naming `where` for an unknown
    name, an invalid network or two that overlap."""
    out: list[tuple[str, Network]] = []
    for entry in entries:
        out += [(entry, n) for n in _network(entry, named, where)]
    no_overlap(out, where)
    return tuple(n for _, n in out)


def no_overlap(listed: Sequence[tuple[str, Network]], where: str) -> None:
    """ValueError when two networks of one list overlap (one holds the other): each address is listed once."""
    for i, (entry, net) in enumerate(listed):
        for other_entry, other in listed[:i]:
            if net.version == other.version and net.overlaps(other):
                via = "" if (entry, other_entry) == (str(net), str(other)) else f" (from {other_entry!r}, {entry!r})"
                raise ValueError(f"{where}: networks {other} and {net} overlap{via}: list each network once")


def resolve(
    account: AccountBase, user: UserSettings | None, named: Mapping[str, Sequence[Network]], where: str
) -> Rules:
    """The rules of `user` (None: the account's own, for the logins its provider checks), its unset keys taken
    from the account. ValueError naming `where` when they are invalid or contradict each other."""
    allowed = networks(_pick(user, account, "networks", []), named, f"{where}.networks")
    require_tls = _pick(user, account, "require_tls", False)
    exempt = networks(_pick(user, account, "require_tls_except", []), named, f"{where}.require_tls_except")
    if exempt and allowed:
        for net in exempt:
            if not any(net.version == a.version and net.overlaps(a) for a in allowed):
                raise ValueError(
                    f"{where}.require_tls_except: {net} lies outside the login's networks "
                    f"({', '.join(map(str, allowed))}): the exception could never apply"
                )
    recipients_ = _pick(user, account, "allowed_recipients", [])
    try:
        recipients = RecipientRules.parse(recipients_) if recipients_ else None
    except ValueError as exc:
        raise ValueError(f"{where}.allowed_recipients: {exc}") from None
    quota = _quota(user, account)
    for unit in ("messages", "bytes"):
        hour, day = getattr(quota, f"{unit}_per_hour"), getattr(quota, f"{unit}_per_day")
        if hour and day and hour > day:
            raise ValueError(
                f"{where}.quota: {unit}_per_hour ({hour}) is more than {unit}_per_day ({day}): the hourly "
                "limit could never be reached"
            )
    return Rules(
        networks=allowed,
        require_tls=require_tls,
        tls_exempt=exempt,
        recipients=recipients,
        quota=quota,
        test_mode=_pick(user, account, "test_mode", False),
    )


def user_where(account: str, user: UserSettings) -> str:
    return f"accounts.{account}.users[{user.username}]"


def check(settings: Settings) -> None:
    """Every login's rules resolve, and none contradicts a listener's trusted networks. ValueError."""
    named = settings.networks
    by_login: dict[str, Rules] = {}
    for name, account in settings.accounts.items():
        own = resolve(account, None, named, f"accounts.{name}")
        users = account.configured_users
        if account.require_tls_except and not own.require_tls and not any(u.require_tls for u in users):
            raise ValueError(
                f"accounts.{name}.require_tls_except: set, but neither the account nor any of its users sets "
                "require_tls: the exception has nothing to except"
            )
        for user in users:
            rules = by_login[user.username] = resolve(account, user, named, user_where(name, user))
            if user.require_tls_except is not None and not rules.require_tls:
                raise ValueError(
                    f"{user_where(name, user)}.require_tls_except: set, but the login does not require TLS "
                    "(require_tls): the exception has nothing to except"
                )
    for issuer in settings.oauth.issuers:
        for value, login in issuer.logins.items():
            if login not in by_login:
                raise ValueError(
                    f"oauth.issuers[{issuer.name}].logins: {value!r} maps to {login!r}, which is not a configured user"
                )
    for listener in settings.listeners:
        for network, login in listener.trusted_map:
            trusted = by_login.get(login)
            if trusted is None or not trusted.networks:
                continue
            if not any(network.version == n.version and network.subnet_of(n) for n in trusted.networks):  # type: ignore[arg-type]
                raise ValueError(
                    f"listeners[{listener.name}]: trusted network {network} is not within the networks of its "
                    f"login {login!r} ({', '.join(map(str, trusted.networks))}): widen the login's networks or "
                    "narrow the trusted network"
                )
