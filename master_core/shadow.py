"""A standby member's copy of the open requests' caches, kept in the background.

Contract
--------
A member that stands by with the whole model loaded (:meth:`~master_core.group.Group.shadow_target`,
keeping the rows at the serving pipeline's stage ends, ``Assign.tapes``) is sent, as ``Step``s of
token ids, every position of the running requests that every stage holds (``Request.computed``)
and it does not, under each request's KV id and generation, and before them the positions of the
cached prefixes they start from that are in use (conversations:
:func:`~master_core.rebuild.work_of`).  Nobody waits for those steps: they are neither measured
as the member's speed nor judged by step deadlines (:meth:`~master_core.link.WorkerLink.background`).
A member with a device of its own computes them on it; members sharing a machine with stages
(this project's test lab) share its CPU.
When a stage is lost, the group's repair gives its range to that member (it is preferred),
which keeps the caches of the range it computed (``KVStore.narrowed``): the rebuild
(:mod:`master_core.rebuild`) then computes only the positions it lacks, instead of every
position of every open request.

``await Shadow.run()`` keeps it up to date until cancelled: one step of at most ``STEP_TOKENS``
tokens at a time, the oldest requests first, and less than a step only ``FOLLOW`` seconds after
the last.  It holds at most the member's KV budget; KV ids that no running request uses any
more (nor starts from) are freed there.  ``handover(lost)`` is called at every epoch
change (the engine's reset): the copy is given up (``lost`` None: freed on the member) or,
for a repair, set aside; ``take(link)`` then gives the rebuild what ``link`` holds (KV id ->
positions) and forgets it.  ``behind()`` is the positions it lacks now (None: no member
copies); ``describe()`` says it for /health (``standby_copy``) and ``molink chaos``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator

from worker_core.wire import Assign, Step

from .group import Group
from .link import LinkGone, StepFailed, WorkerLink
from .rebuild import first_step, token_ids, work_of
from .request import Request

log = logging.getLogger(__name__)

# positions a step: small, because a repair's Assign waits on the member for the step it computes
STEP_TOKENS = 64
IDLE = 0.2  # seconds between looks when there is nothing to copy
# seconds a copy that lacks less than a step waits for more: a step of several positions a request
# costs less per position than one of single rows (the copy following 4 streams of 1,000+ tokens on
# this CPU took 0.57 of a core a step at a time); a repair then computes at most those positions
FOLLOW = 2.0
STEP_TIMEOUT = 60.0  # seconds a step may take (on a machine shared with busy stages) before it is given up


class Shadow:
    def __init__(self, group: Group, running: Callable[[], Iterable[Request]], step_ids: Iterator[int]) -> None:
        self.group = group
        self._running = running
        self._step_ids = step_ids
        self._link: WorkerLink | None = None  # the member copying now, and the assignment it copies under
        self._assignment: Assign | None = None
        self._held: dict[int, int] = {}  # KV id -> positions it holds
        self._round = 0  # bumped by ``handover``: a step of an older round is not counted
        self._handed: tuple[WorkerLink, dict[int, int]] | None = None
        self._sending: tuple[WorkerLink, dict[int, int]] | None = None  # the step out: its member, KV id -> start
        self.copied = 0  # positions computed by standby members (for /metrics and tests)
        self._last = 0.0  # when its last step went (event-loop time)

    def behind(self) -> int | None:
        """Positions of the running requests the copying member lacks (None: none copies)."""
        if self._link is None:
            return None
        return sum(w.upto - w.start for w in work_of(self._eligible(), self._held))

    def describe(self) -> dict | None:
        """For /health: the member copying and the positions it lacks (None: none copies)."""
        behind = self.behind()
        if self._link is None or behind is None:  # (both or neither)
            return None
        return {"member": self._link.name, "behind": behind, "held": sum(self._held.values())}

    def handover(self, lost: int | None) -> None:
        """The pipeline changed: stop copying; keep what the member holds for ``take`` when only
        stage ``lost`` is replaced (it may be the one taking the range), else free it there."""
        self._round += 1
        link, held = self._link, self._held
        self._link, self._assignment, self._held = None, None, {}
        if self._sending is not None:  # it writes on the member whatever becomes of its result
            sent_to, starts = self._sending
            self._sending = None
            if sent_to is link:  # what is sure: each of its KV ids holds the positions before the step
                held = {**held, **{kv: min(start, held.get(kv, start)) for kv, start in starts.items()}}
            else:
                sent_to.free(list(starts))
        if self._handed is not None:  # a repair given up before its rebuild
            self._handed[0].free(list(self._handed[1]))
            self._handed = None
        if link is None or not held:
            return
        if lost is None:
            link.free(list(held))
        else:
            self._handed = (link, held)

    def take(self, link: WorkerLink) -> dict[int, int]:
        """What ``link`` held when the pipeline was repaired (KV id -> positions), once; {} when
        it copied nothing (another member took the range: what the copier held is freed)."""
        handed, self._handed = self._handed, None
        if handed is None:
            return {}
        if handed[0] is not link:
            handed[0].free(list(handed[1]))
            return {}
        return handed[1]

    def _eligible(self) -> list[Request]:
        return sorted((r for r in self._running() if r.kv_id), key=lambda r: r.order)

    def _follow(self) -> WorkerLink | None:
        """The member to copy to now; a change of member or of its assignment starts over."""
        link = self.group.shadow_target()
        asg = link.assignment if link is not None else None
        if link is not self._link or asg is not self._assignment:
            if self._link is not None and self._held:
                self._link.free(list(self._held))
            self._link, self._assignment, self._held = link, asg, {}
            if link is not None:
                log.info("%s keeps a copy of the open requests' caches while it stands by", link.name)
        return link

    async def run(self) -> None:
        while True:
            if not await self._step():
                await asyncio.sleep(IDLE)

    async def _step(self) -> bool:
        """Send the next step to the copying member and count it; False when there was none."""
        link = self._follow() if self.group.serving else None
        if link is None or link.assignment is None:
            return False
        reqs = self._eligible()
        live = {w.kv_id for w in work_of(reqs, self._held)}
        stale = [kv for kv in self._held if kv not in live]
        if stale:
            link.free(stale)
            for kv in stale:
                del self._held[kv]
        room = link.assignment.kv_tokens - sum(self._held.values())
        lo, hi = 0, len(reqs)  # the oldest first, as many as its budget holds (what they need only grows)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if sum(w.upto - w.start for w in work_of(reqs[:mid], self._held)) <= room:
                lo = mid
            else:
                hi = mid - 1
        work = work_of(reqs[:lo], self._held)
        size = min(STEP_TOKENS, link.assignment.max_batch_tokens)
        now = asyncio.get_running_loop().time()
        segments = first_step(work, size, now < self._last + FOLLOW)
        if segments is None:
            return False
        self._last = now
        round_ = self._round
        step = Step(next(self._step_ids), link.assignment.epoch, segments, token_ids(segments, work))
        self._sending = (link, {s.request_id: s.start for s in segments})
        try:
            await link.background(step, STEP_TIMEOUT)
        except (StepFailed, LinkGone, asyncio.TimeoutError) as e:
            log.info("%s: a step of the copy failed (%s); those requests start over", link.name, e or "timed out")
            if round_ == self._round and link is self._link:
                self._sending = None
                failed = [s.request_id for s in segments]
                link.free(failed)
                for kv in failed:
                    self._held.pop(kv, None)
            return False
        if round_ == self._round and link is self._link:
            self._sending = None
            for s in segments:
                self._held[s.request_id] = s.start + s.length  # (a prefix's own positions counted from 0)
            self.copied += sum(s.length for s in segments)
        return True
