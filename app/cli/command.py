"""What a `molink` subcommand is: the shared types of the parser and its command modules.

Contract: a :data:`Command` takes the parsed arguments and the :class:`Supervision` (the control
channel of a supervised process, both fields None otherwise) and returns its exit code or a
:data:`Run`, the coroutine function :func:`app.cli.main` runs until it ends, Ctrl-C or SIGTERM
(its result is the exit code).  A leaf: the parser (:mod:`app.cli`) and the command modules
(:mod:`app.cli.group`, :mod:`app.cli.worker`, :mod:`app.cli.tools`) import it, it imports
neither.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker_core.control import Control, Events


@dataclass(frozen=True)
class Supervision:
    """The control channel of a supervised process (both None otherwise)."""

    control: Control | None = None
    events: Events | None = None


Run = Callable[[], Awaitable[int | None]]  # a subcommand's coroutine function: its result is the exit code
Command = Callable[[argparse.Namespace, Supervision], "int | Run"]
