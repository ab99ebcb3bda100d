"""Serves the bench sender domain from a loopback DNS server, so the gateway's DNS check runs (warm cache)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

# The tests' authoritative DNS server (tests/dnsserver.py) is reused as is.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.dnsserver import DnsServer, ZoneData


def zone(domain: str) -> ZoneData:
    return ZoneData(
        zones={
            domain: {
                domain: [("MX", 3600, f"10 mx.{domain}."), ("A", 3600, "192.0.2.10")],
                f"mx.{domain}": [("A", 3600, "192.0.2.25")],
                f"nl.{domain}": [("MX", 3600, f"10 mx.{domain}.")],
            }
        }
    )


async def main(domain: str) -> None:
    server = await DnsServer(zone(domain)).start()
    print(server.port, flush=True)  # the bench reads the port from the first line
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
