"""The dEngage half of `smtp-gateway sandbox` (login, froms, transactional email): being built (issue #8)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.sandbox import Sandbox


@dataclass
class DengageSandbox:
    userkey: str = "sandbox-userkey"
    password: str = "sandbox-password"


def install(sandbox: Sandbox, state: DengageSandbox) -> None:
    """No dEngage routes yet."""
