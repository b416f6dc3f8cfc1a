"""Group membership and the serving pipeline built from it.

Contract
--------
:class:`Group` holds every connected :class:`~master_core.link.WorkerLink` in join order.
Whenever membership changes it re-plans (unless a newcomer would only stand by: then the
running pipeline is left alone): if at least ``min_workers`` live links exist it
plans the pipeline order and layer ranges from each member's offered memory, measured
speed and announced link (:func:`planner_members`, :func:`~master_core.placement.plan_pipeline`), bumps ``epoch``, sends each
chosen worker its ``Assign`` and waits for every ``Ready``; then ``stages`` is the pipeline in
order and ``serving`` is set.  While re-planning, or when too few workers remain, ``serving``
is clear and ``stages`` empty.  Listeners registered with ``on_reset`` are called on every
epoch change (the engine then replays running requests: all KV caches are gone).

A worker may ask to leave (wire ``Leave``; :meth:`Group.leave`).  Now: its link closes with
"left the group" and is removed at once (re-plan, replay).  ``finish``: a link serving a stage
while requests run moves to DRAINING: no placement chooses it any more, it keeps serving the
current pipeline until every request running when the Leave arrived has ended (as
``running_requests``, set by the master, tells) or ``finish_timeout`` passes, then it leaves
the same way.  Placement only ever considers links in CONNECTING or READY.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Sequence

from worker_core.control import FINISH_TIMEOUT
from worker_core.weights import manifest_digest
from worker_core.wire import Assign, Hello

from .config import MasterConfig
from .link import LinkGone, LinkState, StepFailed, WorkerLink
from .weight_source import WeightSource
from .placement import Member, ModelShape, PlacementError, kv_token_budget, plan_pipeline

log = logging.getLogger("molink.group")

KV_RESERVE_TOKENS = 2048  # KV room every stage must have beside its weights, in tokens


class Group:
    def __init__(self, config: MasterConfig, model_ref: str, model_config: object) -> None:
        self.config = config
        self.model_ref = model_ref  # what workers resolve: a folder path, hub id, or "default"
        self.model_config = model_config
        self.num_layers = int(model_config.num_hidden_layers)  # type: ignore[attr-defined]
        self.layer_params: list[int] = []  # parameters per layer, embeddings, head (set by the master)
        self.embed_params = 0
        self.head_params = 0
        self.links: list[WorkerLink] = []
        self.stages: list[WorkerLink] = []
        self.epoch = 0
        self.kv_tokens = 0  # smallest KV budget over the stages, in tokens
        self.serving = asyncio.Event()
        self.problem: str | None = f"waiting for {config.min_workers} worker(s)"
        self._listeners: list[Callable[[], None]] = []
        self._replan_lock = asyncio.Lock()
        self._replan_task: asyncio.Task | None = None
        self.closing = False  # set by the master on shutdown: departures are expected then
        self.weights: WeightSource | None = None  # set in a paired group: workers get weights from us
        self.standby: dict[str, str] = {}  # live members the last plan left out -> why
        self._planned: tuple[tuple[WorkerLink, ...], list] | None = None  # the last plan and the links it was made for
        self.running_requests: Callable[[], set[int]] = set  # ids of the requests running now (set by the master)
        self.finish_timeout = FINISH_TIMEOUT  # seconds a finishing worker is kept for its running requests
        self._drains: set[asyncio.Task] = set()

    async def _delivery(self, start: int, end: int) -> dict[str, object]:
        """Assign fields that make the master deliver the range's weights (paired groups)."""
        if self.weights is None:
            return {}
        config_json, specs = await asyncio.to_thread(self.weights.manifest, start, end)
        return {"model": manifest_digest(config_json, specs), "config_json": config_json, "manifest": tuple(specs), "hub": self.weights.hub}

    def on_reset(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def live_links(self) -> list[WorkerLink]:
        return [l for l in self.links if l.state is not LinkState.GONE]

    def placeable_links(self) -> list[WorkerLink]:
        """Live links a placement may choose: not leaving."""
        return [l for l in self.links if l.placeable]

    def add(self, link: WorkerLink) -> None:
        link.on_leave = self.leave
        self.links.append(link)
        log.info("worker %s joined from %s (%s, %.1f GB free)", link.name, link.peer, link.hello.device_name, link.hello.free_memory / 1e9)
        if self._plan_unchanged():
            log.info("the pipeline stays as it is: %s stands by (%s)", link.name, self.standby.get(link.name))
            return
        self._schedule_replan()

    def _plan_unchanged(self) -> bool:
        """Serving, and a plan with the current members would keep every stage and range (the
        newcomer stands by): nothing needs to move."""
        if not self.serving.is_set() or not self.stages:
            return False
        try:
            chosen = self._place(self.placeable_links())
        except PlacementError:
            return False
        current = [(l, (l.assignment.layer_start, l.assignment.layer_end)) for l in self.stages if l.assignment]
        return chosen == current

    def leave(self, link: WorkerLink, finish: bool) -> None:
        """The worker of ``link`` asked to leave: now, or (``finish``) after the requests
        running at this moment have ended."""
        if link.state is LinkState.GONE or link not in self.links or (finish and link.state is LinkState.DRAINING):
            return  # gone, or already finishing
        if finish and link.state is LinkState.READY and link in self.stages and self.serving.is_set():
            running = self.running_requests()
            if running:
                link.move(LinkState.DRAINING)
                log.info("worker %s leaves after %d running request(s) end (at most %.0f s)",
                         link.name, len(running), self.finish_timeout)
                task = asyncio.get_running_loop().create_task(self._drain(link, running))
                self._drains.add(task)
                task.add_done_callback(self._drains.discard)
                task.add_done_callback(_log_failure)
                return
        self._depart(link)

    async def _drain(self, link: WorkerLink, running: set[int]) -> None:
        """Keep a DRAINING link serving until ``running`` requests end, it stops being a stage
        (a re-plan happened meanwhile), it is gone, or ``finish_timeout`` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.finish_timeout
        while link.state is LinkState.DRAINING and link in self.stages and running & self.running_requests():
            if loop.time() >= deadline:
                log.warning("worker %s: requests still running after %.0f s; it leaves anyway",
                            link.name, self.finish_timeout)
                break
            await asyncio.sleep(0.05)
        self._depart(link)

    def _depart(self, link: WorkerLink) -> None:
        """Close a leaving link and remove it at once (before any lane sees the closed link
        under the old epoch): the re-plan and the replay start now."""
        if link.state is not LinkState.GONE:
            link.close_with("left the group")
        self.remove(link)

    def remove(self, link: WorkerLink) -> None:
        if link in self.links:
            self.links.remove(link)
            if self.closing:
                return
            log.warning("worker %s left: %s", link.name, link.gone_reason)
            if link in self.stages or not self.serving.is_set():
                self._schedule_replan()

    def _schedule_replan(self) -> None:
        self._invalidate()
        self._replan_task = asyncio.get_running_loop().create_task(self._replan())
        self._replan_task.add_done_callback(_log_failure)

    def _invalidate(self) -> None:
        self.serving.clear()
        self.stages = []
        self.epoch += 1
        for listener in self._listeners:
            listener()

    async def _replan(self) -> None:
        async with self._replan_lock:
            if self.serving.is_set():
                return
            while True:
                live = self.placeable_links()
                if len(live) < self.config.min_workers:
                    self.problem = f"waiting for workers: {len(live)} of {self.config.min_workers} joined"
                    return
                epoch = self.epoch
                try:
                    chosen = self._place(live)
                except PlacementError as e:
                    self.problem = f"the group cannot hold the model: {e}"
                    log.error("cannot place the model: %s", e)
                    return
                kv_bytes = _kv_bytes_per_token(self.model_config)
                self.problem = "loading layers on workers"
                assignments = []
                for l, (a, b) in chosen:
                    try:
                        fields = {"model": self.model_ref, **await self._delivery(a, b)}
                    except Exception as e:  # an unreadable checkpoint: nothing a re-plan can fix
                        self.problem = f"cannot prepare the weights of layers [{a}, {b}): {type(e).__name__}: {e}"
                        log.exception("cannot prepare the weights of layers [%d, %d)", a, b)
                        return
                    kv = kv_token_budget(l.hello.free_memory, _weight_guess(a, b, self), kv_bytes * (b - a), self.config.max_kv_tokens)
                    assignments.append(
                        Assign(epoch=epoch, layer_start=a, layer_end=b, num_layers=self.num_layers, max_batch_tokens=self.config.max_batch_tokens, kv_tokens=kv, **fields)  # type: ignore[arg-type]
                    )
                try:
                    readies = await asyncio.gather(*(l.assign(asg, self.config.assign_timeout) for (l, _), asg in zip(chosen, assignments)))
                except (LinkGone, StepFailed, asyncio.TimeoutError) as e:
                    log.warning("assignment failed, re-planning: %s", e or type(e).__name__)
                    for l, _ in chosen:
                        if l.state is not LinkState.READY:
                            l.close_with(f"assignment failed: {e or type(e).__name__}")
                            if l in self.links:
                                self.links.remove(l)
                    if self.epoch == epoch:
                        self._invalidate()
                    continue
                if self.epoch != epoch:  # membership changed while loading
                    continue
                bad = [l for (l, _), r in zip(chosen, readies) if r.vocab_size != self.model_config.vocab_size]  # type: ignore[attr-defined]
                if bad:
                    self.problem = f"worker {bad[0].name} loaded a different model"
                    return
                self.stages = [l for l, _ in chosen]
                self.kv_tokens = min(l.assignment.kv_tokens for l in self.stages)  # type: ignore[union-attr]
                self.problem = None
                self.serving.set()
                log.info(
                    "serving epoch %d on %d stage(s): %s",
                    epoch,
                    len(self.stages),
                    ", ".join(f"{l.name}[{a}:{b})" for l, (a, b) in chosen),
                )
                return

    def _place(self, live: list[WorkerLink]) -> list[tuple[WorkerLink, tuple[int, int]]]:
        """Pipeline order and ranges from each member's memory, measured speed and link.
        A link's announcement never changes, so a plan is remembered for its set of links
        (a join checks it, and the re-plan that may follow uses it)."""
        if self._planned is not None and self._planned[0] == tuple(live):
            return self._planned[1]
        item = {"float32": 4, "float16": 2, "bfloat16": 2}
        layer_params = max(self.layer_params) if self.layer_params else 0
        itemsize = max(item.get(l.hello.dtype, 4) for l in live)
        shape = ModelShape(
            num_layers=self.num_layers,
            layer_bytes=layer_params * itemsize,
            first_bytes=self.embed_params * itemsize,
            last_bytes=self.head_params * itemsize,
            kv_bytes_per_layer=_kv_bytes_per_token(self.model_config) * KV_RESERVE_TOKENS,
        )
        hidden = int(self.model_config.hidden_size)  # type: ignore[attr-defined]
        members = planner_members([l.hello for l in live], layer_params, hidden, itemsize)
        plan = plan_pipeline(shape, members)
        self.standby = {}
        for m, l in zip(members, live):
            if m.name not in plan.order:
                why = (f"its link ({m.link_seconds * 1000:.0f} ms per step) is slower than the pipeline without it ({plan.step_seconds * 1000:.0f} ms)"
                       if m.link_seconds > plan.step_seconds else "the others hold the model as fast without it")
                self.standby[l.name] = why
                log.info("%s stands by: %s", l.name, why)
        chosen = [(live[int(name)], rng) for name, rng in zip(plan.order, plan.ranges)]
        self._planned = (tuple(live), chosen)
        return chosen

    def describe(self) -> list[dict]:
        """Members as plain data (for /health and the dashboard)."""
        out = []
        for l in self.links:
            a = l.assignment if l in self.stages else None
            out.append(
                {
                    "name": l.name,
                    "peer": l.peer,
                    "device": l.hello.device,
                    "device_name": l.hello.device_name,
                    "free_memory": l.hello.free_memory,
                    "gflops": round(l.hello.gflops, 1),
                    "compute_capability": l.hello.compute_capability,
                    "driver": l.hello.driver,
                    "ram_total": l.hello.ram_total,
                    "cpu_cores": l.hello.cpu_cores,
                    "rtt_ms": round(l.hello.rtt_ms, 2),
                    "link_mbps": round(l.hello.link_mbps, 1),
                    "state": l.state.value,
                    "layers": [a.layer_start, a.layer_end] if a else None,
                    "stage": self.stages.index(l) if l in self.stages else None,
                    "standby": self.standby.get(l.name) if l not in self.stages else None,
                    "steps": l.steps,
                }
            )
        return out


REF_ROWS = 32  # the reference step the planner times: one micro-batch of 32 rows
LINK_NOISE = 0.010  # seconds: link times closer than this to the group's best count as equal


def planner_members(hellos: Sequence[Hello], layer_params: int, hidden_size: int, itemsize: int) -> list[Member]:
    """Planner members (named by index) from what the workers announced.

    Times are for a reference step of ``REF_ROWS`` rows.  Compute per layer is
    ``2 * layer_params * REF_ROWS`` FLOPs at the member's measured GFLOP/s, where members whose
    speeds are within a factor of two of the group's median count as equal; a start-up burst
    on CPUs that several workers share measures the contention, not the machine, so speeds
    are used only when every member computes on its own GPU (else all run at the median).
    The link time is the announced round trip plus the step's activations in and out at the
    announced bandwidth (the master relays: both cross the member's link); unknown parts count
    zero.  Links are counted from the group's best and differences under ``LINK_NOISE`` are
    dropped.  When no member measured its speed, times are relative and links are left out."""
    on_gpus = all(h.device.startswith("cuda") for h in hellos)
    rel = _relative_times([h.gflops for h in hellos]) if on_gpus else [1.0] * len(hellos)
    known = sorted(h.gflops for h in hellos if h.gflops > 0)
    if not known or layer_params <= 0:
        return [Member(str(i), h.free_memory, t) for i, (h, t) in enumerate(zip(hellos, rel))]
    base = 2 * layer_params * REF_ROWS / (known[len(known) // 2] * 1e9)  # seconds per layer at the median speed
    activations = 2 * REF_ROWS * hidden_size * itemsize * 8  # bits in and out
    links = [h.rtt_ms / 1000 + (activations / (h.link_mbps * 1e6) if h.link_mbps > 0 else 0.0) for h in hellos]
    best = min(links)
    # a time added to every stage changes no choice, so links count from the best one; a
    # short measurement on a busy machine is noisy, so a link within LINK_NOISE of the best counts as equal
    extra = [x - best if x - best > LINK_NOISE else 0.0 for x in links]
    return [Member(str(i), h.free_memory, t * base, x) for i, (h, t, x) in enumerate(zip(hellos, rel, extra))]


def _relative_times(gflops: list[float]) -> list[float]:
    """Relative time per layer of each member from its measured speed.  A start-up burst is
    noisy (members often share a machine or warm up), so speeds within a factor of two of the
    group's median count as equal; only clearly faster or slower machines get more or fewer
    layers."""
    known = sorted(g for g in gflops if g > 0)
    if not known:
        return [1.0] * len(gflops)
    median = known[len(known) // 2]
    out = []
    for g in gflops:
        ratio = g / median if g > 0 else 1.0
        out.append(1.0 if 0.5 <= ratio <= 2.0 else 1.0 / ratio)
    return out


def _kv_bytes_per_token(cfg: object) -> int:
    """KV bytes per token per layer (float32 upper bound)."""
    heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads  # type: ignore[attr-defined]
    return 2 * int(heads) * int(head_dim) * 4


def _weight_guess(a: int, b: int, group: Group) -> int:
    """Rough float32 weight bytes of layers [a, b) (12 h^2 per layer), for KV sizing only."""
    h = int(group.model_config.hidden_size)  # type: ignore[attr-defined]
    return (b - a) * 12 * h * h * 4


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("re-planning failed", exc_info=task.exception())
