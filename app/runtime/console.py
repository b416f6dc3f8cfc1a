"""The engine runtime on a console: ``molink runtime status|install|remove|path`` and the launcher's build.

Contract
--------
* ``main(argv)`` (``python -m app.runtime.console ...``; ``molink runtime ...`` in an installed
  app) exits 0, or 1 with one line on stderr.  ``status`` prints the folder, the shipped locks,
  this machine's backend choice and the state with what to do next (:data:`app.runtime.build.NEXT`);
  for a ready runtime it also imports the engine there (exit 1 when that fails).  ``install``
  builds or (``--repair``) repairs with progress on stdout; ``remove`` deletes it; ``path``
  prints a ready runtime's Python.
* ``console_progress(out)`` is a :data:`app.runtime.build.Progress` that prints ``[ NN%] line``.
* ``ensure_console(runtime, out)``: for the launcher, the ready runtime's Python, built first
  (progress on the console) when needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .build import (
    NEXT,
    REPAIR,
    STEP_TITLE,
    Progress,
    Runtime,
    RuntimeBuildError,
    RuntimeProblem,
    State,
    default_root,
)
from .bundle import Bundle


def console_progress(out=None) -> Progress:  # noqa: ANN001 - a text stream
    out = out or sys.stderr
    last = {"pct": -1}

    def show(fraction: float | None, line: str) -> None:
        if fraction is not None:
            last["pct"] = int(fraction * 100)
        prefix = f"[{last['pct']:3d}%] " if last["pct"] >= 0 else "       "
        print(prefix + line, file=out, flush=True)

    return show


def ensure_console(runtime: Runtime | None = None, out=None) -> Path:  # noqa: ANN001
    """For the launcher: the READY runtime's Python, building it on the console when needed."""
    runtime = runtime or Runtime.default()
    if runtime.state(runtime.lock_for()) is State.READY:
        return runtime.python
    return runtime.ensure(console_progress(out))


def main(argv: list[str] | None = None) -> int:
    """``molink runtime status|install|remove``: exit 0, or 1 with one line."""
    p = argparse.ArgumentParser(
        prog="molink runtime", description="the engine runtime (torch and MoLink's engine) of this user"
    )
    p.add_argument("--root", default=None, help="runtime folder (default: the user data folder's rt)")
    p.add_argument("--bundle", default=None, help="folder with uv, locks/ and the molink wheel (default: the app's)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("status", help="what is installed and what this machine would get")
    i = sub.add_parser("install", help="build or repair the runtime (resumes an interrupted build)")
    i.add_argument(
        "--backend", default=None, help="cpu, cu130, ... (default: the installed one, else chosen from the GPU)"
    )
    i.add_argument(
        "--repair", action="store_true", help="first check that an installed runtime imports; rebuild it if not"
    )
    sub.add_parser("remove", help="delete the runtime and its downloads")
    sub.add_parser("path", help="print the runtime's Python when it is ready")
    args = p.parse_args(argv)
    bundle = Bundle.at(Path(args.bundle)) if args.bundle else Bundle.default()
    rt = Runtime(Path(args.root) if args.root else default_root(), bundle)
    try:
        if args.cmd == "status":
            m = rt.marker()
            print(f"runtime folder: {rt.root}")
            print(f"shipped locks: {', '.join(sorted(bundle.locks())) or 'none'} ({bundle.locks_dir})")
            choice = rt.choose()
            print(f"this machine: {choice.backend} ({choice.reason})")
            lock = rt.lock_for()
            state = rt.state(lock)
            print(f"state: {state.value} ({lock.backend}, lock {lock.sha256[:12]})")
            if m is not None:
                print(f"installed: {m.backend}, Python {m.python}, torch {m.torch}, CUDA {m.cuda or '-'}")
            if state is not State.READY:
                print(f"next: {NEXT[state]}")
                return 0
            try:
                info = rt.verify()
            except RuntimeBuildError as e:
                print(f"check: FAILED: {str(e).splitlines()[0].removeprefix(STEP_TITLE['verify'] + ' failed: ')}")
                print(f"next: {REPAIR}")
                return 1
            print(f"check: the engine imports (torch {info['torch']}, transformers {info['transformers']})")
            return 0
        if args.cmd == "install":
            build = rt.repair if args.repair else rt.ensure
            print(build(console_progress(sys.stdout), backend=args.backend))
            return 0
        if args.cmd == "remove":
            rt.remove()
            print(f"removed the engine runtime in {rt.root}")
            return 0
        print(rt.ready_python())
        return 0
    except RuntimeProblem as e:
        print(f"molink runtime: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("molink runtime: cancelled; run it again to resume", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
