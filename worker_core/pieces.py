"""Longer frames in pieces, so that a decode step's frame need not wait behind one on a link.

Contract
--------
A stage's outbox sends a decode step's frame before everything queued without urgency, but
never inside the frame on the link now: on a 20 Mbit/s link a prompt chunk's activations (a
100-token step of a 576-wide model: 230 KB) hold it for 0.1 s, at every hop.  Cut into pieces
of ``PART_BYTES`` (16 KiB: 7 ms at 20 Mbit/s) with whole frames allowed between them, the
decode frame waits for one piece.

* :func:`split` cuts an encoded frame longer than ``size`` into :class:`~worker_core.wire.Part`
  frames, each an encoded message of its own; a shorter frame is returned whole.  A sender
  sends one frame's pieces in order and a piece of no other frame between them (whole frames
  may go between them: :class:`~worker_core.outbox.Outbox` with ``split``).
* :func:`split_item` does that for an outbox's item, a frame and what goes with it (a future to
  resolve, a fallback to run): that goes with the last piece, ``filler`` with the others.
* :class:`Joiner` is the receiving end of one connection: ``feed(frame, max_frame)`` decodes
  each frame; a ``Part`` is kept until its frame's last piece, and then the whole frame is
  decoded and returned; any other message is returned as it is; ``None`` while a frame is
  incomplete.  A frame (whole or in pieces) larger than ``max_frame``, or a piece of a piece, is
  a :class:`~worker_core.wire.ProtocolError` (the connection closes, as for any bad frame).

Who cuts: a worker, for what it sends the master (its tunnel's outbox) and the next stage (a
direct hop's).  The master sends its frames whole: where the pipeline is relayed, a step it
passes on can still wait behind a whole frame on its way down to a worker.

What this does not do: on a real link the socket's send buffer, filled by the event loop as
fast as the kernel takes bytes, still holds what it holds of the pieces ahead of a decode frame.
The emulated links (:mod:`worker_core.shaper`) pass one frame at a time, as the outbox gives them.
"""

from __future__ import annotations

from typing import TypeVar

from . import wire
from .wire import Free, Kind, Message, Part, ProtocolError, Step, decode, encode

X = TypeVar("X")

PART_BYTES = wire.PART_BYTES  # bytes of a frame in one piece (at most wire.PART_BYTES; tests make it smaller)


def split(frame: bytes, size: int | None = None) -> list[bytes]:
    """``frame`` whole when at most ``size`` bytes long (default ``PART_BYTES``), else its pieces
    as encoded ``Part`` frames."""
    size = size or PART_BYTES
    if len(frame) <= size:
        return [frame]
    view = memoryview(frame)
    starts = range(0, len(frame), size)
    return [encode(Part(bytes(view[i : i + size]), i + size >= len(frame))) for i in starts]


def split_item(item: tuple[bytes, X], filler: X) -> list[tuple[bytes, X]]:
    """An outbox's item (a frame, what goes with it) in pieces: that goes with the last one."""
    frame, companion = item
    *first, last = split(frame)
    return [*((p, filler) for p in first), (last, companion)]


def passes(msg: Message) -> bool:
    """May ``msg`` go before frames sent earlier on the same link that still wait, or are on
    their way in pieces (the master's rule, :mod:`master_core.link`)?  A decode step (each
    segment one token after some already computed) needs nothing sent after its request's
    prefill, which ended before it; a ``Free`` only lowers what the worker holds."""
    if isinstance(msg, Free):
        return True
    return isinstance(msg, Step) and bool(msg.segments) and all(s.length == 1 and s.start > 0 for s in msg.segments)


def frame_passes(frame: bytes, max_frame: int) -> bool:
    """:func:`passes` for an encoded frame (a piece never passes; a frame that does not decode
    does not either: its reader will say what is wrong with it)."""
    if wire.frame_kind(frame) not in (Kind.STEP, Kind.FREE):
        return False
    try:
        return passes(decode(frame, max_frame))
    except ProtocolError:
        return False


class Joiner:
    """Joins the pieces arriving on one connection (see the module docstring)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0

    @property
    def pending(self) -> int:
        """Bytes of a frame whose last piece has not arrived."""
        return self._size

    def feed(self, frame: bytes, max_frame: int) -> Message | None:
        msg = decode(frame, max_frame)
        if not isinstance(msg, Part):
            return msg
        self._size += len(msg.data)
        if self._size > max_frame:
            raise ProtocolError(f"a frame in pieces exceeds the limit of {max_frame} bytes")
        self._parts.append(msg.data)
        if not msg.last:
            return None
        joined = b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        whole = decode(joined, max_frame)
        if isinstance(whole, Part):
            raise ProtocolError("a frame in pieces holds a piece")
        return whole
