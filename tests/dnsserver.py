"""A small authoritative DNS server on 127.0.0.1 (UDP and TCP, kernel-chosen port) for tests.

Zones are plain data::

    ZoneData(
        zones={"test": {"dom1.test": [("MX", 300, "10 mx.dom1.test."), ("TXT", 300, '"v=spf1 -all"')]}},
        servfail={"broken.test"},    # answered SERVFAIL (the name and everything under it)
        blackhole={"slow.test"},     # never answered (the name and everything under it)
        bogus_nxdomain={"com"},      # NXDOMAIN without SOA, as a resolver that denies every name
        yxdomain={"odd.test"},       # YXDOMAIN: dnspython raises an error no other branch catches
    )

A name under a served zone that has no records (and no records below it) gets NXDOMAIN; a name that
exists but lacks the asked type gets NoAnswer (NOERROR, empty answer, SOA in authority). Names outside
every zone get REFUSED. ``queries`` records every question, ``count()`` counts them, ``hold()`` keeps
the answers for a name back until the returned event is set, ``wait_for_query()`` awaits a question.
The server runs on the asyncio loop of the test that starts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import struct
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Record = tuple[str, int, str]  # (type, TTL, rdata in zone-file syntax)
Zone = dict[str, list[Record]]  # owner name (absolute, no final dot) -> records


@dataclass
class ZoneData:
    zones: dict[str, Zone]  # zone apex -> its names
    servfail: set[str] = field(default_factory=set)
    blackhole: set[str] = field(default_factory=set)
    bogus_nxdomain: set[str] = field(default_factory=set)
    yxdomain: set[str] = field(default_factory=set)
    negative_ttl: int = 60  # SOA minimum, served with NXDOMAIN / NoAnswer


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


def _under(name: str, names: set[str]) -> bool:
    return any(name == n or name.endswith("." + n) for n in map(_norm, names))


class DnsServer:
    def __init__(self, data: ZoneData) -> None:
        self.data = data
        self.port = 0
        self.queries: list[tuple[str, str]] = []  # (name, type) in arrival order
        self._holds: dict[str, asyncio.Event] = {}
        self._arrived = asyncio.Condition()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> DnsServer:
        loop = asyncio.get_running_loop()
        for _ in range(20):  # UDP on a kernel-chosen port, then TCP on the same number
            transport, _proto = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=("127.0.0.1", 0))
            port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, "127.0.0.1", port)
            except OSError as exc:
                transport.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            self._udp, self.port = transport, port
            return self
        raise RuntimeError("no port free for both UDP and TCP")

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()

    # ---- test helpers ---------------------------------------------------------------------------

    def count(self, name: str, rdtype: str | None = None) -> int:
        name = _norm(name)
        return sum(1 for n, t in self.queries if n == name and (rdtype is None or t == rdtype.upper()))

    def hold(self, name: str) -> asyncio.Event:
        """Answers for ``name`` wait until the returned event is set."""
        return self._holds.setdefault(_norm(name), asyncio.Event())

    async def wait_for_query(self, name: str, rdtype: str | None = None, count: int = 1) -> None:
        async with self._arrived:
            await self._arrived.wait_for(lambda: self.count(name, rdtype) >= count)

    # ---- answering ------------------------------------------------------------------------------

    async def answer(self, wire: bytes, max_size: int | None) -> bytes | None:
        """The response to one query in wire format, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if len(query.question) != 1:
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = _norm(question.name.to_text())
        async with self._arrived:
            self.queries.append((name, dns.rdatatype.to_text(question.rdtype)))
            self._arrived.notify_all()
        if _under(name, self.data.blackhole):
            return None
        hold = self._holds.get(name)
        if hold is not None:
            await hold.wait()
        response = self._resolve(query, name, question.rdtype)
        if max_size is None:  # TCP
            return response.to_wire(max_size=65535)
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            response = dns.message.make_response(query)
            response.flags |= dns.flags.TC
            return response.to_wire()

    def _resolve(self, query: dns.message.Message, name: str, rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags &= ~dns.flags.RA
        if _under(name, self.data.servfail):
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if _under(name, self.data.yxdomain):
            response.set_rcode(dns.rcode.YXDOMAIN)
            return response
        if _under(name, self.data.bogus_nxdomain):
            response.set_rcode(dns.rcode.NXDOMAIN)  # and no SOA: nothing vouches for it
            return response
        apexes = [z for z in self.data.zones if name == _norm(z) or name.endswith("." + _norm(z))]
        if not apexes:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        apex_key = max(apexes, key=len)  # the most specific zone
        apex = _norm(apex_key)
        zone = {_norm(owner): records for owner, records in self.data.zones[apex_key].items()}
        response.flags |= dns.flags.AA
        matching = [(ttl, text) for t, ttl, text in zone.get(name, []) if dns.rdatatype.from_text(t) == rdtype]
        if matching:
            rrset = dns.rrset.from_text_list(
                name + ".", min(ttl for ttl, _ in matching), "IN", rdtype, [text for _, text in matching]
            )
            response.answer.append(rrset)
            return response
        exists = name == apex or any(owner == name or owner.endswith("." + name) for owner in zone)
        if not exists:
            response.set_rcode(dns.rcode.NXDOMAIN)
        negative = self.data.negative_ttl
        response.authority.append(
            dns.rrset.from_text(
                apex + ".",
                negative,
                "IN",
                "SOA",
                f"ns.{apex}. hostmaster.{apex}. 1 3600 600 86400 {negative}",
            )
        )
        return response

    # ---- transports -----------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                reply = await self.answer(await reader.readexactly(length), None)
                if reply is not None:
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # not a subclass in CPython 3.11

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.server._spawn(self._reply(data, addr))

    async def _reply(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        try:
            query = dns.message.from_wire(data)
            max_size = max(512, query.payload) if query.edns >= 0 else 512
        except dns.exception.DNSException:
            return
        reply = await self.server.answer(data, max_size)
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)
