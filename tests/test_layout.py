"""The import drawing of the code keeps its rooms (tests/import_layout.py, also run by `make lint`).

The real graph has no circle and no arrow a room may not draw; the checker finds a circle, an
arrow back up, a module in no room and lazy or TYPE_CHECKING imports in fabricated code, so a
clean result means something.  And the `molink` parser starts without the heavy tools, a master without
transformers' model code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import import_layout as layout

ROOMS = {"top": ("mid", "low"), "mid": ("low",), "low": ()}


def test_the_code_has_no_circle_and_no_arrow_back_up():
    graph = layout.import_graph()
    assert "app.cli" in graph and "app.runtime.build" in graph and len(graph) > 60
    assert layout.problems(graph) == []


def test_the_graph_holds_the_arrows_the_code_draws():
    graph = layout.import_graph()
    assert "app.cli.command" in graph["app.cli.group"]  # TYPE_CHECKING
    assert "app.runtime.build" in graph["app.proc.spawn"]  # lazy, inside a function
    assert "app.group.client" in graph["app.cli.group"]  # `from app.group import client as group`
    assert "app.tools.bench.options" in graph["app.cli"]


def test_a_circle_is_found():
    graph = {"top.a": {"mid.b"}, "mid.b": {"mid.c"}, "mid.c": {"mid.b"}, "low.d": set()}
    assert layout.circles(graph) == [["mid.b", "mid.c"]]
    assert layout.problems(graph, ROOMS) == ["circle: mid.b <-> mid.c"]
    assert layout.circles({"low.a": {"low.a"}}) == [["low.a"]]  # a module importing itself


def test_an_arrow_back_up_and_a_module_in_no_room_are_found():
    graph = {"top.a": {"low.b"}, "low.b": {"mid.c"}, "mid.c": set(), "side.d": set()}
    assert layout.problems(graph, ROOMS) == [
        "low.b -> mid.c: low may not import mid (see docs/layout.md)",
        "side.d: in no room (add it to ROOMS in tests/import_layout.py and docs/layout.md)",
    ]


def test_the_longest_room_wins():
    rooms = {"pkg": ("pkg.sub",), "pkg.sub": ()}
    assert layout.room_of("pkg.sub.x", rooms) == "pkg.sub" and layout.room_of("pkg.subx", rooms) == "pkg"
    assert layout.problems({"pkg.sub.x": {"pkg.y"}, "pkg.y": set()}, rooms) == [
        "pkg.sub.x -> pkg.y: pkg.sub may not import pkg (see docs/layout.md)"
    ]


def test_a_room_table_that_goes_round_is_refused():
    assert layout.problems({}, {"a": ("b",), "b": ("a",)}) == ["room table: the rooms a -> b may import each other"]


def test_fabricated_code_lazy_and_type_checking_imports_count(tmp_path: Path):
    for name, text in {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "",
        "pkg/low/x.py": "def f():\n    from pkg.top import y  # lazy, back up\n",
        "pkg/top/__init__.py": "",
        "pkg/top/y.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..low import x\nfrom . import z\n"
        ),
        "pkg/top/z.py": "from .y import *\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = layout.import_graph(tmp_path, ["pkg"])
    assert graph["pkg.low.x"] == {"pkg.top.y"}
    assert graph["pkg.top.y"] == {"pkg.low.x", "pkg.top.z"}
    assert graph["pkg.top.z"] == {"pkg.top.y"}
    found = layout.problems(graph, {"pkg": (), "pkg.top": ("pkg.low",), "pkg.low": ()})
    assert found == [
        "pkg.low.x -> pkg.top.y: pkg.low may not import pkg.top (see docs/layout.md)",
        "circle: pkg.low.x <-> pkg.top.y <-> pkg.top.z",
    ]


def test_the_parser_starts_without_the_heavy_tools():
    heavy = ("aiohttp", "torch", "master_core.simulator", "app.tools.chaos.run", "app.tools.bench.run")
    code = f"import sys, app.cli; app.cli._parser(); print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_a_master_starts_without_transformers_model_code():
    # the master builds no layers: transformers' modeling stack (about 3 s of CPU on this machine) is not
    # part of its start (worker_core.shard imports segment_attention only where it builds layers); a master
    # that delivers weights still loads it then, for needed_tensors' meta skeleton
    heavy = ("transformers.modeling_utils", "worker_core.segment_attention")
    code = f"import sys, master_core.server; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


WINDOWS_MARKS = ("win32", "winreg", "windll", "WinDLL", "msvcrt", 'os.name == "nt"')


def test_every_module_with_windows_branches_is_checked_for_windows():
    """`make lint` runs pyright with the Windows platform over WINDOWS_CODE: it must hold every
    module that has a Windows branch (the code that cannot run here)."""
    makefile = (layout.ROOT / "Makefile").read_text()
    line = next(x for x in makefile.splitlines() if x.startswith("WINDOWS_CODE :="))
    checked = line.split(":=", 1)[1].split()
    assert checked and all((layout.ROOT / p).exists() for p in checked), checked
    windows = [
        p.relative_to(layout.ROOT).as_posix()
        for pkg in layout.PACKAGES
        for p in sorted((layout.ROOT / pkg).rglob("*.py"))
        if any(mark in p.read_text(encoding="utf-8") for mark in WINDOWS_MARKS)
    ]
    assert "app/tools/netlab/procctl.py" in windows and "app/desktop/system/_windows_job.py" in windows
    missed = [p for p in windows if not any(p == c or p.startswith(c.rstrip("/") + "/") for c in checked)]
    assert missed == [], f"add these to WINDOWS_CODE in the Makefile: {missed}"
