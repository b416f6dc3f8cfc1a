"""Test session setup: no display, no hub, quiet tokenizers; ``tests/`` importable.

The shared helpers are modules, not fixtures: :mod:`harness` (an in-process group, bounded
runs) and :mod:`tiny_models` (tiny checkpoints, the transformers reference).  Tests marked
``slow`` (real processes, real models, browsers) are left out by ``make test-fast``.

``make test`` runs two pytest workers, one test file at a time each (``--dist loadfile``); the
files that take longest are collected first, so that neither worker is left alone with one of
them at the end (``HEAVY``: a scheduling hint, measured; a file missing from it only runs later).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, str(Path(__file__).parent))

HEAVY = (  # the longest files of the suite, longest first (seconds on the development machine)
    "test_installer.py",  # ~440: builds, installs, upgrades and removes the .deb
    "test_chaos.py",  # ~220: one group of real processes through every fault
    "test_gguf.py",  # ~230
    "test_default_model.py",  # ~160
    "test_control.py",  # ~130
    "test_quantize.py",  # ~140
    "test_architectures.py",  # ~100
)


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(HEAVY)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(HEAVY)))  # stable: order within kept
