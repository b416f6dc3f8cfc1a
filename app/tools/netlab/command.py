"""``molink lab``: drive the network lab from a shell.

Contract
--------
``add_parser(sub)`` adds ``lab up NAME --topology T [--mbps M] [--delay-ms D]``, ``lab run NAME
HOST -- CMD...`` (any program, in HOST's namespace, its exit code passed on), ``lab down NAME``
and ``lab list`` (topologies, and the labs that are up) to the ``molink`` parser.  ``up`` leaves
the lab up after it returns (its state file lets ``run`` and ``down`` find it from any
process) and prints every host's address; every failure is one line on stderr and exit 1.
The lab itself is :mod:`app.tools.netlab.lab`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("lab", help="the network lab: homes, NAT routers, UPnP, shaped links (Linux, root)")
    verbs = lab.add_subparsers(dest="lab_command", required=True)
    up = verbs.add_parser("up", help="build a lab of network namespaces and leave it up")
    up.add_argument("name", help="the lab's name (lower-case letters and digits, up to 10)")
    up.add_argument("--topology", default="upnp", help="one of `molink lab list` (default %(default)s)")
    up.add_argument("--mbps", type=float, default=None, help="shape every internet link to this rate, both ways")
    up.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added to TCP leaving each home")
    up.add_argument("--congestion", default="cubic", help="every host's TCP congestion control (default %(default)s)")
    up.set_defaults(func=_up, quiet=True)
    run = verbs.add_parser("run", help="run any program on a host of a lab: molink lab run NAME HOST -- CMD...")
    run.add_argument("name")
    run.add_argument("host")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the program and its arguments (after --)")
    run.set_defaults(func=_run, quiet=True)
    down = verbs.add_parser("down", help="remove a lab: every process in it, then its namespaces")
    down.add_argument("name")
    down.set_defaults(func=_down, quiet=True)
    ls = verbs.add_parser("list", help="the topologies, and the labs that are up")
    ls.set_defaults(func=_list, quiet=True)


def _up(args: argparse.Namespace, _sup: object) -> int:
    from .lab import Lab, LabError

    try:
        lab = Lab.up(
            args.name, args.topology, mbps=args.mbps, delay_ms=args.delay_ms, owner=False, congestion=args.congestion
        )
    except LabError as e:
        print(f"molink: lab: {e}", file=sys.stderr)
        return 1
    print(f"lab {args.name!r} is up ({args.topology}); hosts:")
    for node, ns in lab.state["namespaces"].items():
        v6 = lab.address6(node)
        print(f"  {node:<8} {lab.state['kinds'][node]:<9} {lab.state['addresses'].get(node) or '':<15} "
              f"{v6 or '':<22} netns {ns}")  # fmt: skip
    print(f"run a program: molink lab run {args.name} HOST -- CMD...; remove: molink lab down {args.name}")
    return 0


def _run(args: argparse.Namespace, _sup: object) -> int:
    from .lab import Lab, LabError

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("molink: lab run NAME HOST -- CMD...: no command given", file=sys.stderr)
        return 2
    try:
        argv = Lab.attach(args.name).argv(args.host, cmd)
    except LabError as e:
        print(f"molink: lab: {e}", file=sys.stderr)
        return 1
    return subprocess.call(argv)


def _down(args: argparse.Namespace, _sup: object) -> int:
    from .lab import LabError, down

    try:
        removed = down(args.name)
    except LabError as e:
        print(f"molink: lab: {e}", file=sys.stderr)
        return 1
    print(f"lab {args.name!r} {'removed' if removed else 'was not up'}")
    return 0


def _list(_args: argparse.Namespace, _sup: object) -> int:
    from .lab import labs
    from .topology import TOPOLOGIES

    for name, topo in TOPOLOGIES.items():
        print(f"  {name:<10} {topo.about}")
    print("up: " + (", ".join(labs()) or "none"))
    return 0
