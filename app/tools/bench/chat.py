"""`molink bench --chat`: a multi-turn conversation with and without prefix caching, on one live group.

Contract: ``chat_profile(opts, profile)`` starts a shaped local group (the master in this
process, ``opts.workers`` worker processes on ``opts.model``, every link emulated at the
profile's delay and rate, as the other real benches do) and holds the same conversation
twice: first with the engine's prefix cache off, then on (each mode starts with no cached
prefix).  The conversation has ``len(TURNS)`` user turns; the second pastes about
``DOCUMENT_TOKENS`` tokens of a public-domain text; every turn sends the whole history
rendered by the model's chat template, exactly as the API and the chat window do, and the
assistant's answers (greedy, up to ``ANSWER_TOKENS`` tokens) go back into the history as the
text that was streamed.  Per mode and turn it reports the prompt tokens, the tokens reused
from the cache (``Request.cached_tokens``, the API's ``cached_tokens``) and the time to the
first token; per profile whether both modes answered with identical tokens, turn 5's TTFT
over turn 1's (cached), turn 5's TTFT without the cache over with it, and the share of turn
5's prompt reused.  ``chat_table(rows)`` prints them.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from master_core.request import FinishEvent, SamplingParams

if TYPE_CHECKING:
    from master_core.server import Master

    from .options import BenchOptions

TURNS = (
    "Hello! I will show you a story and ask a few questions about it. Are you ready?",
    "Here is the beginning of the story:\n\n{document}\n\nWhat is this part of the story about?",
    "Who is the main character, and what does she see first?",
    "Why does she follow the rabbit?",
    "Tell me in three sentences what happens to her.",
)
DOCUMENT_TOKENS = 2800  # about this many tokens of the text pasted in turn 2 (a history of ~3,000 by turn 5)
ANSWER_TOKENS = 40  # max_tokens of every answer (greedy; an answer may stop earlier): short, for a CPU run
MODES = {"no prefix cache": False, "prefix cache": True}
TURN_TIMEOUT = 900.0  # seconds one turn may take at most


def document(tokenizer: Any) -> str:
    """The first ``DOCUMENT_TOKENS`` tokens of Alice's Adventures in Wonderland (package data)."""
    text = resources.files("app.tools").joinpath("data/wonderland.txt").read_text(encoding="utf-8")
    ids = tokenizer(text[:20000], add_special_tokens=False)["input_ids"][:DOCUMENT_TOKENS]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


async def _turn(master: Master, messages: list[dict]) -> dict:
    """One turn through the engine as the API takes it: (its figures, the streamed answer text)."""
    engine = master.engine
    tok = engine.tokenizer
    text = await asyncio.to_thread(tok.apply_chat_template, messages, add_generation_prompt=True, tokenize=False)
    prompt = (await asyncio.to_thread(tok, text, add_special_tokens=False))["input_ids"]
    t0 = time.perf_counter()
    req = engine.submit(list(prompt), SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0))
    ttft: float | None = None
    pieces: list[str] = []
    while True:
        ev = await asyncio.wait_for(req.events.get(), TURN_TIMEOUT)
        if isinstance(ev, FinishEvent):
            if ev.reason == "error":
                raise RuntimeError(ev.error)
            break
        if ttft is None and ev.token_id >= 0:
            ttft = time.perf_counter() - t0
        pieces.append(ev.text)
    return {
        "prompt_tokens": len(prompt),
        "reused_tokens": req.cached_tokens,
        "ttft_s": ttft if ttft is not None else float("nan"),
        "answer_tokens": len(req.output),
        "tokens": list(req.output),
        "text": "".join(pieces),
    }


async def _conversation(master: Master, doc: str) -> list[dict]:
    messages: list[dict] = []
    turns = []
    for q in TURNS:
        messages.append({"role": "user", "content": q.format(document=doc)})
        t = await _turn(master, messages)
        messages.append({"role": "assistant", "content": t.pop("text")})
        turns.append(t)
    return turns


async def chat_profile(opts: BenchOptions, profile: str) -> dict:
    from .common import shaped_group
    from .options import PROFILES

    mbps, rtt = PROFILES[profile]
    async with shaped_group(opts, profile) as master:
        engine = master.engine
        doc = await asyncio.to_thread(document, engine.tokenizer)
        modes: dict[str, list[dict]] = {}
        for mode, caching in MODES.items():
            engine.kv.caching = caching
            engine.kv.forget_idle()  # each mode starts cold
            modes[mode] = await _conversation(master, doc)
        engine.kv.caching = True
        hit_rate = engine.cached_tokens_total / max(1, engine.prompt_tokens_total)
    off, on = modes["no prefix cache"], modes["prefix cache"]
    tokens_identical = [t["tokens"] for t in off] == [t["tokens"] for t in on]
    for turns in modes.values():
        for t in turns:
            t.pop("tokens")
    return {
        "profile": profile,
        "mbps": mbps,
        "rtt_s": rtt,
        "stages": opts.workers,
        "model": opts.model,
        "answer_tokens_max": ANSWER_TOKENS,
        "modes": modes,
        "tokens_identical": tokens_identical,
        "turn5_over_turn1_cached": on[-1]["ttft_s"] / on[0]["ttft_s"],
        "turn5_uncached_over_cached": off[-1]["ttft_s"] / on[-1]["ttft_s"],
        "turn5_reused_share": on[-1]["reused_tokens"] / on[-1]["prompt_tokens"],
        "engine_hit_rate": hit_rate,
    }


def chat_table(rows: list[dict]) -> str:
    lines = [
        "| profile | turn | prompt tokens | reused (cache) | TTFT no cache (s) | TTFT cache (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        off, on = r["modes"]["no prefix cache"], r["modes"]["prefix cache"]
        for i, (a, b) in enumerate(zip(off, on), start=1):
            lines.append(
                f"| {r['profile']} | {i} | {b['prompt_tokens']} | {b['reused_tokens']} | "
                f"{a['ttft_s']:.3f} | {b['ttft_s']:.3f} |"
            )
    lines.append("")
    for r in rows:
        lines.append(
            f"{r['profile']}: turn-5 TTFT / turn-1 (cache) {r['turn5_over_turn1_cached']:.2f}x; "
            f"turn-5 TTFT without / with cache {r['turn5_uncached_over_cached']:.1f}x; "
            f"turn-5 prompt reused {r['turn5_reused_share']:.1%}; tokens identical: {r['tokens_identical']}"
        )
    return "\n".join(lines)
