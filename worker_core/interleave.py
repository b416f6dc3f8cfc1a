"""How many layers of a longer step a stage runs before it serves the decode steps waiting.

Contract
--------
A stage computes one step at a time.  A decode step that arrives while a prefill chunk
computes would wait for all of it, and then meet the same chunk again at the next stage, which
the chunk reached first: on a compute-bound pipeline the streams follow the chunk from stage to
stage (a convoy), and every stream's gap grows by the chunk's whole trip.  So the session runs
any step that is not a decode step a few layers at a time
(:class:`worker_core.stage.StepRun`) and serves the decode steps queued meanwhile between them:
they wait for a few layers, then overtake the chunk.  Pausing between layers costs no extra
compute (the layers run as they would in one call); each pause costs one hand-over to the
executor thread.

:class:`LayerClock` chooses the layers per run from the stage's measured compute per token and
layer, so that one run takes about :data:`PAUSE_SECONDS`: a fast stage (a GPU) runs a step
whole, a slow one pauses every layer; before anything is measured, every layer.
"""

from __future__ import annotations

import math

PAUSE_SECONDS = 0.02  # about the compute between two chances for waiting decode steps
MEASURED_FROM = 16  # tokens: a step this long or longer tells the per-token cost


class LayerClock:
    """The layers a stage runs between two pauses, from its measured compute per token-layer."""

    def __init__(self) -> None:
        self.per_token_layer = math.inf  # seconds; the smallest observed

    def observe(self, tokens: int, layers: int, seconds: float) -> None:
        """One step's compute (pauses excluded)."""
        if tokens >= MEASURED_FROM and layers > 0 and seconds > 0:
            self.per_token_layer = min(self.per_token_layer, seconds / (tokens * layers))

    def layers(self, tokens: int, total: int) -> int:
        """Layers to run before the next pause, for a step of ``tokens``, of ``total`` layers."""
        if not math.isfinite(self.per_token_layer):
            return 1
        return max(1, min(total, int(PAUSE_SECONDS / (self.per_token_layer * max(1, tokens)))))
