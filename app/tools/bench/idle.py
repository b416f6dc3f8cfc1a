"""What each stage's longer steps cost on an idle group: the points the simulator computes prompts at.

Contract
--------
``await idle_curves(master, prompts)`` sends each of ``prompts`` alone through the serving
group, one at a time and each whole (one step of prefill alone: the ``no-chunking`` policy, the
one before set again after), and returns per stage, in pipeline order, the (tokens, compute
seconds) each stage measured for it.  Nothing else runs meanwhile, so no other stage's step
shares the machine's cores with it: what a step of that size costs.  The engine's measured
curve (:meth:`~master_core.costs.StageCost.curve`) has only the fastest of the steps a run
made, and a run makes few long steps, all while other stages compute beside them; the
simulator, which shares the cores itself, then counted that sharing twice (calibration runs of
2026-12-06: its steps of prefill alone computed at 1.17-1.39 times that curve, the real ones at
0.94-1.29; its first chunks mostly came back late, by up to half, and at 0.87 times the
curve's long steps most came within a tenth).  The caller makes the prompts of fresh random
tokens, so that no cached prefix serves them; each wants one token.  The master's measured
costs are set back as they were (the engine plans the run that follows as it would have; what
the stages learnt from the steps, their layer clocks, stays).

``physics_curves(curves, idle)`` is what the calibration computes with: per stage, the run's
curve below the smallest idle size (steps of a few rows, made hundreds of times a run, so their
fastest ran alone), and the idle points from there on.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the engine (torch) is imported only when a real run starts
    from master_core.server import Master

IDLE_SIZES = (128, 256, 512, 1024)  # tokens: a size class each (StageCost's classes are a factor 2 apart)

Curve = tuple[tuple[float, float], ...]


async def idle_curves(master: Master, prompts: list[list[int]]) -> tuple[Curve, ...]:
    from master_core.request import SamplingParams
    from master_core.scheduler import policy

    engine = master.engine
    before, hook = engine.policy, engine.on_step
    records: list[dict] = []
    links = list(master.group.stages)
    saved = [(copy.deepcopy(k.stage_cost), copy.deepcopy(k.link_cost)) for k in links]
    points: list[list[tuple[float, float]]] = [[] for _ in links]
    try:
        engine.set_policy(policy("no-chunking", master.config.max_batch_tokens))
        engine.on_step = records.append
        for prompt in prompts:
            records.clear()
            n = len(prompt)
            await engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
            step = next((r for r in records if r["prefill_tokens"] == n and r["computes"] and not r["failed"]), None)
            if step is None:  # it went in pieces after all (a longer prompt than a step may carry)
                continue
            for i, seconds in enumerate(step["computes"][: len(points)]):
                points[i].append((float(n), float(seconds)))
    finally:
        engine.on_step = hook
        engine.set_policy(before)
        for k, (stage_cost, link_cost) in zip(links, saved):
            k.stage_cost, k.link_cost = stage_cost, link_cost
    return tuple(tuple(p) for p in points)


def physics_curves(curves: tuple[Curve, ...], idle: tuple[Curve, ...]) -> tuple[Curve, ...]:
    """Per stage, ``curves``' points below the smallest size ``idle`` measured, then ``idle``'s
    (a stage with no idle points keeps its curve)."""
    out = []
    for curve, alone in zip(curves, idle):
        if not alone:
            out.append(curve)
            continue
        first = min(x for x, _ in alone)
        out.append(tuple(sorted((*(p for p in curve if p[0] < first), *alone))))
    return tuple(out)
