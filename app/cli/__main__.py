"""``python -m app.cli ...`` is ``molink ...`` (how every frontend starts an engine process)."""

import sys

from app.cli import main

sys.exit(main())
