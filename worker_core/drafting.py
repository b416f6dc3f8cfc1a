"""What a last stage drafts with inside the loop-back: prompt lookup, and a draft model if given.

Contract
--------
:class:`LoopDrafts` belongs to one tunnel's :class:`~worker_core.session.Session`.  It keeps the
tokens of the requests the stage drafts for (:class:`~worker_core.lookup.Histories`: started
from the history a loop's first step carries, extended with every token the stage accepts,
forgotten when the loop ends) and, where the ``Assign`` named one (``Assign.draft_model``), a
:class:`~worker_core.draft_model.DraftModel` held while the assignments name the same one.

``await draft(jobs)`` takes ``(kv_id, k, model_k)`` per segment and returns, in order, the
segment's drafts and whether the draft model made them: prompt lookup's up to ``k`` first; for
the segments it found nothing for, the draft model's up to ``model_k`` (one call for them all,
waited on at most ``MODEL_TIMEOUT`` seconds: a loop's next step waits for it, and drafts are
optional).  The draft model's per-request caches outlive a loop (the next loop feeds only the
tokens that changed) and go with ``free`` (the master's ``Free``) or ``drop``.

``await hold(key, load)`` keeps the draft model of ``key`` (``load()`` it when another or none
is held; a failed load is logged and holds none) and returns the seconds one drafted token
costs, measured on a warm-up draft (0: none held).  :attr:`token_seconds` is what a drafted
token costs the step that waits for it: the wall time of the model's calls per token they
drafted (a running average: the model's passes compete with the stage for the cores), the
warm-up's until it drafted.  ``close`` drops everything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence

from .draft_model import DraftModel
from .lookup import Histories

log = logging.getLogger("molink.worker")

MODEL_TIMEOUT = 2.0  # seconds a fed-back step waits for the draft model's drafts at most
COST_DECAY = 0.8  # weight of the earlier calls in the running cost of a drafted token
_WARM_UP = (1, 2, 3, 4)  # tokens of the warm-up draft that measures a drafted token's cost
_WARM_KEY = -1  # its cache key (KV ids are never negative)


class LoopDrafts:
    """A last stage's drafting state (see the module docstring)."""

    def __init__(self) -> None:
        self.histories = Histories()
        self.model: DraftModel | None = None
        self._key: Hashable | None = None  # what the held draft model is (Assign's draft source)
        self._waited = 0.0  # running wall seconds per drafted token (0: not measured yet)

    async def hold(self, key: Hashable, load: Callable[[], Awaitable[DraftModel]]) -> float:
        if self.model is None or self._key != key:
            self.drop()
            try:
                model = await load()
                await model.propose([(_WARM_KEY, _WARM_UP, 2)])
                model.free(_WARM_KEY)
            except Exception as e:  # drafts are optional: the stage serves without them
                log.warning("the draft model could not be loaded; the loop-back drafts by prompt lookup only: %s", e)
                return 0.0
            self.model, self._key, self._waited = model, key, 0.0
        return max(self.model.token_seconds, 1e-6)

    @property
    def token_seconds(self) -> float:
        """What one drafted token costs the step waiting for it (0: no model held)."""
        if self.model is None:
            return 0.0
        return self._waited or max(self.model.token_seconds, 1e-6)

    def drop(self) -> None:
        """Hold no draft model (its caches and thread go)."""
        model, self.model, self._key = self.model, None, None
        if model is not None:
            model.close()

    async def draft(self, jobs: Sequence[tuple[int, int, int]]) -> list[tuple[tuple[int, ...], bool]]:
        out = [(self.histories.draft(kv_id, k), False) for kv_id, k, _ in jobs]
        model = self.model
        wanted = [i for i, ((drafts, _), (kv_id, _, mk)) in enumerate(zip(out, jobs)) if not drafts and mk > 0]
        asks = [(jobs[i][0], self.histories.tokens(jobs[i][0]), jobs[i][2]) for i in wanted] if model else []
        asks = [a for a in asks if a[1]]  # a request whose history is not held drafts nothing
        if model is None or not asks:
            return out
        began = time.perf_counter()
        made = await model.propose(asks, MODEL_TIMEOUT)
        per = (time.perf_counter() - began) / max(1, sum(len(d) for d in made))
        self._waited = per if not self._waited else COST_DECAY * self._waited + (1 - COST_DECAY) * per
        by_id = {kv_id: drafts for (kv_id, _, _), drafts in zip(asks, made)}
        for i in wanted:
            drafts = by_id.get(jobs[i][0], ())
            out[i] = (drafts, bool(drafts))
        return out

    def free(self, kv_ids: Sequence[int]) -> None:
        """The requests ended (or were freed): forget their tokens and the model's caches."""
        self.histories.forget(kv_ids)
        if self.model is not None:
            for kv_id in kv_ids:
                self.model.free(kv_id)

    def close(self) -> None:
        self.histories = Histories()
        self.drop()
