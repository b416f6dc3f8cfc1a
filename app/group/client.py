"""The command line's group verbs: create a group, hand out codes, list and remove members, join.

Contract
--------
``data_dir(arg)`` is the folder holding this machine's identity, group state and weight cache
(``--data-dir``, default the user data folder).  ``create(cfg, control=None, events=None)`` runs
a paired master until cancelled (or, supervised, until a control command: see
:mod:`worker_core.control`) and prints ``Pairing code: <code>`` once it listens (supervised:
it also emits the ``listening`` event, and ``stopping`` when it stops).  ``admin(data_dir, method,
path)`` calls the running master's admin API with the token it wrote to ``admin.json``.
``join(code, master, data_dir, name)`` pairs this machine (:func:`pair_with_group`, whose
failures are typed: :class:`BadAddress`, :class:`NoGroupFound`, a
:class:`~worker_core.pairing.PairingError` subclass), or through a relay by the code alone
(:func:`pair_through_relay`), and saves the membership.  Every failure
of ``admin`` and ``join`` is a :class:`GroupCommandError` with one line for the user.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from worker_core.pairing import PairingError

if TYPE_CHECKING:
    from master_core.config import MasterConfig
    from worker_core.control import Control, Events
    from worker_core.pairing import JoinedGroup


class GroupCommandError(Exception):
    """One line for the user; the command exits non-zero."""


class BadAddress(GroupCommandError):
    """A master address that is not HOST:PORT."""


class NoGroupFound(GroupCommandError):
    """No master found on the LAN (mDNS) to pair with."""


BROWSE_SECONDS = 3.0  # how long `join` without --master listens for masters on the LAN


def data_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg).expanduser().resolve()
    import platformdirs

    return platformdirs.user_data_path("molink")


async def create(cfg: MasterConfig, control: Control | None = None, events: Events | None = None) -> int:
    from master_core.invitations import TTL
    from master_core.server import Master, serve_until_stopped
    from worker_core.address import format_address
    from worker_core.control import Events

    events = events or Events()
    master = Master(cfg)
    await master.start()
    events.emit("listening", **master.listening_info())
    try:
        gp = master.group_port
        print(
            f"Group {master.members.group!r}: {len(master.members.members())} member(s); model {master.model_id}",
            flush=True,
        )
        api = f"http://{cfg.host}:{master.port}/v1"
        print(
            f"Group port {format_address(cfg.group_host, gp.port) if gp else '?'}; API {api}; "
            f"dashboard {master.dashboard_url}",
            flush=True,
        )
        code = master.new_code()
        reach = master.reach
        print(f"Pairing code: {code}", flush=True)
        if reach is not None:
            texts = [c.to_text() for c in reach.candidates()]
            print(f"Join link: {invitation_link(code, master.members.group, texts)}", flush=True)
            print(f"  ({reach.summary()})", flush=True)
        print(
            f"  (single use, valid {TTL / 60:.0f} minutes; on another machine: molink join CODE or LINK; "
            "another code: molink group code)",
            flush=True,
        )
        if cfg.relay:
            print(f"  from another network: molink join CODE --relay {cfg.relay}", flush=True)
        await serve_until_stopped(control)
    finally:
        events.emit("stopping")
        await master.stop()
    return 0


def invitation_link(code: str, group: str | None, candidates: list[str]) -> str:
    """The ``molink://join`` link of ``code``: ``master=`` is the address a friend elsewhere can
    dial when there is one (a mapped port), else the first LAN address (what old clients read;
    never the relay); ``via=`` lists every candidate, the relay among them."""
    from worker_core.candidates import Kind, ordered, parse_candidate_text

    from .links import JoinLink, build_link

    via = ordered(parse_candidate_text(",".join(candidates)))
    outside = [c for c in via if c.kind in (Kind.MAPPED, Kind.IPV6)]
    direct = [c for c in via if c.kind is not Kind.RELAY]  # a relay is never dialled as the master itself
    first = (outside or direct or [None])[0]
    return build_link(JoinLink(code=code, master=first.address if first else None, group=group or None, via=tuple(via)))


def admin(folder: Path, method: str, path: str) -> dict:
    try:
        info = json.loads((folder / "admin.json").read_text())
        url, token = f"http://{info['api']}{path}", str(info["token"])
    except (OSError, ValueError, KeyError):
        raise GroupCommandError(
            f"no running group master found in {folder} (start one with `molink group create`)"
        ) from None
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:  # every error of the master is OpenAI-shaped: {"error": {"message": ...}}
            error = json.loads(e.read()).get("error")
        except (ValueError, AttributeError):
            error = None
        message = error.get("message") if isinstance(error, dict) else None
        raise GroupCommandError(str(message or f"the master answered HTTP {e.code}")) from None
    except (urllib.error.URLError, OSError) as e:
        raise GroupCommandError(f"the group master in {folder} is not running ({getattr(e, 'reason', e)})") from None


def describe_worker(w: dict) -> str:
    """One line of what a connected worker announced (a row of the master's ``describe()``)."""
    gpu = f", compute {w['compute_capability']}, driver {w['driver']}" if w.get("compute_capability") else ""
    measured = (
        f"{w['rtt_ms']:.1f} ms" + (f", {w['link_mbps']:.0f} Mbit/s" if w.get("link_mbps") else "")
        if w.get("rtt_ms")
        else "not measured"
    )
    link = f"{w['path']}, {measured}" if w.get("path") else measured
    stored = (
        f" at {w['precision']}, {w['weight_bytes'] / 1e9:.2f} GB of weights"
        if w.get("precision") and w.get("weight_bytes")
        else ""
    )
    layers = (
        f"layers [{w['layers'][0]}, {w['layers'][1]}){stored}"
        if w.get("layers")
        else f"no layers ({w.get('standby') or 'not placed yet'})"
    )
    hop = f"; hop on: {w['next_hop']}" if w.get("next_hop") else ""
    return (
        f"{w['device_name']} ({w['device']}{gpu}), {w['free_memory'] / 1e9:.1f} GB offered, "
        f"{w['gflops']:.0f} GFLOP/s, RAM {w['ram_total'] / 1e9:.0f} GB, {w['cpu_cores']} cores; link {link}; {layers}"
        f"{hop}"
    )


async def join(code: str, master: str | None, folder: Path, name: str | None, relay: str | None = None) -> str:
    """Pair (see :func:`pair_with_group`, or :func:`pair_through_relay` when ``relay`` is given and
    ``master`` is not) and save the membership; every failure is a :class:`GroupCommandError`
    carrying the pairing error's message."""
    try:
        joined = await pair(code, master, folder, name, relay)
    except PairingError as e:
        raise GroupCommandError(str(e)) from e
    joined.save(folder)
    where = f"master {joined.master_address}" if joined.master_host else f"through relay {joined.relay}"
    return (
        f"Joined group {joined.group!r} as {joined.name!r} ({where}). "
        f"Share your GPU with: molink worker --data-dir {folder}"
    )


async def pair(code: str, master: str | None, folder: Path, name: str | None, relay: str | None = None) -> JoinedGroup:
    """The membership of a pairing (not yet saved): by the code's nameplate at ``relay`` when a
    relay is given for a plain code and no ``master`` (:func:`pair_through_relay`), else
    :func:`pair_with_group` (a link's addresses raced, the relay among them; ``master``; or the LAN)."""
    if relay and not master and not code.strip().lower().startswith("molink:"):
        return await pair_through_relay(code, relay, folder, name)
    return await pair_with_group(code, master, folder, name, relay)


async def pair_through_relay(code: str, relay: str, folder: Path, name: str | None) -> JoinedGroup:
    """Pair with the group whose open code this is, found at ``relay`` by the code's nameplate
    (the PAKE authenticates the master as over a direct connection).  The membership knows no
    direct address of the master (``master_host`` empty): its worker goes through the relay."""
    import dataclasses

    from worker_core.bridge_dial import BridgeForwarder
    from worker_core.identity import load_or_create
    from worker_core.pairing import Unreachable, parse_code
    from worker_core.pairing import join as pair

    nameplate, _ = parse_code(code)
    try:
        forwarder = BridgeForwarder(relay, nameplate=nameplate)
    except ValueError as e:
        raise BadAddress(str(e)) from None
    identity = await asyncio.to_thread(load_or_create, folder / "identity", name or socket.gethostname())
    async with forwarder:
        try:
            joined = await pair("127.0.0.1", forwarder.port, code, name or socket.gethostname(), identity.cert_pem)
        except Unreachable:
            if forwarder.last_error:  # the relay's own reason says more than a closed local connection
                raise Unreachable(f"cannot pair through relay {relay}: {forwarder.last_error}") from None
            raise
    return dataclasses.replace(joined, master_host="", master_port=0, relay=joined.relay or relay)


async def pair_with_group(
    code: str, master: str | None, folder: Path, name: str | None, relay: str | None = None
) -> JoinedGroup:
    """Pair with the master at ``master`` (HOST:PORT), or at the addresses of a join link given
    as ``code`` (raced: the first to complete a TLS handshake carries the one pairing exchange,
    so racing burns no attempt; a ``relay`` candidate, or ``relay`` given beside a link, is
    dialled through the relay by the code's nameplate and, when it wins, the pairing runs
    through it: :func:`pair_through_relay`), or, when neither, each master found on the LAN by mDNS in
    turn; return the membership (not yet saved).  This machine's identity is made in ``folder``
    on first use.  Raises :class:`BadAddress`, :class:`NoGroupFound`, or the
    :class:`~worker_core.pairing.PairingError` subclass of the last failure (an unreachable
    address moves on to the master's next address, an unknown code to the next master)."""
    from worker_core.identity import load_or_create
    from worker_core.pairing import UnknownCode, Unreachable, parse_code
    from worker_core.pairing import join as pair

    via: list = []
    if code.strip().lower().startswith("molink:"):
        from .links import parse_link

        try:
            link = parse_link(code)
        except ValueError as e:
            raise BadAddress(str(e)) from None
        code, via = link.code, list(link.via)
        if link.master and not master and not via:
            master = link.master
    nameplate, code = parse_code(code)
    if via and relay:
        from worker_core.candidates import Candidate, Kind

        try:
            via.append(Candidate(Kind.RELAY, *_host_port(relay)))
        except ValueError as e:
            raise BadAddress(f"--relay: {e}") from None
    identity = await asyncio.to_thread(load_or_create, folder / "identity", name or socket.gethostname())
    if via and not master:
        from worker_core.candidates import Kind

        chosen = await _race_pairing(via, nameplate)
        if chosen.kind is Kind.RELAY:
            return await pair_through_relay(code, chosen.address, folder, name)
        return await pair(chosen.host, chosen.port, code, name or socket.gethostname(), identity.cert_pem)
    if master:
        host, port = _host_port(master)
        candidates = [([host], port, "")]
    else:
        from worker_core.discovery import browse

        candidates = await browse(BROWSE_SECONDS)
        if not candidates:
            raise NoGroupFound("no MoLink group found on this network by mDNS; give --master HOST:PORT")
    last: PairingError | None = None
    for addresses, port, _group in candidates:
        for host in addresses:
            try:
                return await pair(host, port, code, name or socket.gethostname(), identity.cert_pem)
            except Unreachable as e:
                last = e  # this address: try the master's next one
            except UnknownCode as e:
                last = e  # another group's master: try the next master
                break
    raise last if last is not None else NoGroupFound("no master answered")


async def _race_pairing(via: list, nameplate: str):  # -> Candidate
    """The first candidate whose TLS handshake (pairing context) completes; nothing is sent on it
    (the pairing exchange then runs on one connection only).  A relay candidate is dialled
    through the relay by ``nameplate`` (the code's first two digits), its TLS over the splice."""
    from worker_core.bridge_dial import open_bridged_tls
    from worker_core.candidates import DIAL_TIMEOUT, Kind, NoPath, race
    from worker_core.identity import pairing_client_context
    from worker_core.pairing import PAIR_SNI, Unreachable

    ctx = pairing_client_context()

    async def handshake(c):  # noqa: ANN001, ANN202 - Candidate -> StreamWriter
        if c.kind is Kind.RELAY:
            _r, writer = await open_bridged_tls(c.address, ctx, PAIR_SNI, nameplate=nameplate, timeout=DIAL_TIMEOUT)
            return writer
        _r, writer = await asyncio.open_connection(c.host, c.port, ssl=ctx, server_hostname=PAIR_SNI)
        return writer

    try:
        chosen, writer = await race(via, handshake, discard=lambda w: w.close())
    except NoPath as e:
        raise Unreachable(f"cannot reach the group's master: {e}"[:300]) from None
    writer.close()
    return chosen


def _host_port(text: str) -> tuple[str, int]:
    from worker_core.address import parse_address

    try:
        return parse_address(text)
    except ValueError:
        raise BadAddress(f"--master must be HOST:PORT ([v6]:PORT for IPv6), got {text!r}") from None
