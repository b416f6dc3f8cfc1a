"""Group membership and the serving pipeline built from it.

Contract
--------
:class:`Group` holds every connected :class:`~master_core.link.WorkerLink` in join order.
Whenever membership changes it re-plans: if at least ``min_workers`` live links exist it
places layer ranges (:func:`~master_core.placement.place_layers`), bumps ``epoch``, sends each
chosen worker its ``Assign`` and waits for every ``Ready``; then ``stages`` is the pipeline in
order and ``serving`` is set.  While re-planning, or when too few workers remain, ``serving``
is clear and ``stages`` empty.  Listeners registered with ``on_reset`` are called on every
epoch change (the engine then replays running requests: all KV caches are gone).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from worker_core.wire import Assign

from .config import MasterConfig
from .link import LinkGone, LinkState, StepFailed, WorkerLink
from .placement import PlacementError, kv_token_budget, place_layers

log = logging.getLogger("molink.group")


class Group:
    def __init__(self, config: MasterConfig, model_ref: str, model_config: object) -> None:
        self.config = config
        self.model_ref = model_ref  # what workers resolve: a folder path, hub id, or "default"
        self.model_config = model_config
        self.num_layers = int(model_config.num_hidden_layers)  # type: ignore[attr-defined]
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

    def on_reset(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def live_links(self) -> list[WorkerLink]:
        return [l for l in self.links if l.state is not LinkState.GONE]

    def add(self, link: WorkerLink) -> None:
        self.links.append(link)
        log.info("worker %s joined from %s (%s, %.1f GB free)", link.name, link.peer, link.hello.device_name, link.hello.free_memory / 1e9)
        self._schedule_replan()

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
                live = self.live_links()
                if len(live) < self.config.min_workers:
                    self.problem = f"waiting for workers: {len(live)} of {self.config.min_workers} joined"
                    return
                epoch = self.epoch
                try:
                    ranges = place_layers(self.num_layers, [l.hello.free_memory for l in live])
                except PlacementError as e:
                    self.problem = str(e)
                    log.error("cannot place the model: %s", e)
                    return
                chosen = [(l, r) for l, r in zip(live, ranges) if r is not None]
                kv_bytes = _kv_bytes_per_token(self.model_config)
                self.problem = "loading layers on workers"
                try:
                    readies = await asyncio.gather(
                        *(
                            l.assign(
                                Assign(
                                    epoch=epoch,
                                    model=self.model_ref,
                                    layer_start=a,
                                    layer_end=b,
                                    num_layers=self.num_layers,
                                    max_batch_tokens=self.config.max_batch_tokens,
                                    kv_tokens=kv_token_budget(
                                        l.hello.free_memory, _weight_guess(a, b, self), kv_bytes * (b - a), self.config.max_kv_tokens
                                    ),
                                ),
                                self.config.assign_timeout,
                            )
                            for l, (a, b) in chosen
                        )
                    )
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
                    "state": l.state.value,
                    "layers": [a.layer_start, a.layer_end] if a else None,
                    "stage": self.stages.index(l) if l in self.stages else None,
                    "steps": l.steps,
                }
            )
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
