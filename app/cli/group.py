"""The group verbs of `molink`: ``master``, ``group create|code|members|remove``, ``join``, ``api-key``.

Contract: each command takes the parsed arguments (:func:`app.cli._parser`) and the control
channel (:class:`app.cli.command.Supervision`) and returns its exit code, or the coroutine function
that :func:`app.cli.main` runs until it ends, Ctrl-C or SIGTERM.  A bad setting raises
``ValueError`` (one line, exit 2); an admin call or a join that the group refuses prints one
line and exits 1.  The masters' settings become a :class:`~master_core.config.MasterConfig`;
the group itself (its folder, pairing, admin calls) is :mod:`app.group.client`, imported only here
inside the command that needs it, as the engine modules are.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from master_core.config import MasterConfig

if TYPE_CHECKING:
    from .command import Run, Supervision


def _config_dir() -> Path:
    import platformdirs

    return platformdirs.user_config_path("molink")


def master(args: argparse.Namespace, sup: Supervision) -> Run:
    from master_core.secrets_store import load_api_key
    from master_core.server import run_master
    from worker_core.address import is_loopback

    key = args.api_key or (None if is_loopback(args.host) else load_api_key(_config_dir()))
    cfg = MasterConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        min_workers=args.min_workers,
        capacity_wait=args.capacity_wait,
        quantize=args.quantize,
        speculative=args.speculative,
        draft_model=args.draft_model,
        api_key=key,
        allowed_hosts=tuple(args.allow_host),
        relay=args.relay or "",
    )
    cfg.validate()
    return lambda: run_master(cfg, control=sup.control, events=sup.events)


def api_key(args: argparse.Namespace, sup: Supervision) -> int:
    from master_core.secrets_store import create_api_key, load_api_key

    if args.new:
        key, where = create_api_key(_config_dir())
        print(f"{key}\n(stored in {where})")
        return 0
    key = load_api_key(_config_dir())
    if key is None:
        print("molink: no API key stored; make one with `molink api-key --new`", file=sys.stderr)
        return 1
    print(key)
    return 0


def group_create(args: argparse.Namespace, sup: Supervision) -> Run:
    from app.group import client as group

    cfg = MasterConfig(
        model=args.model,
        port=args.api_port,
        min_workers=args.min_workers,
        capacity_wait=args.capacity_wait,
        quantize=args.quantize,
        speculative=args.speculative,
        draft_model=args.draft_model,
        data_dir=str(group.data_dir(args.data_dir)),
        group_host=args.host,
        group_port=args.port,
        group_name=args.name,
        relay=args.relay or "",
        port_mapping=args.port_mapping,
    )
    cfg.validate()
    return lambda: group.create(cfg, sup.control, sup.events)


def _admin(args: argparse.Namespace, show: Callable[[Path], None]) -> int:
    """Run one admin call against the group master of ``--data-dir``; its failure is one line."""
    from app.group import client as group

    try:
        show(group.data_dir(args.data_dir))
    except group.GroupCommandError as e:
        print(f"molink: {e}", file=sys.stderr)
        return 1
    return 0


def group_code(args: argparse.Namespace, sup: Supervision) -> int:
    from app.group import client as group

    def show(folder: Path) -> None:
        answer = group.admin(folder, "POST", "/admin/code")
        print(f"Pairing code: {answer['code']}")
        if answer.get("candidates"):
            print(f"Join link: {group.invitation_link(answer['code'], answer.get('group'), answer['candidates'])}")
            print(f"  ({answer.get('reach')})")
        print(f"  (single use, valid {int(answer['expires_in']) // 60} minutes)")

    return _admin(args, show)


def group_members(args: argparse.Namespace, sup: Supervision) -> int:
    from app.group import client as group

    def show(folder: Path) -> None:
        info = group.admin(folder, "GET", "/admin/members")
        print(f"group {info['group']!r}: {len(info['members'])} member(s)")
        for m in info["members"]:
            online = "connected" if m["connected"] else "offline"
            print(f"  {m['name']:<24} {online:<10} certificate {m['fingerprint'][:16]}")
            if m.get("worker"):
                print(f"    {group.describe_worker(m['worker'])}")

    return _admin(args, show)


def group_remove(args: argparse.Namespace, sup: Supervision) -> int:
    from app.group import client as group

    def show(folder: Path) -> None:
        group.admin(folder, "DELETE", f"/admin/members/{args.member}")
        print(f"removed {args.member}: its certificate is no longer accepted")

    return _admin(args, show)


def join(args: argparse.Namespace, sup: Supervision) -> Run:
    from app.group import client as group

    async def joining() -> int:
        try:
            print(await group.join(args.code, args.master, group.data_dir(args.data_dir), args.name, args.relay))
            return 0
        except group.GroupCommandError as e:
            print(f"molink: cannot join: {e}", file=sys.stderr)
            return 1

    return joining
