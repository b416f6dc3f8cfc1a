"""Tray and app icons: every state at every size loads, is not blank, and the states differ at 16 px."""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path

import pytest
from PySide6.QtCore import QSize
from PySide6.QtGui import QImage, QImageReader

from app.desktop import icons
from app.desktop.icons import APP_SIZES, TRAY_SIZES, IconKind

ROOT = Path(__file__).resolve().parents[1]


def opaque_fraction(img: QImage) -> float:
    img = img.convertToFormat(QImage.Format.Format_ARGB32)
    n = sum(1 for y in range(img.height()) for x in range(img.width()) if img.pixelColor(x, y).alpha() > 128)
    return n / (img.width() * img.height())


def colours(img: QImage) -> set[int]:
    img = img.convertToFormat(QImage.Format.Format_ARGB32)
    return {img.pixel(x, y) for y in range(img.height()) for x in range(img.width())}


def test_every_file_is_there():
    assert icons.missing_files() == []
    assert icons.icons_dir() == ROOT / "assets" / "icons"


@pytest.mark.parametrize("kind", list(IconKind))
def test_tray_icon_has_every_size_and_is_not_blank(qapp, kind):
    icon = icons.tray_icon(kind)
    assert not icon.isNull()
    assert sorted(s.width() for s in icon.availableSizes()) == sorted(TRAY_SIZES)
    for size in TRAY_SIZES:
        img = icon.pixmap(QSize(size, size)).toImage()
        assert (img.width(), img.height()) == (size, size)
        assert opaque_fraction(img) > 0.8, (kind, size)  # a full tile, not a speck
        assert len(colours(img)) >= 6, (kind, size)  # a drawing, not a flat square


def test_app_icon(qapp):
    icon = icons.app_icon()
    assert sorted(s.width() for s in icon.availableSizes()) == sorted(APP_SIZES)
    for size in APP_SIZES:
        img = icon.pixmap(QSize(size, size)).toImage()
        assert img.width() == size and opaque_fraction(img) > 0.5 and len(colours(img)) >= 6


def test_states_are_distinct_at_16_px(qapp):
    imgs = {
        k: icons.tray_icon(k).pixmap(QSize(16, 16)).toImage().convertToFormat(QImage.Format.Format_ARGB32)
        for k in IconKind
    }

    def differing(a: QImage, b: QImage) -> int:
        return sum(
            1
            for y in range(16)
            for x in range(16)
            if max(
                abs(a.pixelColor(x, y).red() - b.pixelColor(x, y).red()),
                abs(a.pixelColor(x, y).green() - b.pixelColor(x, y).green()),
                abs(a.pixelColor(x, y).blue() - b.pixelColor(x, y).blue()),
            )
            > 48
        )

    kinds = list(IconKind)
    for i, a in enumerate(kinds):
        for b in kinds[i + 1 :]:
            assert differing(imgs[a], imgs[b]) >= 12, (a, b)  # at least 12 of 256 pixels clearly differ

    def saturation(img: QImage) -> float:
        return max(img.pixelColor(x, y).hsvSaturationF() for y in range(16) for x in range(16))

    assert saturation(imgs[IconKind.OFF]) < 0.3 < saturation(imgs[IconKind.SHARING])  # "off" is grey


def test_windows_ico_holds_every_size(qapp):
    path = icons.icons_dir() / "molink.ico"
    data = path.read_bytes()
    reserved, kind, count = struct.unpack_from("<HHH", data, 0)
    assert (reserved, kind) == (0, 1) and count == 8
    sizes = []
    for i in range(count):
        w, h, _, _, planes, bpp, length, offset = struct.unpack_from("<BBBBHHII", data, 6 + 16 * i)
        assert planes == 1 and bpp == 32 and offset + length <= len(data)
        sizes.append(w or 256)
    assert sizes == [16, 20, 24, 32, 40, 48, 64, 256]
    reader = QImageReader(str(path))
    assert reader.imageCount() == count
    read = []
    for i in range(count):
        assert reader.jumpToImage(i)
        img = reader.read()
        assert not img.isNull(), reader.errorString()
        assert opaque_fraction(img) > 0.5 and len(colours(img)) >= 6
        read.append(img.width())
    assert read == sizes


def test_icons_dir_in_a_frozen_build(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path), raising=False)
    assert icons.icons_dir() == tmp_path / "assets" / "icons"


def test_committed_pngs_match_their_svgs(qapp, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no __pycache__ among the assets
    spec = importlib.util.spec_from_file_location("render_icons", ROOT / "assets" / "icons" / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    for kind in IconKind:
        for size in (16, 32):
            fresh = render.render(ROOT / "assets" / "icons" / f"{kind.value}.svg", size)
            fresh = fresh.convertToFormat(QImage.Format.Format_ARGB32)
            stored = QImage(str(icons.tray_icon_file(kind, size))).convertToFormat(QImage.Format.Format_ARGB32)
            worst = max(
                abs(a - b)
                for y in range(size)
                for x in range(size)
                for a, b in zip(fresh.pixelColor(x, y).getRgb(), stored.pixelColor(x, y).getRgb())
            )
            assert worst <= 8, f"{kind.value}-{size}.png is stale: run assets/icons/render.py"


def test_preview_sheet_exists():
    img = QImage(str(ROOT / "docs" / "icons-preview.png"))
    assert not img.isNull() and img.width() > 300 and img.height() > 300
