"""Render MoLink's icons from their SVG sources; run it after editing an SVG and commit the results.

    python assets/icons/render.py          (from the repository root; needs PySide6-Essentials)

Writes, next to this file:

* ``<state>-<size>.png`` for the tray states ``off``, ``sharing``, ``paused``, ``problem`` (``<state>.svg``)
  at every size in ``TRAY_SIZES``;
* ``molink-<size>.png``, the app icon for the Linux hicolor theme at ``APP_SIZES`` (sizes up to
  ``SMALL_MAX`` from the pixel-aligned ``sharing.svg``, larger ones from ``assets/molink.svg``);
* ``molink.ico``, the Windows app icon with ``ICO_SIZES`` (32-bit BMP entries, a PNG entry for 256);

and ``docs/icons-preview.png``: every state at 16, 24, 32 and 48 px on a light and a dark taskbar
colour, with 4x enlargements of the 16 and 24 px renderings.

The tray SVGs are drawn on a 16 x 16 grid (1 unit = 1 pixel at 16 px) so 16, 32, 48 and 64 px are sharp.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QBuffer, QByteArray, QIODevice, QRectF, Qt  # noqa: E402
from PySide6.QtGui import QColor, QFont, QGuiApplication, QImage, QPainter  # noqa: E402
from PySide6.QtSvg import QSvgRenderer  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STATES = ("off", "sharing", "paused", "problem")
TRAY_SIZES = (16, 20, 24, 32, 40, 48, 64, 128, 256)
APP_SIZES = (16, 22, 24, 32, 48, 64, 128, 256)
ICO_SIZES = (16, 20, 24, 32, 40, 48, 64, 256)
SMALL_MAX = 24  # app icon sizes up to this use the pixel-aligned tray glyph
LIGHT, DARK = QColor("#f3f3f3"), QColor("#202020")  # Windows 11 light / dark taskbar


def render(svg: Path, size: int) -> QImage:
    renderer = QSvgRenderer(str(svg))
    if not renderer.isValid():
        raise SystemExit(f"cannot read {svg}")
    img = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    img.fill(Qt.GlobalColor.transparent)
    p = QPainter(img)
    p.setRenderHint(QPainter.RenderHint.Antialiasing)
    p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
    renderer.render(p, QRectF(0, 0, size, size))
    p.end()
    return img


def png_bytes(img: QImage) -> bytes:
    data = QByteArray()
    buf = QBuffer(data)
    buf.open(QIODevice.OpenModeFlag.WriteOnly)
    if not img.save(buf, "PNG"):
        raise SystemExit("PNG encoding failed")
    buf.close()
    return bytes(data.data())


def dib_bytes(img: QImage) -> bytes:
    """An ICO image entry as a 32-bit BGRA DIB: header (height doubled), XOR rows bottom-up, AND mask."""
    img = img.convertToFormat(QImage.Format.Format_ARGB32)  # little-endian memory order: B, G, R, A
    w, h = img.width(), img.height()
    header = struct.pack("<IiiHHIIiiII", 40, w, 2 * h, 1, 32, 0, 0, 0, 0, 0, 0)
    rows = []
    mask_rows = []
    mask_stride = ((w + 31) // 32) * 4
    for y in range(h - 1, -1, -1):
        line = bytes(img.constScanLine(y))[: 4 * w]
        rows.append(line)
        bits = bytearray(mask_stride)
        for x in range(w):
            if line[4 * x + 3] == 0:  # fully transparent: mask bit set
                bits[x // 8] |= 0x80 >> (x % 8)
        mask_rows.append(bytes(bits))
    return header + b"".join(rows) + b"".join(mask_rows)


def write_ico(path: Path, images: list[QImage]) -> None:
    """ICONDIR + ICONDIRENTRY per image + data; 256 px stored as PNG (Windows Vista and later)."""
    blobs = [png_bytes(i) if i.width() >= 256 else dib_bytes(i) for i in images]
    offset = 6 + 16 * len(images)
    out = [struct.pack("<HHH", 0, 1, len(images))]
    for img, blob in zip(images, blobs):
        w = img.width() if img.width() < 256 else 0
        h = img.height() if img.height() < 256 else 0
        out.append(struct.pack("<BBBBHHII", w, h, 0, 0, 1, 32, len(blob), offset))
        offset += len(blob)
    path.write_bytes(b"".join(out) + b"".join(blobs))


def preview(path: Path) -> None:
    sizes = (16, 24, 32, 48)
    zoom = 4
    cell = 56
    label_w = 92
    panel_w = label_w + cell * len(sizes) + (16 * zoom + 12) + (24 * zoom + 12)
    row_h = max(cell, 24 * zoom + 8)
    head = 24
    panel_h = head + row_h * len(STATES)
    sheet = QImage(panel_w, panel_h * 2, QImage.Format.Format_ARGB32)
    p = QPainter(sheet)
    font = QFont()
    font.setPixelSize(11)
    p.setFont(font)
    for pi, bg in enumerate((LIGHT, DARK)):
        top = pi * panel_h
        p.fillRect(0, top, panel_w, panel_h, bg)
        p.setPen(QColor("#111111") if bg == LIGHT else QColor("#eeeeee"))
        p.drawText(4, top + 16, "light taskbar" if bg == LIGHT else "dark taskbar")
        for si, size in enumerate(sizes):
            p.drawText(label_w + si * cell, top + 16, f"{size}px")
        p.drawText(label_w + len(sizes) * cell, top + 16, "16px x4")
        p.drawText(label_w + len(sizes) * cell + 16 * zoom + 12, top + 16, "24px x4")
        for ri, state in enumerate(STATES):
            y = top + head + ri * row_h
            p.drawText(4, y + 20, state)
            for si, size in enumerate(sizes):
                p.drawImage(label_w + si * cell, y, QImage(str(HERE / f"{state}-{size}.png")))
            x = label_w + len(sizes) * cell
            for size in (16, 24):
                big = QImage(str(HERE / f"{state}-{size}.png")).scaled(
                    size * zoom,
                    size * zoom,
                    Qt.AspectRatioMode.IgnoreAspectRatio,
                    Qt.TransformationMode.FastTransformation,
                )
                p.drawImage(x, y, big)
                x += size * zoom + 12
    p.end()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not sheet.save(str(path)):
        raise SystemExit(f"cannot write {path}")


def main() -> None:
    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])
    for state in STATES:
        for size in TRAY_SIZES:
            render(HERE / f"{state}.svg", size).save(str(HERE / f"{state}-{size}.png"))
    app_images = {}
    for size in sorted(set(APP_SIZES) | set(ICO_SIZES)):
        src = HERE / "sharing.svg" if size <= SMALL_MAX else ROOT / "assets" / "molink.svg"
        app_images[size] = render(src, size)
    for size in APP_SIZES:
        app_images[size].save(str(HERE / f"molink-{size}.png"))
    write_ico(HERE / "molink.ico", [app_images[s] for s in ICO_SIZES])
    preview(ROOT / "docs" / "icons-preview.png")
    del app
    print(
        f"wrote {len(STATES) * len(TRAY_SIZES)} tray PNGs, {len(APP_SIZES)} app PNGs, molink.ico "
        "and docs/icons-preview.png"
    )


if __name__ == "__main__":
    main()
