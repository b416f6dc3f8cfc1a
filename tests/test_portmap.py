"""Port mapping against fake routers on 127.0.0.1: NAT-PMP and PCP answers good, bad and nonsensical;
renewal at half the lease, removal on stop, the external address checked.  (The real router,
miniupnpd, is in tests/test_lab.py.)"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from worker_core.address import BadAddress, format_address, parse_address
from worker_core.candidates import Candidate, Kind, NoPath, parse_candidate_text, race
from worker_core.portmap import PortMapper, natpmp, pcp
from worker_core.portmap.errors import Nonsense, Refused
from worker_core.portmap.pinhole import Pinholer


def sync(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def run(*args: Any, **kw: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kw), 30))

    return run


class FakeRouter(asyncio.DatagramProtocol):
    """Answers NAT-PMP and PCP on 127.0.0.1 as ``mode`` says; records every request."""

    def __init__(self, mode: str, external: str = "25.1.2.3", lifetime: int = 3600) -> None:
        self.mode = mode
        self.external = external
        self.lifetime = lifetime
        self.requests: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.requests.append(data)
        answer = self.answer(data)
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)

    def answer(self, data: bytes) -> bytes | None:
        if self.mode == "garbage":
            return b"\x07\x07\x07"
        if self.mode == "silent":
            return None
        if data[0] == 2:  # PCP
            if self.mode == "natpmp-only":
                return struct.pack("!BBHI", 0, 0x80 | data[1], 1, 0)  # NAT-PMP: unsupported version
            if data[1] == 0:  # ANNOUNCE: the common header alone
                return struct.pack("!BBBBII", 2, 0x80, 0, 0, 0, 1) + bytes(12)
            nonce, internal, suggested = data[24:36], *struct.unpack_from("!HH", data, 40)
            lifetime = struct.unpack_from("!I", data, 4)[0]
            if self.mode == "pcp-refuse" or (self.mode == "pcp-refuse-delete" and lifetime == 0):
                code = 2 if self.mode == "pcp-refuse-delete" else 8  # NOT_AUTHORIZED, NO_RESOURCES
                return struct.pack("!BBBBII", 2, 0x81, 0, code, 0, 0) + bytes(12) + bytes(36)
            if self.mode == "pcp-wrong-port":
                internal += 1
            client = ipaddress.IPv6Address(data[8:24])
            # an IPv6 client's pinhole opens its own address (RFC 6887 section 11); IPv4 is NATed
            ext = (
                client.packed if client.ipv4_mapped is None else ipaddress.IPv6Address(f"::ffff:{self.external}").packed
            )
            head = struct.pack("!BBBBII", 2, 0x81, 0, 0, min(lifetime, self.lifetime), 1) + bytes(12)
            return head + nonce + struct.pack("!B3xHH", 6, internal, suggested or internal) + ext
        if data[1] == 0:  # NAT-PMP external address
            return struct.pack("!BBHI", 0, 128, 0, 1) + ipaddress.IPv4Address(self.external).packed
        if data[1] == 2:
            _, _, _, internal, suggested, lifetime = struct.unpack("!BBHHHI", data)
            if self.mode == "natpmp-refuse":
                return struct.pack("!BBHIHHI", 0, 130, 2, 1, internal, 0, 0)
            return struct.pack("!BBHIHHI", 0, 130, 0, 1, internal, suggested, min(lifetime, self.lifetime))
        return None


async def _router(mode: str, **kw: object) -> tuple[FakeRouter, int, asyncio.DatagramTransport]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: FakeRouter(mode, **kw),
        local_addr=("127.0.0.1", 0),
    )
    return proto, transport.get_extra_info("sockname")[1], transport


def _mapper(port: int, **kw: object) -> PortMapper:
    return PortMapper(7733, gateway="127.0.0.1", udp_port=port, protocols=("pcp", "nat-pmp"), **kw)


@sync
async def test_pcp_maps_renews_at_half_lease_and_removes_on_stop() -> None:
    router, port, transport = await _router("good", lifetime=2)
    try:
        mapper = _mapper(port)
        m = await mapper.start()
        assert m is not None and m.protocol == "pcp" and m.external_host == "25.1.2.3" and m.external_port == 7733
        assert m.lifetime == 2 and m.reachable
        pcp_requests = lambda: [r for r in router.requests if r[0] == 2]  # noqa: E731
        first = len(pcp_requests())
        await asyncio.sleep(1.6)  # renewal at half of 2 s
        assert len(pcp_requests()) > first
        await mapper.stop()
        last = pcp_requests()[-1]
        assert struct.unpack_from("!I", last, 4)[0] == 0  # lifetime 0: delete
    finally:
        transport.close()


@sync
async def test_natpmp_router_without_pcp() -> None:
    router, port, transport = await _router("natpmp-only")
    try:
        mapper = _mapper(port)
        m = await mapper.start()
        assert m is not None and m.protocol == "nat-pmp" and m.external_host == "25.1.2.3"
        await mapper.stop()
        assert router.requests[-1][1] == 2 and struct.unpack("!I", router.requests[-1][-4:])[0] == 0
    finally:
        transport.close()


@sync
async def test_private_external_address_is_not_reachable() -> None:
    _router_, port, transport = await _router("good", external="100.64.3.4")
    try:
        mapper = _mapper(port)
        m = await mapper.start()
        assert m is not None and not m.reachable  # another NAT in front of the router
        await mapper.stop()
    finally:
        transport.close()


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        ("garbage", "malformed"),
        ("silent", "no answer"),
        ("pcp-refuse", "NO_RESOURCES"),
        ("pcp-wrong-port", "answer for protocol 6 port 7734"),
    ],
)
@sync
async def test_bad_routers_fail_clearly(mode: str, words: str) -> None:
    _r, port, transport = await _router(mode)
    try:
        mapper = PortMapper(7733, gateway="127.0.0.1", udp_port=port, protocols=("pcp",))
        assert await mapper.start() is None
        assert words.lower() in mapper.failure.lower()
        await mapper.stop()  # nothing to remove: returns at once
    finally:
        transport.close()


@sync
async def test_natpmp_refusal_carries_its_code() -> None:
    _r, port, transport = await _router("natpmp-refuse")
    try:
        with pytest.raises(Refused) as e:
            await natpmp.map_tcp("127.0.0.1", 7733, 7733, 60, port=port)
        assert e.value.code == 2
    finally:
        transport.close()


def test_pcp_answer_checks() -> None:
    nonce = bytes(range(12))
    good = FakeRouter("good").answer(pcp.request("192.168.1.5", 7733, 7733, 60, nonce))
    assert good is not None
    assert pcp.parse(good, 7733, nonce) == pcp.Lease("25.1.2.3", 7733, 60)
    assert pcp.parse(good, 7733, bytes(12)) is None  # another nonce: not ours
    with pytest.raises(Nonsense):
        pcp.parse(good[:40], 7733, nonce)
    with pytest.raises(Nonsense):
        pcp.parse(good, 7734, nonce)


def test_one_address_parser() -> None:
    assert parse_address("192.168.1.20:7733") == ("192.168.1.20", 7733)
    assert parse_address("[2001:db8::5]:7733") == ("2001:db8::5", 7733)
    assert parse_address("[fe80::1%eth0]:1") == ("fe80::1%eth0", 1)
    assert parse_address("Host.Example:80") == ("host.example", 80)
    for bad in ("2001:db8::5:7733", "host", "host:0", "host:65536", "[::1]", "a b:1", "[nothost]:5", "1.2.3.999:1"):
        with pytest.raises(BadAddress):
            parse_address(bad)
    assert format_address("2001:db8::5", 7733) == "[2001:db8::5]:7733"
    assert format_address("10.0.0.1", 1) == "10.0.0.1:1"


def test_candidate_text_round_trip() -> None:
    cs = [Candidate(Kind.LAN, "192.168.1.2", 7733), Candidate(Kind.MAPPED, "25.0.0.10", 40000, True),
          Candidate(Kind.IPV6, "2a0f::5", 7733)]  # fmt: skip
    assert parse_candidate_text(",".join(c.to_text() for c in cs)) == cs
    for bad in ("lan", "moon~1.2.3.4:5", "lan~1.2.3.4", "lan~1.2.3.4:5~x"):
        with pytest.raises(ValueError):
            parse_candidate_text(bad)


@sync
async def test_race_prefers_lan_and_discards_losers() -> None:
    lan = Candidate(Kind.LAN, "192.168.1.2", 1)
    mapped = Candidate(Kind.MAPPED, "25.0.0.1", 2)
    relay = Candidate(Kind.RELAY, "25.0.0.9", 3)
    closed: list[str] = []

    async def dial(c: Candidate) -> str:
        if c is lan:
            raise ConnectionRefusedError("no route")
        await asyncio.sleep(0.05)
        return c.kind.value

    got, result = await race([relay, mapped, lan], dial, discard=closed.append, stagger=0.1)
    assert got == mapped and result == "mapped"  # the LAN failed at once; direct starts before the relay
    got, _ = await race([relay, mapped], dial, discard=closed.append, stagger=0.01)
    assert got == mapped  # the first started and done wins; the relay, still dialling, is cancelled
    assert closed == []
    with pytest.raises(NoPath) as e:
        await race([lan], dial)
    assert "no route" in str(e.value)


# ---------------------------------------------------------------- a fake UPnP IGD (HTTP + SOAP)

DESC = """<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><specVersion><major>1</major><minor>0</minor></specVersion>
<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType><friendlyName>fake</friendlyName>
<manufacturer>t</manufacturer><modelName>t</modelName><UDN>uuid:00000000-0000-0000-0000-000000000001</UDN>
<serviceList><service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId><SCPDURL>/scpd.xml</SCPDURL>
<controlURL>/ctl</controlURL><eventSubURL>/evt</eventSubURL></service></serviceList></device></root>"""

_ARGS = {
    "AddPortMapping": [("NewRemoteHost", "in", "RemoteHost"), ("NewExternalPort", "in", "ExternalPort"),
                       ("NewProtocol", "in", "PortMappingProtocol"), ("NewInternalPort", "in", "InternalPort"),
                       ("NewInternalClient", "in", "InternalClient"), ("NewEnabled", "in", "PortMappingEnabled"),
                       ("NewPortMappingDescription", "in", "PortMappingDescription"),
                       ("NewLeaseDuration", "in", "PortMappingLeaseDuration")],
    "DeletePortMapping": [("NewRemoteHost", "in", "RemoteHost"), ("NewExternalPort", "in", "ExternalPort"),
                          ("NewProtocol", "in", "PortMappingProtocol")],
    "GetExternalIPAddress": [("NewExternalIPAddress", "out", "ExternalIPAddress")],
}  # fmt: skip
_VARS = {
    "RemoteHost": "string", "ExternalPort": "ui2", "PortMappingProtocol": "string", "InternalPort": "ui2",
    "InternalClient": "string", "PortMappingEnabled": "boolean", "PortMappingDescription": "string",
    "PortMappingLeaseDuration": "ui4", "ExternalIPAddress": "string",
}  # fmt: skip


def _scpd(actions: dict[str, list[tuple[str, str, str]]], variables: dict[str, str]) -> str:
    """A service description with ``actions`` (argument, direction, state variable) and their variables."""
    return (
        '<?xml version="1.0"?><scpd xmlns="urn:schemas-upnp-org:service-1-0">'
        "<specVersion><major>1</major><minor>0</minor></specVersion><actionList>"
        + "".join(
            f"<action><name>{name}</name><argumentList>"
            + "".join(
                f"<argument><name>{a}</name><direction>{d}</direction>"
                f"<relatedStateVariable>{v}</relatedStateVariable></argument>"
                for a, d, v in args
            )
            + "</argumentList></action>"
            for name, args in actions.items()
        )
        + "</actionList><serviceStateTable>"
        + "".join(
            f'<stateVariable sendEvents="no"><name>{n}</name><dataType>{t}</dataType></stateVariable>'
            for n, t in variables.items()
        )
        + "</serviceStateTable></scpd>"
    )


SCPD = _scpd(_ARGS, _VARS)
ENVELOPE = (
    '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
    's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>{}</s:Body></s:Envelope>'
)


def _fault(code: int, text: str) -> str:
    return ENVELOPE.format(
        "<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
        '<UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        f"<errorCode>{code}</errorCode><errorDescription>{text}</errorDescription></UPnPError></detail></s:Fault>"
    )


async def _fake_igd(external: str, calls: list[tuple[str, str]]):  # -> (runner, url)
    from aiohttp import web

    service = "urn:schemas-upnp-org:service:WANIPConnection:1"

    async def control(request: web.Request) -> web.Response:
        action = request.headers.get("SOAPACTION", "").strip('"').split("#")[-1]
        body = await request.text()
        calls.append((action, body))
        if action == "GetExternalIPAddress":
            answer = f'<u:{action}Response xmlns:u="{service}"><NewExternalIPAddress>{external}</NewExternalIPAddress>'
            return web.Response(text=ENVELOPE.format(answer + f"</u:{action}Response>"), content_type="text/xml")
        if action == "AddPortMapping" and "<NewLeaseDuration>0</NewLeaseDuration>" not in body:
            return web.Response(status=500, text=_fault(725, "OnlyPermanentLeasesSupported"), content_type="text/xml")
        return web.Response(
            text=ENVELOPE.format(f'<u:{action}Response xmlns:u="{service}"></u:{action}Response>'),
            content_type="text/xml",
        )

    async def desc(_request: web.Request) -> web.Response:
        return web.Response(text=DESC, content_type="text/xml")

    async def scpd(_request: web.Request) -> web.Response:
        return web.Response(text=SCPD, content_type="text/xml")

    app = web.Application()
    app.add_routes([web.get("/desc.xml", desc), web.get("/scpd.xml", scpd), web.post("/ctl", control)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/desc.xml"


@sync
async def test_upnp_only_permanent_leases_725_asks_again_with_lease_0() -> None:
    from worker_core.portmap.upnp import Igd

    calls: list[tuple[str, str]] = []
    runner, url = await _fake_igd("25.1.2.3", calls)
    try:
        igd = await Igd.open(url)
        assert await igd.external_address() == "25.1.2.3"
        port, lease = await igd.add("192.168.1.5", 7733, 7733, 3600)
        assert (port, lease) == (7733, 0)  # permanent: the caller still removes it on stop
        adds = [body for action, body in calls if action == "AddPortMapping"]
        assert len(adds) == 2 and "<NewLeaseDuration>3600</NewLeaseDuration>" in adds[0]
        await igd.delete(7733)
        assert calls[-1][0] == "DeletePortMapping"
    finally:
        await runner.cleanup()


@sync
async def test_upnp_nonsense_external_address_is_a_clear_failure() -> None:
    from worker_core.portmap.upnp import Igd

    runner, url = await _fake_igd("not-an-address", [])
    try:
        igd = await Igd.open(url)
        with pytest.raises(Nonsense, match="external address is 'not-an-address'"):
            await igd.external_address()
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- IPv6 pinholes: PCP over IPv6, UPnP IGDv2 firewall

CLIENT6 = "2001:db8:5::10"  # the machine's global IPv6 address the pinhole is for (documentation range)


def test_pcp_ipv6_map_and_announce_encoding() -> None:
    """RFC 6887: the client's IPv6 address as it is (not IPv4-mapped), the suggested external
    address all zeros (``::``), and ANNOUNCE is the 24-byte common header with opcode 0."""
    nonce = bytes(range(12))
    req = pcp.request(CLIENT6, 7733, 7733, 120, nonce)
    assert len(req) == 60 and req[:4] == bytes([2, 1, 0, 0]) and struct.unpack_from("!I", req, 4)[0] == 120
    assert req[8:24] == ipaddress.IPv6Address(CLIENT6).packed
    assert req[24:36] == nonce and req[36] == 6 and struct.unpack_from("!HH", req, 40) == (7733, 7733)
    assert req[44:60] == bytes(16)  # IPv6: "::", not ::ffff:0.0.0.0
    v4 = pcp.request("192.168.1.5", 7733, 7733, 120, nonce)
    assert v4[8:24] == ipaddress.IPv6Address("::ffff:192.168.1.5").packed
    assert v4[44:60] == ipaddress.IPv6Address("::ffff:0.0.0.0").packed
    ann = pcp.announce_request(CLIENT6)
    assert len(ann) == 24 and ann[:8] == bytes([2, 0, 0, 0, 0, 0, 0, 0]) and ann[8:] == req[8:24]
    answer = FakeRouter("good").answer(req)
    assert answer is not None and pcp.parse(answer, 7733, nonce) == pcp.Lease(CLIENT6, 7733, 120)


def _pcp_pinholer(port: int, **kw: Any) -> Pinholer:
    return Pinholer(7733, address=CLIENT6, gateway="127.0.0.1", udp_port=port, protocols=("pcp",), **kw)


@sync
async def test_pcp_pinhole_opens_renews_at_half_lease_and_closes_on_stop() -> None:
    router, port, transport = await _router("good", lifetime=2)
    try:
        holer = _pcp_pinholer(port)
        hole = await holer.start()
        assert hole is not None and (hole.protocol, hole.host, hole.port, hole.lifetime) == ("pcp", CLIENT6, 7733, 2)
        assert router.requests[0][1] == 0  # ANNOUNCE first: a probe that opens nothing
        maps = lambda: [r for r in router.requests if r[1] == 1]  # noqa: E731
        assert len(maps()) == 1 and maps()[0][8:24] == ipaddress.IPv6Address(CLIENT6).packed
        await asyncio.sleep(1.6)  # renewal at half of 2 s: the same MAP again
        assert len(maps()) >= 2 and maps()[-1][24:36] == maps()[0][24:36]
        await holer.stop()
        assert struct.unpack_from("!I", maps()[-1], 4)[0] == 0  # lifetime 0: closed
        assert holer.current is None
    finally:
        transport.close()


@pytest.mark.parametrize(("mode", "words"), [("pcp-refuse", "NO_RESOURCES"), ("silent", "no answer"),
                                             ("garbage", "malformed")])  # fmt: skip
@sync
async def test_pcp_pinhole_refused_or_nonsense_is_a_clear_failure(mode: str, words: str) -> None:
    _r, port, transport = await _router(mode)
    try:
        holer = _pcp_pinholer(port)
        assert await holer.start() is None
        assert holer.failure.startswith("pcp: ") and words.lower() in holer.failure.lower(), holer.failure
        await holer.stop()
    finally:
        transport.close()


@sync
async def test_pcp_pinhole_whose_delete_is_refused_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    """miniupnpd 2.3.1 refuses the delete (NOT_AUTHORIZED) once it renewed the pinhole: stop()
    says so and when the pinhole closes by itself, and returns."""
    _r, port, transport = await _router("pcp-refuse-delete")
    try:
        holer = _pcp_pinholer(port)
        assert await holer.start() is not None
        with caplog.at_level("WARNING", logger="molink.portmap"):
            await holer.stop()
        said = " ".join(r.getMessage() for r in caplog.records)
        assert "NOT_AUTHORIZED" in said and "closes when its lease ends" in said, said
    finally:
        transport.close()


@sync
async def test_no_global_ipv6_address_opens_nothing() -> None:
    holer = Pinholer(7733, address=None, gateway="127.0.0.1", protocols=("pcp",))
    import worker_core.portmap.pinhole as pinhole

    real = pinhole.global_address
    pinhole.global_address = lambda: None  # a machine with IPv4 only
    try:
        assert await holer.start() is None
        assert holer.failure == "this machine has no global IPv6 address (nothing to open)"
    finally:
        pinhole.global_address = real


FW = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"
DESC2 = """<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><specVersion><major>1</major><minor>0</minor></specVersion>
<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:2</deviceType><friendlyName>fake</friendlyName>
<manufacturer>t</manufacturer><modelName>t</modelName><UDN>uuid:00000000-0000-0000-0000-000000000002</UDN>
<serviceList><service><serviceType>{service}</serviceType>
<serviceId>urn:upnp-org:serviceId:X1</serviceId><SCPDURL>/scpd.xml</SCPDURL>
<controlURL>/ctl</controlURL><eventSubURL>/evt</eventSubURL></service></serviceList></device></root>"""
_FW_ARGS = {
    "GetFirewallStatus": [("FirewallEnabled", "out", "FirewallEnabled"),
                          ("InboundPinholeAllowed", "out", "InboundPinholeAllowed")],
    "AddPinhole": [("RemoteHost", "in", "RemoteHost"), ("RemotePort", "in", "RemotePort"),
                   ("InternalClient", "in", "InternalClient"), ("InternalPort", "in", "InternalPort"),
                   ("Protocol", "in", "Protocol"), ("LeaseTime", "in", "LeaseTime"),
                   ("UniqueID", "out", "UniqueID")],
    "UpdatePinhole": [("UniqueID", "in", "UniqueID"), ("NewLeaseTime", "in", "LeaseTime")],
    "DeletePinhole": [("UniqueID", "in", "UniqueID")],
}  # fmt: skip
_FW_VARS = {
    "FirewallEnabled": "boolean", "InboundPinholeAllowed": "boolean", "RemoteHost": "string", "RemotePort": "ui2",
    "InternalClient": "string", "InternalPort": "ui2", "Protocol": "ui2", "LeaseTime": "ui4", "UniqueID": "ui2",
}  # fmt: skip


async def _fake_firewall(calls: list[tuple[str, str]], faults: dict[str, int] | None = None, allowed: str = "1",
                         service: str = FW, uid: str = "7"):  # fmt: skip  # -> (runner, url)
    """An IGDv2 with a WANIPv6FirewallControl (or ``service``) on 127.0.0.1; ``faults``: action -> UPnP error."""
    from aiohttp import web

    async def control(request: web.Request) -> web.Response:
        action = request.headers.get("SOAPACTION", "").strip('"').split("#")[-1]
        calls.append((action, await request.text()))
        if faults and action in faults:
            return web.Response(status=500, text=_fault(faults[action], "Nope"), content_type="text/xml")
        out = {
            "GetFirewallStatus": "<FirewallEnabled>1</FirewallEnabled>"
            f"<InboundPinholeAllowed>{allowed}</InboundPinholeAllowed>",
            "AddPinhole": f"<UniqueID>{uid}</UniqueID>",
        }.get(action, "")  # fmt: skip
        body = f'<u:{action}Response xmlns:u="{FW}">{out}</u:{action}Response>'
        return web.Response(text=ENVELOPE.format(body), content_type="text/xml")

    async def desc(_request: web.Request) -> web.Response:
        return web.Response(text=DESC2.format(service=service), content_type="text/xml")

    async def scpd(_request: web.Request) -> web.Response:
        return web.Response(text=_scpd(_FW_ARGS, _FW_VARS) if service == FW else SCPD, content_type="text/xml")

    app = web.Application()
    app.add_routes([web.get("/desc.xml", desc), web.get("/scpd.xml", scpd), web.post("/ctl", control)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/desc.xml"


@sync
async def test_upnp_pinhole_add_update_at_half_lease_delete_on_stop() -> None:
    calls: list[tuple[str, str]] = []
    runner, url = await _fake_firewall(calls)
    try:
        holer = Pinholer(7733, address=CLIENT6, location=url, protocols=("upnp",), lease=2)
        hole = await holer.start()
        assert hole is not None and (hole.protocol, hole.host, hole.port, hole.uid) == ("upnp", CLIENT6, 7733, 7)
        assert [a for a, _ in calls] == ["GetFirewallStatus", "AddPinhole"]
        add = calls[1][1]
        for field in (f"<InternalClient>{CLIENT6}</InternalClient>", "<InternalPort>7733</InternalPort>",
                      "<Protocol>6</Protocol>", "<LeaseTime>2</LeaseTime>", "<RemotePort>0</RemotePort>"):  # fmt: skip
            assert field in add, add
        await asyncio.sleep(1.6)  # renewal at half of 2 s, by its UniqueID
        assert calls[-1][0] == "UpdatePinhole" and "<UniqueID>7</UniqueID>" in calls[-1][1]
        await holer.stop()
        assert calls[-1][0] == "DeletePinhole" and "<UniqueID>7</UniqueID>" in calls[-1][1]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"faults": {"AddPinhole": 606}}, "error 606 (Nope): action not authorized"),
        ({"faults": {"GetFirewallStatus": 702}}, "error 702 (Nope): the router's IPv6 firewall is disabled"),
        ({"allowed": "0"}, "the router does not allow inbound pinholes"),
        ({"service": "urn:schemas-upnp-org:service:WANIPConnection:1"}, "no IPv6 firewall control"),
        ({"uid": "pinhole"}, "makes no sense"),  # a UniqueID that is no number
    ],
)
@sync
async def test_upnp_pinhole_refusals_are_clear_failures(kw: dict[str, Any], words: str) -> None:
    calls: list[tuple[str, str]] = []
    runner, url = await _fake_firewall(calls, **kw)
    try:
        holer = Pinholer(7733, address=CLIENT6, location=url, protocols=("upnp",))
        assert await holer.start() is None
        assert holer.failure.startswith("upnp: UPnP: ") and words in holer.failure, holer.failure
        await holer.stop()  # nothing opened: nothing to remove
    finally:
        await runner.cleanup()


@sync
async def test_upnp_renewal_704_opens_the_pinhole_again() -> None:
    """The router lost the pinhole (704 NoSuchEntry on UpdatePinhole): it is opened again."""
    calls: list[tuple[str, str]] = []
    runner, url = await _fake_firewall(calls, faults={"UpdatePinhole": 704})
    try:
        changes: list[object] = []
        holer = Pinholer(7733, address=CLIENT6, location=url, protocols=("upnp",), lease=2, on_change=changes.append)
        assert await holer.start() is not None
        await asyncio.sleep(1.6)
        assert [a for a, _ in calls][2:5] == ["UpdatePinhole", "GetFirewallStatus", "AddPinhole"], calls
        assert holer.current is not None and changes == []  # the same pinhole again: no change to hear
        await holer.stop()
    finally:
        await runner.cleanup()


@sync
async def test_both_answer_upnp_opens_the_one_pinhole() -> None:
    """UPnP and PCP probed together; UPnP (a UniqueID to renew and delete by) opens the pinhole
    and PCP is only asked ANNOUNCE: one pinhole, not two."""
    calls: list[tuple[str, str]] = []
    runner, url = await _fake_firewall(calls)
    router, port, transport = await _router("good")
    try:
        holer = Pinholer(7733, address=CLIENT6, location=url, gateway="127.0.0.1", udp_port=port)
        hole = await holer.start()
        assert hole is not None and hole.protocol == "upnp"
        assert [r[1] for r in router.requests] == [0]  # ANNOUNCE only, no MAP
        await holer.stop()
    finally:
        transport.close()
        await runner.cleanup()


def test_the_ipv6_default_router_is_read_from_the_routing_table(tmp_path) -> None:
    from worker_core.portmap.gateway import default_gateway6
    from worker_core.portmap.udp import _same

    table = tmp_path / "ipv6_route"
    zero = "0" * 32
    lines = [
        f"2a0fff00000000100000000000000000 40 {zero} 00 {zero} 00000100 00000001 00000000 00000001 lo",
        f"{zero} 00 {zero} 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 lo",
    ]
    table.write_text("\n".join(lines) + "\n")
    assert default_gateway6(table) == ("fe80::1%lo", socket.if_nametoindex("lo"))  # link-local: with its zone
    table.write_text(lines[1].replace("fe80", "2a0f") + "\n")
    assert default_gateway6(table) == ("2a0f::1", socket.if_nametoindex("lo"))
    table.write_text(lines[0] + "\n" + lines[1].replace("00000003 lo", "00000001 lo") + "\n")  # no RTF_GATEWAY
    assert default_gateway6(table) is None
    assert default_gateway6(tmp_path / "missing") is None
    assert _same("fe80::1%eth0", "fe80::1") and _same("2a0f:0::1", "2a0f::1") and not _same("::1", "::2")
