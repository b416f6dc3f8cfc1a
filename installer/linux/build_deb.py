"""Package the frozen bundle (dist/molink) as a .deb with dpkg-deb, then run lintian on it.

    python installer/linux/build_deb.py --bundle dist/molink --out dist

Layout: the bundle in ``/opt/molink`` (``molink``, ``molink-tray``, ``_internal/``); ``/usr/bin/molink`` and
``/usr/bin/molink-tray`` symlinks (absolute: they cross top-level folders, Debian policy 10.5); the
``.desktop`` launcher (``molink-tray %u``, also the ``molink://`` link handler); the app icon in
``/usr/share/icons/hicolor`` at every rendered size plus the SVG; man pages; copyright; changelog.
``Depends`` is what ``dpkg-shlibdeps`` finds for every ELF file of the bundle (the system libraries
the bundle does not carry: libc, X11/xcb, Wayland, EGL/GL, fontconfig, GTK for the theme, OpenSSL ...).
No maintainer scripts: dpkg's triggers (hicolor-icon-theme, desktop-file-utils, man-db) refresh the
icon cache, the desktop database and the man index; nothing per user is ever touched; removal is
dpkg's own file list.  Writes ``<out>/molink_<version>_amd64.deb`` and ``<out>/lintian.txt``; exit 0
unless the package cannot be built.  Lintian's findings are printed, not fatal (installer/README.md
explains each error that remains).
"""

from __future__ import annotations

import argparse
import email.utils
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if sys.version_info < (3, 11):
    sys.exit("installer/linux/build_deb.py needs Python 3.11 or newer (tomllib)")
import tomllib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ICON_SIZES = (16, 22, 24, 32, 48, 64, 128, 256)
MAINTAINER = "MoLink maintainers <maintainers@molink.invalid>"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]


def _gz(src_text: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0, filename="") as f:
        f.write(src_text.encode())


def _copy(src: Path, dest: Path, mode: int = 0o644) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    dest.chmod(mode)


def _normalise(tree: Path) -> None:
    """0755 folders and executables, 0644 everything else (dpkg-deb keeps what it finds)."""
    for dirpath, _dirnames, filenames in os.walk(tree):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            executable = p.stat().st_mode & 0o111 and not name.endswith((".so", ".pyd")) and ".so." not in name
            p.chmod(0o755 if executable else 0o644)


def depends(opt: Path) -> str:
    """dpkg-shlibdeps over every ELF file of the bundle; the bundle's own libraries are searched first."""
    elves = [p for p in opt.rglob("*") if p.is_file() and not p.is_symlink() and p.read_bytes()[:4] == b"\x7fELF"]
    libdirs = sorted({str(p.parent) for p in elves})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "debian").mkdir()
        (Path(tmp) / "debian" / "control").write_text("Source: molink\n\nPackage: molink\nArchitecture: amd64\n")
        cmd = [
            "dpkg-shlibdeps",
            "-O",
            "--ignore-missing-info",
            "--warnings=0",
            *(f"-l{d}" for d in libdirs),
            *(f"-e{p}" for p in elves),
        ]
        out = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"dpkg-shlibdeps failed: {out.stderr.strip()[-2000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("shlibs:Depends="))
    return line.split("=", 1)[1]


def control(installed_kib: int, deps: str) -> str:
    return f"""Package: molink
Version: {VERSION}
Section: net
Priority: optional
Architecture: amd64
Maintainer: {MAINTAINER}
Installed-Size: {installed_kib}
Depends: {deps}
Description: {PROJECT["description"]}
 MoLink cuts a large language model into ranges of layers served by the GPUs
 (or CPUs) of several PCs, over home links, and offers an OpenAI-compatible
 API and a chat window. This package holds the desktop app (a tray icon that
 shares this PC, hosts or joins a group) and the molink command. The engine
 itself (PyTorch, CPU or CUDA build chosen from the NVIDIA driver) is
 installed per user on first use, from hash-pinned lock files shipped here.
"""


def changelog() -> str:
    when = email.utils.formatdate(float(os.environ.get("SOURCE_DATE_EPOCH", time.time())), localtime=False)
    return f"molink ({VERSION}) unstable; urgency=medium\n\n  * Release {VERSION}.\n\n -- {MAINTAINER}  {when}\n"


def build(bundle: Path, out: Path, work: Path) -> Path:
    if work.exists():
        shutil.rmtree(work)
    root = work / "root"
    opt = root / "opt" / "molink"
    shutil.copytree(bundle, opt, symlinks=True)
    (root / "usr" / "bin").mkdir(parents=True)
    for name in ("molink", "molink-tray"):
        (root / "usr" / "bin" / name).symlink_to(f"/opt/molink/{name}")
    share = root / "usr" / "share"
    _copy(HERE / "molink.desktop", share / "applications" / "molink.desktop")
    for size in ICON_SIZES:
        _copy(
            ROOT / "assets" / "icons" / f"molink-{size}.png",
            share / "icons" / "hicolor" / f"{size}x{size}" / "apps" / "molink.png",
        )
    _copy(ROOT / "assets" / "molink.svg", share / "icons" / "hicolor" / "scalable" / "apps" / "molink.svg")
    for page in ("molink.1", "molink-tray.1"):
        _gz((HERE / page).read_text(), share / "man" / "man1" / f"{page}.gz")
    _copy(HERE / "copyright", share / "doc" / "molink" / "copyright")
    _gz(changelog(), share / "doc" / "molink" / "changelog.gz")
    _normalise(root)
    deps = depends(opt)
    kib = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink()) // 1024 + 1
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN" / "control").write_text(control(kib, deps))
    (root / "DEBIAN").chmod(0o755)
    out.mkdir(parents=True, exist_ok=True)
    deb = out / f"molink_{VERSION}_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(deb)], check=True, timeout=1800)
    return deb


def lintian(deb: Path, out: Path) -> None:
    if shutil.which("lintian") is None:
        print("lintian is not installed: no report", file=sys.stderr)
        return
    res = subprocess.run(
        ["lintian", "--no-tag-display-limit", "--info", str(deb)], capture_output=True, text=True, timeout=1800
    )
    report = res.stdout + res.stderr
    (out / "lintian.txt").write_text(report)
    tags = [line for line in report.splitlines() if line[:2] in ("E:", "W:")]
    errors = sorted({line.split()[2] for line in tags if line.startswith("E:")})
    warnings = sorted({line.split()[2] for line in tags if line.startswith("W:")})
    print(
        f"lintian: {len(errors)} error tag(s) {errors}; {len(warnings)} warning tag(s) {warnings} "
        f"(full report {out / 'lintian.txt'})"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="installer/linux/build_deb.py")
    p.add_argument("--bundle", default=str(ROOT / "dist" / "molink"))
    p.add_argument("--out", default=str(ROOT / "dist"))
    p.add_argument("--work", default=str(ROOT / "build" / "deb"), help="staging folder")
    p.add_argument("--no-lintian", action="store_true")
    args = p.parse_args(argv)
    deb = build(Path(args.bundle), Path(args.out), Path(args.work))
    print(f"{deb}: {deb.stat().st_size / 1e6:.1f} MB")
    if not args.no_lintian:
        lintian(deb, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
