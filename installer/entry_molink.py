"""`molink` in an installed (frozen) MoLink: the console launcher.

Contract: ``molink app ...`` runs the tray app in this process (no torch here); ``molink runtime
status|install|remove`` manages the engine runtime (:mod:`app.runtime.console`); ``molink`` with no
argument or ``-h`` prints the help; every other subcommand (``master``, ``worker``, ``selftest``,
``demo``, ``group``, ``join``, ...) is the engine's: the per-user runtime is made ready first
(built on the console on first use) and the command runs there as ``<runtime python> -m app.cli
ARGS``, with this process's arguments, streams and exit code (on POSIX the launcher is replaced by
it; on Windows it waits and passes the exit code on).
"""

import multiprocessing
import os
import subprocess
import sys

LOCAL = ("app", "-h", "--help")


def main() -> int:
    from app.runtime.bundle import scrub_library_path

    scrub_library_path()
    argv = sys.argv[1:]
    if not argv or argv[0] in LOCAL:
        from app.cli import main as cli_main

        return cli_main(argv or ["--help"])
    if argv[0] == "runtime":
        from app.runtime.console import main as runtime_main

        return runtime_main(argv[1:])
    from app.runtime.bundle import child_env
    from app.runtime.console import ensure_console
    from app.runtime.locks import RuntimeProblem

    try:
        python = ensure_console()
    except RuntimeProblem as e:
        print(f"molink: the engine runtime is not usable: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("molink: cancelled; the next command resumes installing the engine", file=sys.stderr)
        return 130
    cmd = [str(python), "-m", "app.cli", *argv]
    env = child_env()
    if os.name == "posix":
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(cmd[0], cmd, env)  # signals, exit code and terminal go straight to the engine
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the child through the console; we wait for it
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    multiprocessing.freeze_support()
    sys.exit(main())
