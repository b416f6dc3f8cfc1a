"""A long step computed in slices, so that decode steps arriving meanwhile need not wait for all
of it.

Contract
--------
A stage computes one step at a time.  A decode step that arrives while a prefill chunk of a few
hundred tokens computes waits for all of it, and then meets the same chunk again at the next
stage, which the chunk reached first: on a compute-bound pipeline the streams follow the chunk
stage after stage (a convoy), and every stream's gap grows by the chunk's whole trip.  Computed
in slices, a step lets the session run the decode steps queued meanwhile between two slices
(:meth:`worker_core.session.Session.handle`), so they wait for one slice at most and overtake
the chunk.

* :func:`slice_step` cuts a step's packed segments into consecutive slices of at most ``limit``
  rows each: a segment may be cut anywhere except inside the rows it wants logits for (its last
  ``logit_rows``, kept whole, so the last stage's logits are those of the whole step, in
  order).  Its later parts continue the cache the first part started (no ``base``, the same
  generation); only the last part wants logits.  The slices' tensors are the step's rows, in
  order: their outputs concatenated are the step's output.  Pure, no torch compute.
* :class:`SliceClock` chooses ``limit`` from the stage's measured compute per token, so that
  one slice takes about :data:`SLICE_SECONDS`: a GPU, fast per token, slices only steps of
  thousands of tokens; before anything is measured nothing is sliced.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .wire import Segment

SLICE_SECONDS = 0.05  # about the compute of one slice: what a decode step waits for at most
MIN_SLICE = 16  # rows: smaller slices would pay a step's fixed cost for too little
MEASURED_FROM = 32  # tokens: a step this long or longer tells the per-token cost


Slice = tuple[tuple[Segment, ...], torch.Tensor]  # a slice's segments and their rows of the step's tensor


def slice_step(segments: tuple[Segment, ...], tensor: torch.Tensor, limit: int) -> list[Slice]:
    """The step as consecutive slices of at most ``limit`` rows (more only where one segment's
    logit rows alone exceed it); one slice when the step fits."""
    total = sum(s.length for s in segments)
    if total <= limit:
        return [(segments, tensor)]
    slices: list[Slice] = []
    current: list[Segment] = []
    rows = first = 0

    def close() -> None:
        nonlocal current, rows, first
        if current:
            slices.append((tuple(current), tensor[first : first + rows]))
            first += rows
            current, rows = [], 0

    for s in segments:
        done = 0
        while done < s.length:
            left = s.length - done
            n = min(left, limit - rows)
            if n < left:  # cut inside the segment: never inside its logit rows
                n = min(n, s.length - s.logit_rows - done)
                if n <= 0:
                    if current:
                        close()
                        continue
                    n = left  # its logit rows alone are longer than a slice
            last = done + n == s.length
            current.append(
                replace(
                    s,
                    start=s.start + done,
                    length=n,
                    want_logits=s.want_logits and last,
                    base=s.base if done == 0 else 0,
                    rows=s.rows if last else 1,
                )
            )
            rows += n
            done += n
            if rows >= limit:
                close()
    close()
    return slices


class SliceClock:
    """The slice length of one stage, from its measured compute per token."""

    def __init__(self) -> None:
        self.per_token = math.inf  # seconds; the smallest observed over long steps

    def observe(self, tokens: int, seconds: float) -> None:
        """One step computed whole (slices count each as a step)."""
        if tokens >= MEASURED_FROM and seconds > 0:
            self.per_token = min(self.per_token, seconds / tokens)

    def limit(self) -> int:
        """Rows per slice (a very large number before anything is measured)."""
        if not math.isfinite(self.per_token):
            return 1 << 30
        return max(MIN_SLICE, int(SLICE_SECONDS / self.per_token))
