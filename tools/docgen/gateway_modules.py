"""Importing every module of the gateway, so what modules register on import (metrics) is all there."""

from __future__ import annotations

import importlib
import pkgutil

import gateway

SKIPPED = frozenset({"gateway.__main__"})  # runs the command line when imported


def import_all() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(gateway.__path__, "gateway.") if m.name not in SKIPPED]
    for name in names:
        importlib.import_module(name)
    return names
