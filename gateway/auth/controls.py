"""Per-login controls at run time: every login's rules (gateway/config/logins.py) by account and login, and the
decisions they make about a client: where AUTH may come from, whether it must be inside TLS."""

from __future__ import annotations

import ipaddress
from typing import Any

from gateway.config import Settings
from gateway.config.base import UserSettings
from gateway.config.logins import Quota, Rules, resolve, user_where
from gateway.core.model import Principal

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# The metric label of the logins an account's provider checks (DMDS SMTP-API logins, the dEngage API user):
# they are not configured, so they are counted together per account (a bounded label set).
PROVIDER_LOGINS = "*"


def client_address(peer: Any) -> Address | None:
    """The client's address from a session's peer (behind a PROXY header: the real client's); an IPv4 client
    of a dual-stack listener (::ffff:a.b.c.d) as IPv4. None when the peer is no IP address."""
    if not isinstance(peer, tuple):
        return None
    try:
        ip = ipaddress.ip_address(peer[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _within(ip: Address | None, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    return ip is not None and any(ip.version == n.version and ip in n for n in networks)


class LoginControls:
    """The rules of every configured user and every account (the default of the logins its provider checks),
    resolved once per configuration (a reload builds a new one)."""

    def __init__(self, settings: Settings) -> None:
        named = settings.networks
        self._accounts: dict[str, Rules] = {}
        self._users: dict[tuple[str, str], Rules] = {}
        for name, account in settings.accounts.items():
            self._accounts[name] = resolve(account, None, named, f"accounts.{name}")
            for user in account.configured_users:
                self._users[(name, user.username)] = resolve(account, user, named, user_where(name, user))

    def rules(self, principal: Principal) -> Rules:
        return self.rules_of(principal.account, principal.login)

    def rules_of(self, account: str, login: str | None) -> Rules:
        """A configured user's rules; the account's own for any other login of it (None: its provider's)."""
        found = self._users.get((account, login)) if login is not None else None
        return found if found is not None else self._accounts.get(account, Rules())

    def for_owner(self, owner: tuple[str, UserSettings | None]) -> Rules:
        account, user = owner
        return self.rules_of(account, user.username if user is not None else None)

    def metric_login(self, principal: Principal) -> str:
        """The login as metrics label it: a configured user's name, else PROVIDER_LOGINS."""
        return principal.login if (principal.account, principal.login) in self._users else PROVIDER_LOGINS

    def configured_quotas(self) -> dict[tuple[str, str], Quota]:
        """The configured users that have a quota, with it (what /metrics lists)."""
        return {key: rules.quota for key, rules in self._users.items() if rules.quota}


def network_allows(rules: Rules, ip: Address | None) -> bool:
    """Whether a login restricted to `rules.networks` may be used from `ip` (unrestricted: anywhere)."""
    return not rules.networks or _within(ip, rules.networks)


def tls_missing(rules: Rules, ip: Address | None, tls: bool) -> bool:
    """Whether AUTH as this login must be refused for want of TLS (`require_tls`, not from its exceptions)."""
    return rules.require_tls and not tls and not _within(ip, rules.tls_exempt)
