"""`molink bench --hops`: direct stage-to-stage hops against the relay, on one live group.

Contract: ``hops_profile(opts, profile)`` starts a shaped local group (the master in this
process, ``opts.workers`` worker processes on the default model, every worker's links emulated
at the profile's one-way delay and rate: its tunnel both ways, and its direct hop to the next
stage on the sending side, so every pair of machines is the same distance apart) and runs one
greedy stream at a time, alternating the engine between three modes (``ROUNDS`` rounds of each,
same prompt): direct hops with the loop-back (the last stage draws the next tokens and feeds them straight back
to the first, ``Step.loop``), direct hops with the master sending every step, and relaying every
hop through the master.  Per mode it reports the median
single-stream TPOT over the rounds and the master's bytes per generated token (every frame on
the stages' tunnels, both ways), the hops as the group routed them, and whether the greedy
tokens were identical across modes.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from master_core.request import SamplingParams

from .common import shaped_group, token_times

if TYPE_CHECKING:
    from master_core.server import Master

    from .options import BenchOptions

ROUNDS = 3  # alternations of the modes per profile
MODES = {  # name: (Engine.direct, Engine.loop_back)
    "direct": (True, True),
    "direct, no loop-back": (True, False),
    "relayed": (False, False),
}
NEW_TOKENS = 64
PROMPT_TOKENS = 16


def _master_bytes(master: Master) -> int:
    return sum(link.bytes_sent + link.bytes_received for link in master.group.stages)


async def _stream(master: Master, prompt: list[int]) -> tuple[list[int], float, float]:
    """One greedy stream: (tokens, TPOT seconds, master bytes per token)."""
    engine = master.engine
    before = _master_bytes(master)
    req = engine.submit(prompt, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    times = await token_times(req)
    spent = _master_bytes(master) - before
    return req.output, (times[-1] - times[0]) / max(1, len(times) - 1), spent / max(1, len(req.output))


async def hops_profile(opts: BenchOptions, profile: str) -> dict:
    from .options import PROFILES

    mbps, rtt = PROFILES[profile]
    async with shaped_group(opts, profile) as master:
        engine, group = master.engine, master.group
        hops = [h.describe() for h in group.hops] + [f"loop-back: {group.loop_back.describe()}"]
        prompt = [1000 + 7 * i for i in range(PROMPT_TOKENS)]
        runs: dict[str, list[tuple[list[int], float, float]]] = {mode: [] for mode in MODES}
        for _ in range(ROUNDS):
            for mode, (direct, loop_back) in MODES.items():
                engine.direct, engine.loop_back = direct, loop_back
                runs[mode].append(await _stream(master, prompt))
        engine.direct = engine.loop_back = True
        still = [h.describe() for h in group.hops] + [f"loop-back: {group.loop_back.describe()}"]
    out = {
        mode: {
            "tpot_ms_median": statistics.median(r[1] for r in rs) * 1000,
            "tpot_ms_each": [round(r[1] * 1000, 1) for r in rs],
            "master_bytes_per_token": statistics.median(r[2] for r in rs),
        }
        for mode, rs in runs.items()
    }
    tokens = [r[0] for rs in runs.values() for r in rs]
    direct, relayed, no_loop = out["direct"], out["relayed"], out["direct, no loop-back"]
    return {
        "profile": profile,
        "mbps": mbps,
        "rtt_s": rtt,
        "stages": opts.workers,
        "new_tokens": NEW_TOKENS,
        "rounds": ROUNDS,
        "hops_at_plan": hops,
        "hops_at_end": still,
        "modes": out,
        "tpot_change": direct["tpot_ms_median"] / relayed["tpot_ms_median"] - 1,
        "tpot_change_no_loop_back": no_loop["tpot_ms_median"] / relayed["tpot_ms_median"] - 1,
        "master_bytes_ratio": direct["master_bytes_per_token"] / relayed["master_bytes_per_token"],
        "tokens_identical": all(t == tokens[0] for t in tokens),
    }


def hops_table(rows: list[dict]) -> str:
    lines = [
        f"{'profile':<8} {'TPOT direct':>12} {'no loop-back':>13} {'relayed':>10} {'change':>8} {'(no loop)':>9} "
        f"{'master B/tok direct':>20} {'relayed':>9} {'ratio':>6}  identical"
    ]
    for r in rows:
        d, n, rl = r["modes"]["direct"], r["modes"]["direct, no loop-back"], r["modes"]["relayed"]
        lines.append(
            f"{r['profile']:<8} {d['tpot_ms_median']:>9.1f} ms {n['tpot_ms_median']:>10.1f} ms "
            f"{rl['tpot_ms_median']:>7.1f} ms {r['tpot_change'] * 100:>+7.1f}% "
            f"{r['tpot_change_no_loop_back'] * 100:>+8.1f}% {d['master_bytes_per_token']:>20.0f} "
            f"{rl['master_bytes_per_token']:>9.0f} {r['master_bytes_ratio']:>6.2f}  {r['tokens_identical']}"
        )
    return "\n".join(lines)
