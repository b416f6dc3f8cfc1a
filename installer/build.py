"""Build the installed MoLink: the frozen one-folder bundle, then (Linux) the .deb and the .tar.gz.

    python installer/build.py [--locks auto|release|local] [--no-deb] [--out dist] [--work build]

1. ``<work>/runtime``: the molink wheel (``pip wheel --no-deps`` of a copy of the sources), the ``uv``
   binary, and ``locks/`` (``installer/locks.py bundle``).  ``--locks release`` ships the committed
   release locks only (a release CPU lock must exist); ``local`` adds a CPU lock made from this
   machine's pip indexes (``installer/locks.py local``: the runtime then installs from those indexes -
   right for tests and this machine, not for publishing); ``auto`` is ``release`` when a release CPU
   lock exists, else ``local``.
2. ``pyinstaller build.spec`` -> ``<out>/molink/`` (``molink-tray``, ``molink``, ``_internal/``); checks
   that no engine package (torch, transformers, ...) was frozen; on Linux, RUNPATHs naming the build
   machine are removed (patchelf) and every library the bundle needs must be in it or on the system.
3. Linux: ``installer/linux/build_deb.py`` -> ``<out>/molink_<version>_amd64.deb`` (+ ``lintian.txt``)
   and ``<out>/molink-<version>-linux-x86_64.tar.gz``.
Prints what it made with sizes and the time each stage took; exit 0, or 1 with the reason.  Separate
``--out``/``--work`` folders let builds run side by side (the slow test builds in its own temp folder).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

if sys.version_info < (3, 11):
    sys.exit("installer/build.py needs Python 3.11 or newer (tomllib)")
import tomllib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# third-party packages only the engine uses.  (Our own engine modules, e.g. master_core.server, are frozen
# as dead code: app.cli's command modules name them in their engine branches, which the frozen app never
# runs; without torch they could not even be imported.)
ENGINE_MODULES = (
    "torch",
    "transformers",
    "safetensors",
    "tokenizers",
    "accelerate",
    "gguf",
    "numpy",
    "triton",
    "matplotlib",
    "huggingface_hub",
    "bitsandbytes",
)
SOURCES = ("pyproject.toml", "README.md", "app", "worker_core", "master_core", "assets")  # what the wheel is built from
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def run(cmd: list, timeout: float = 1800, cwd: Path = ROOT) -> None:
    print("+ " + " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, timeout=timeout, cwd=cwd)


def size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def stage_runtime(locks: str, work: Path) -> None:
    from app.runtime.bundle import source_uv

    runtime = work / "runtime"
    for d in (runtime, work / "src"):
        if d.exists():
            shutil.rmtree(d)
    runtime.mkdir(parents=True)
    (work / "src").mkdir(parents=True)
    for name in SOURCES:  # a copy: setuptools' build/ and egg-info stay out of the checkout
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / "src" / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, work / "src" / name)
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            runtime,
            work / "src",
        ],
        cwd=work / "src",
    )
    os_name = "windows" if sys.platform == "win32" else "linux"
    has_release_cpu = (ROOT / "installer" / "locks" / f"{os_name}-cpu.lock").exists()
    if locks == "auto":
        locks = "release" if has_release_cpu else "local"
        if locks == "local":
            print(
                f"NOTE: no release CPU lock for {os_name} in installer/locks (it needs download.pytorch.org); "
                "shipping a CPU lock made from THIS machine's pip indexes. Not for publishing.",
                flush=True,
            )
    cmd = [sys.executable, ROOT / "installer" / "locks.py", "bundle", "--os", os_name, "--out", runtime / "locks"]
    if locks == "local":
        run([sys.executable, ROOT / "installer" / "locks.py", "local", "--out", work / "local-locks"])
        cmd += ["--local", work / "local-locks"]
    run(cmd)
    uv = source_uv()
    target = runtime / uv.name
    shutil.copy2(uv, target)
    target.chmod(0o755)


def check_frozen(work: Path, bundle: Path) -> None:
    modules = (work / "pyinstaller" / "modules.txt").read_text().split()
    bad = sorted(m for m in modules if m.split("/")[0].split(".")[0] in ENGINE_MODULES)
    if bad:
        raise SystemExit(f"engine modules were frozen into the bundle: {', '.join(bad[:20])}")
    internal = bundle / "_internal"
    dirs = sorted(p.name for p in internal.iterdir() if p.is_dir() and p.name.split(".")[0] in ENGINE_MODULES)
    if dirs:
        raise SystemExit(f"engine packages in the bundle: {dirs}")


def fix_runpaths(bundle: Path) -> None:
    """Linux: drop RUNPATH entries that name the build machine (pyenv's libpython carries
    ``/root/.pyenv/.../lib``); ``$ORIGIN`` entries (Qt's, PySide6's) stay.  Needs ``patchelf``."""
    patchelf = shutil.which("patchelf") or str(Path(sys.executable).parent / "patchelf")
    for path in (bundle / "_internal").rglob("*.so*"):
        if path.is_symlink() or not path.is_file():
            continue
        out = subprocess.run([patchelf, "--print-rpath", str(path)], capture_output=True, text=True, timeout=60)
        if out.returncode != 0 or not out.stdout.strip():
            continue
        entries = out.stdout.strip().split(":")
        keep = [e for e in entries if e.startswith("$ORIGIN")]
        if keep != entries:
            cmd = (
                [patchelf, "--set-rpath", ":".join(keep), str(path)]
                if keep
                else [patchelf, "--remove-rpath", str(path)]
            )
            subprocess.run(cmd, check=True, timeout=60)


def check_libraries(bundle: Path) -> None:
    """Linux: every library a bundled ELF file needs is in the bundle or on this system (`ldd`)."""
    internal = bundle / "_internal"
    env = {"LD_LIBRARY_PATH": str(internal), "PATH": "/usr/bin:/bin"}
    files = [
        bundle / "molink",
        bundle / "molink-tray",
        *(p for p in internal.rglob("*.so*") if p.is_file() and not p.is_symlink()),
    ]
    missing = set()
    for path in files:
        out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=env, timeout=60)
        missing |= {f"{line.split()[0]} (for {path.name})" for line in out.stdout.splitlines() if "not found" in line}
    if missing:
        raise SystemExit("libraries found neither in the bundle nor on this system: " + ", ".join(sorted(missing)[:20]))


def tarball(bundle: Path, out: Path) -> Path:
    path = out / f"molink-{VERSION}-linux-x86_64.tar.gz"
    # gzip level 6 (gzip's own default): the bundle's binaries compress to the same size as at tarfile's
    # default 9 (80 MB either way), three times faster
    with tarfile.open(path, "w:gz", compresslevel=6) as tar:
        tar.add(bundle, arcname=f"molink-{VERSION}")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="installer/build.py")
    p.add_argument("--locks", choices=("auto", "release", "local"), default="auto")
    p.add_argument("--no-deb", action="store_true", help="the bundle only")
    p.add_argument("--out", default=str(ROOT / "dist"), help="where the bundle and packages go (default dist)")
    p.add_argument("--work", default=str(ROOT / "build"), help="scratch folder (default build)")
    args = p.parse_args(argv)
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    bundle = out / "molink"
    times: dict[str, float] = {}
    t = time.monotonic()
    stage_runtime(args.locks, work)
    times["runtime files (wheel, locks, uv)"] = time.monotonic() - t
    t = time.monotonic()
    if bundle.exists():
        shutil.rmtree(bundle)
    run(
        [
            sys.executable,
            "-m",
            "PyInstaller",
            "--noconfirm",
            "--log-level",
            "WARN",
            "--distpath",
            out,
            "--workpath",
            work / "pyinstaller",
            ROOT / "build.spec",
            "--",
            "--work",
            work,
        ],
        timeout=3600,
    )
    check_frozen(work, bundle)
    if sys.platform.startswith("linux"):
        fix_runpaths(bundle)
        check_libraries(bundle)
    times["PyInstaller bundle"] = time.monotonic() - t
    made = [bundle]
    if sys.platform.startswith("linux") and not args.no_deb:
        t = time.monotonic()
        run(
            [
                sys.executable,
                ROOT / "installer" / "linux" / "build_deb.py",
                "--bundle",
                bundle,
                "--out",
                out,
                "--work",
                work / "deb",
            ]
        )
        times[".deb (+ lintian)"] = time.monotonic() - t
        t = time.monotonic()
        made += [out / f"molink_{VERSION}_amd64.deb", tarball(bundle, out)]
        times[".tar.gz"] = time.monotonic() - t
    print("\nmade:")
    for path in made:
        print(f"  {path}: {mb(size(path))}")
    print(f"  of which runtime files (uv, locks, wheel): {mb(size(work / 'runtime'))}")
    print("time:")
    for what, seconds in times.items():
        print(f"  {what}: {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as e:
        print(f"build.py: {' '.join(map(str, e.cmd))} failed with exit code {e.returncode}", file=sys.stderr)
        sys.exit(1)
