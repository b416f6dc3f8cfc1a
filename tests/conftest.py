"""Test session setup: no display, no hub, quiet tokenizers; ``tests/`` importable.

The shared helpers are modules, not fixtures: :mod:`harness` (an in-process group, bounded
runs) and :mod:`tiny_models` (tiny checkpoints, the transformers reference).  Tests marked
``slow`` (real processes, real models, browsers) are left out by ``make test-fast``.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, str(Path(__file__).parent))
