"""The command line's group verbs: create a group, hand out codes, list and remove members, join.

Contract
--------
``data_dir(arg)`` is the folder holding this machine's identity, group state and weight cache
(``--data-dir``, default the user data folder).  ``create(cfg, control=None, events=None)`` runs
a paired master until cancelled (or, supervised, until a control command: see
:mod:`worker_core.control`) and prints ``Pairing code: <code>`` once it listens (supervised:
it also emits the ``listening`` event, and ``stopping`` when it stops).  ``admin(data_dir, method,
path)`` calls the running master's admin API with the token it wrote to ``admin.json``.
``join(code, master, data_dir, name)`` pairs this machine and saves the membership.  Every
failure is a :class:`GroupCommandError` with one line for the user.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path


class GroupCommandError(Exception):
    """One line for the user; the command exits non-zero."""


def data_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg).expanduser().resolve()
    import platformdirs

    return platformdirs.user_data_path("molink")


async def create(cfg, control=None, events=None) -> int:  # MasterConfig, control.Control | None, control.Events | None
    from master_core.server import Master, serve_until_stopped
    from worker_core.control import Events

    events = events or Events()
    master = Master(cfg)
    await master.start()
    events.emit("listening", **master.listening_info())
    try:
        gp = master.group_port
        print(f"Group {master.members.group!r}: {len(master.members.members())} member(s); model {master.model_id}", flush=True)
        print(f"Group port {cfg.group_host}:{gp.port if gp else '?'}; API http://{cfg.host}:{master.port}/v1; dashboard {master.dashboard_url}", flush=True)
        print(f"Pairing code: {master.new_code()}", flush=True)
        print("  (single use, valid 5 minutes; on another machine: molink join CODE; another code: molink group code)", flush=True)
        await serve_until_stopped(control)
    finally:
        events.emit("stopping")
        await master.stop()
    return 0


def admin(folder: Path, method: str, path: str) -> dict:
    try:
        info = json.loads((folder / "admin.json").read_text())
        url, token = f"http://{info['api']}{path}", str(info["token"])
    except (OSError, ValueError, KeyError):
        raise GroupCommandError(f"no running group master found in {folder} (start one with `molink group create`)") from None
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            reason = json.loads(e.read()).get("error")
        except ValueError:
            reason = None
        message = reason.get("message") if isinstance(reason, dict) else reason
        raise GroupCommandError(str(message or f"the master answered HTTP {e.code}")) from None
    except (urllib.error.URLError, OSError) as e:
        raise GroupCommandError(f"the group master in {folder} is not running ({getattr(e, 'reason', e)})") from None


def describe_worker(w: dict) -> str:
    """One line of what a connected worker announced (a row of the master's ``describe()``)."""
    gpu = f", compute {w['compute_capability']}, driver {w['driver']}" if w.get("compute_capability") else ""
    link = f"{w['rtt_ms']:.1f} ms" + (f", {w['link_mbps']:.0f} Mbit/s" if w.get("link_mbps") else "") if w.get("rtt_ms") else "not measured"
    layers = f"layers [{w['layers'][0]}, {w['layers'][1]})" if w.get("layers") else f"no layers ({w.get('standby') or 'not placed yet'})"
    return (
        f"{w['device_name']} ({w['device']}{gpu}), {w['free_memory'] / 1e9:.1f} GB offered, "
        f"{w['gflops']:.0f} GFLOP/s, RAM {w['ram_total'] / 1e9:.0f} GB, {w['cpu_cores']} cores; link {link}; {layers}"
    )


async def join(code: str, master: str | None, folder: Path, name: str | None) -> str:
    joined = await pair_with_group(code, master, folder, name)
    joined.save(folder)
    return (
        f"Joined group {joined.group!r} as {joined.name!r} (master {joined.master_address}). "
        f"Share your GPU with: molink worker --data-dir {folder}"
    )


async def pair_with_group(code: str, master: str | None, folder: Path, name: str | None):  # -> JoinedGroup
    """Pair with the master at ``master`` (HOST:PORT) or, when None, each master found on the
    LAN by mDNS in turn; return the membership (not yet saved).  This machine's identity is
    made in ``folder`` on first use."""
    from worker_core.identity import load_or_create
    from worker_core.pairing import PairingError, join as pair, parse_code

    try:
        parse_code(code)
        identity = await asyncio.to_thread(load_or_create, folder / "identity", name or socket.gethostname())
        if master:
            host, port = _host_port(master)
            candidates = [([host], port, "")]
        else:
            from worker_core.discovery import browse

            candidates = await browse(3.0)
            if not candidates:
                raise GroupCommandError("no MoLink group found on this network by mDNS; give --master HOST:PORT")
        last: Exception | None = None
        for addresses, port, _group in candidates:
            for host in addresses:
                try:
                    return await pair(host, port, code, name or socket.gethostname(), identity.cert_pem)
                except PairingError as e:
                    last = e
                    if "cannot pair with" in str(e):
                        continue  # unreachable address: try the next one
                    if "no such pairing code" in str(e):
                        break  # another group's master: try the next master
                    raise
        raise GroupCommandError(str(last) if last else "no master answered")
    except PairingError as e:
        raise GroupCommandError(str(e)) from None


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise GroupCommandError(f"--master must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)
