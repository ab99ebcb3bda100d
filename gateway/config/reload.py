"""What a configuration reload (SIGHUP) can change in a running server, and what needs a restart.

Live: accounts (logins, passwords, API keys, sender domains, campaigns, rate limits), [limits], [tls] files
and each listener's profile, trusted networks, login aliases and PROXY balancers, [dns], [log], [ledger],
hostname, http.api_tokens. Restart: a listener's socket (name, address, port, tls mode, reuse_port,
proxy_protocol), listeners added or removed, limits.malloc_mmap_threshold (the allocator cannot go back to
glibc's dynamic default), [delivery] (the queue backend and its delivery settings), the rest of [http], the
number of workers (a command-line option). A reload applies the live part and keeps the running values of
the rest (a listener whose socket changed keeps its socket, its other keys apply), naming them in its log
line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.config.settings import ListenerSettings, Settings, check_consistent

# A listener's keys that are its socket: changing one needs a new socket, so a restart.
SOCKET_KEYS = ("address", "port", "tls", "reuse_port", "proxy_protocol")
RESTART_SECTIONS = ("delivery", "http")
RESTART_LIMITS = ("malloc_mmap_threshold",)
# Keys of the restart sections that apply at once all the same.
LIVE_KEYS = {"http": ("api_tokens",)}


def needs_restart(section: str, key: str) -> bool:
    """Whether a change of `section.key` (a top-level key: section "") waits for a restart: a reload keeps
    the running value. A listener is known by its name: renaming one is removing it and adding another."""
    if section in RESTART_SECTIONS:
        return key not in LIVE_KEYS.get(section, ())
    if section == "listeners":
        return key == "name" or key in SOCKET_KEYS
    return section == "limits" and key in RESTART_LIMITS


@dataclass(frozen=True)
class ReloadPlan:
    settings: Settings  # what the server runs with from now on
    changed: list[str]  # what changes now (top-level keys and listeners)
    restart_needed: list[str]  # what changed in the file but needs a restart to take effect


def plan_reload(old: Settings, new: Settings) -> ReloadPlan:
    """The settings to apply: `new`, except for what only a restart can change (kept from `old`).

    Raises ValueError when the result is inconsistent (a kept listener trusts a login the new file removed).
    """
    restart: list[str] = []
    for section in RESTART_SECTIONS:
        before, after = getattr(old, section), getattr(new, section)
        restart += [
            f"{section}.{key}"
            for key in type(after).model_fields
            if getattr(before, key) != getattr(after, key) and key not in LIVE_KEYS.get(section, ())
        ]
    new_by_name = {lsn.name: lsn for lsn in new.listeners}
    listeners: list[ListenerSettings] = []
    changed_listeners = []
    for running in old.listeners:
        wanted = new_by_name.pop(running.name, None)
        if wanted is None:
            restart.append(f"listeners[{running.name}] (removed)")
            listeners.append(running)
            continue
        moved = [key for key in SOCKET_KEYS if getattr(running, key) != getattr(wanted, key)]
        if moved:
            # The socket stays as it is; the listener's other keys apply now.
            restart += [f"listeners[{running.name}].{key}" for key in moved]
            kept: dict[str, object] = {key: getattr(running, key) for key in SOCKET_KEYS}
            if running.proxy_protocol and not wanted.proxy_trusted:
                kept["proxy_trusted"] = running.proxy_trusted
            wanted = wanted.model_copy(update=kept)
        listeners.append(wanted)
        if wanted != running:
            changed_listeners.append(f"listeners[{running.name}]")
    restart += [f"listeners[{name}] (added)" for name in new_by_name]
    kept_limits = [key for key in RESTART_LIMITS if getattr(old.limits, key) != getattr(new.limits, key)]
    restart += [f"limits.{key}" for key in kept_limits]
    limits = new.limits.model_copy(update={key: getattr(old.limits, key) for key in kept_limits})
    # The running endpoint with the new tokens, validated again (its address may not take them without TLS).
    http = type(old.http)(**{**dict(old.http), "api_tokens": new.http.api_tokens})
    effective = new.model_copy(
        update={"listeners": listeners, "delivery": old.delivery, "http": http, "limits": limits}
    )
    check_consistent(effective)
    changed = [
        key
        for key in type(new).model_fields
        if key not in (*RESTART_SECTIONS, "listeners") and getattr(old, key) != getattr(effective, key)
    ]
    changed += [f"http.{key}" for key in LIVE_KEYS["http"] if getattr(old.http, key) != getattr(http, key)]
    return ReloadPlan(effective, changed + changed_listeners, restart)


@dataclass
class ConfigStatus:
    """When the running configuration was loaded, and what the last reload did (for operators)."""

    loaded_at: float = field(default_factory=time.time)
    reloaded_at: float | None = None
    result: str = ""  # ok, invalid, tls_failed
    detail: str = ""  # why a reload was refused
    changed: list[str] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)

    def record(self, result: str, detail: str = "", plan: ReloadPlan | None = None) -> None:
        self.reloaded_at = time.time()
        self.result, self.detail = result, detail
        self.changed = list(plan.changed) if plan else []
        self.restart_needed = list(plan.restart_needed) if plan else []
