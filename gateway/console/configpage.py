"""The Configuration page: the running configuration with every secret masked (as `check-config` prints it),
when it was loaded and what the last reload did."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.config import masked_dump
from gateway.console.runtime import Gateway


def page(gw: Gateway) -> dict[str, Any]:
    dumped = orjson.dumps(masked_dump(gw.settings), option=orjson.OPT_INDENT_2).decode()
    return {"config": dumped, "loaded": gw.config_status}
