"""`molink bench --speculative`: decode speed with and without prompt-lookup speculation, on one live group.

Contract: ``speculative_profile(opts, profile)`` starts a shaped local group (the master in this
process, ``opts.workers`` worker processes on ``opts.model``, every link emulated at the
profile's delay and rate, as the other real benches do) and runs every task of ``TASKS`` one
request at a time, greedy, up to ``ANSWER_TOKENS`` tokens, first with speculation off (the
engine as configured by default: the loop-back on where hops are direct), then on with the
master drafting (``master``: a drafting request goes through the master every step), then on as
the engine runs it by default (``speculative``: where the pipeline loops back, the last stage
drafts inside the loop-back; :mod:`master_core.speculation`). Tasks grounded in their prompt
(copy a passage, edit a piece of code, summarize a text; the text is given in the prompt) and
open-ended chat. Per task and mode it reports the decode tokens/s (tokens after the first over
the time after the first), the trips the request's decode took (pipeline steps that carried it),
tokens per trip, drafts sent and accepted per trip, and the bytes each hop carried per generated
token (hidden states of every row sent, drafts included); per task whether both modes gave
identical tokens and the speed-ups. With ``opts.draft_model`` (:func:`draft_folder`: a folder,
``self`` or ``first:N``) two more modes draft with that model where prompt lookup finds nothing
(:mod:`worker_core.draft_model`): ``draft``, the last stage's copy inside the loop-back (the
engine's default), and ``draft-master``, the master's (the loop-back off), side by side; each
reports the trips that carried the model's drafts and the model's drafts sent and accepted per
such trip (``draft_table``; the drafting seconds only where the master drafts: the last stage's
are spent in its own process). ``local_copy(opts)`` decodes
the copy task in one transformers process with no links at all (the ceiling a group is compared
with). ``speculative_table`` prints it all.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from master_core.request import SamplingParams

from .common import shaped_group, token_times

if TYPE_CHECKING:
    from master_core.server import Master

    from .options import BenchOptions

ANSWER_TOKENS = 64  # max_tokens of every answer (greedy): short, for a CPU run
TASK_TIMEOUT = 900.0  # seconds one answer may take at most

PASSAGE = (
    "Pooling consumer graphics cards lets a group of friends serve a language model that none of "
    "them could hold alone. Each machine keeps a contiguous range of layers, and the activations "
    "travel from one machine to the next over ordinary home links. A step that crosses a slow link "
    "costs far more than the computation it carries."
)
CODE = """def mean(values):
    count = 0
    total = 0.0
    for v in values:
        total += v
        count += 1
    return total / count
"""
TASKS: dict[str, tuple[str, str]] = {  # name -> (kind, user message)
    "copy": ("grounded", f"Copy this text exactly:\n\n{PASSAGE}"),
    "edit": (
        "grounded",
        f"Rename the variable `count` to `n` in this Python function and give back the whole function:\n\n{CODE}",
    ),
    "summarize": ("grounded", "Summarize this text in a few sentences:\n\n{wonderland}"),
    "chat": ("open", "What do you like most about autumn? Tell me in a few sentences."),
}
WONDERLAND_CHARS = 1400  # of the package's public-domain text, for the summary task
# no drafts; prompt lookup drafted by the master; drafted by the last stage inside the loop-back (the
# engine's default); lookup, else the draft model: the last stage's inside the loop-back, the master's
MODES = ("off", "master", "speculative", "draft", "draft-master")


def _messages(task: str) -> list[dict]:
    text = TASKS[task][1]
    if "{wonderland}" in text:
        doc = resources.files("app.tools").joinpath("data/wonderland.txt").read_text(encoding="utf-8")
        text = text.format(wonderland=doc[:WONDERLAND_CHARS].strip())
    return [{"role": "user", "content": text}]


def _prompt(tokenizer: Any, task: str) -> list[int]:
    text = tokenizer.apply_chat_template(_messages(task), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


async def _answer(master: Master, prompt: list[int], hidden_bytes: int) -> dict:
    """One greedy answer, alone on the group: its figures and tokens."""
    engine = master.engine
    steps: list[dict] = []
    engine.on_step = steps.append
    drafted, accepted, trips = engine.drafted_tokens, engine.accepted_tokens, engine.draft_trips
    in_loop = engine.loop_draft_trips
    m_drafted, m_accepted, m_trips = engine.model_drafted_tokens, engine.model_accepted_tokens, engine.model_draft_trips
    m_seconds = engine.drafter.seconds if engine.drafter is not None else 0.0
    try:
        req = engine.submit(list(prompt), SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0))
        times = await token_times(req, TASK_TIMEOUT)
    finally:
        engine.on_step = None
    decode = [s for s in steps if s["decodes"] and not s["prefill_tokens"]]  # its steps after the first token
    rows = sum(s["decodes"] + s.get("drafts", 0) for s in decode)
    n = len(req.output)
    return {
        "tokens": list(req.output),
        "answer_tokens": n,
        "decode_tokens_per_s": (n - 1) / (times[-1] - times[0]) if n > 1 else float("nan"),
        "trips": len(decode),
        "tokens_per_trip": (n - 1) / len(decode) if decode else float("nan"),
        "drafts_per_trip": (engine.drafted_tokens - drafted) / max(1, engine.draft_trips - trips),
        "accepted_per_trip": (engine.accepted_tokens - accepted) / max(1, engine.draft_trips - trips),
        "draft_trips": engine.draft_trips - trips,
        "loop_draft_trips": engine.loop_draft_trips - in_loop,
        "model_draft_trips": engine.model_draft_trips - m_trips,
        "model_drafts_per_trip": (engine.model_drafted_tokens - m_drafted) / max(1, engine.model_draft_trips - m_trips),
        "model_accepted_per_trip": (engine.model_accepted_tokens - m_accepted)
        / max(1, engine.model_draft_trips - m_trips),
        "draft_seconds": (engine.drafter.seconds - m_seconds) if engine.drafter is not None else 0.0,
        "decode_seconds": times[-1] - times[0] if n > 1 else 0.0,
        "bytes_per_hop_per_token": rows * hidden_bytes / max(1, n - 1),
    }


def draft_folder(opts: BenchOptions) -> str:
    """The folder of ``opts.draft_model`` ("": none): a folder as given; ``self``: the served
    model's own folder (it drafts for itself: every draft it would accept, an upper bound on
    acceptance, not a real pairing); ``first:N``: the served model's first N decoder layers
    with its final norm and head, written once under ``opts.out`` (a weak same-family draft:
    no early-exit training).  Blocking."""
    spec = opts.draft_model
    if not spec:
        return ""
    from worker_core import model_source

    if spec == "self":
        return str(model_source.resolve(opts.model))
    if not spec.startswith("first:"):
        return spec
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    layers = int(spec.split(":", 1)[1])
    folder = model_source.resolve(opts.model)
    out = opts.out / f"draft-first-{layers}"
    if not (out / "config.json").is_file():
        model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        if not 0 < layers < len(model.model.layers):
            raise ValueError(f"--draft-model first:{layers}: the model has {len(model.model.layers)} layers")
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        model.save_pretrained(out)
        for f in folder.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, out / f.name)
    return str(out)


async def speculative_profile(opts: BenchOptions, profile: str) -> dict:
    from worker_core.wire import itemsize

    from .options import PROFILES

    mbps, rtt = PROFILES[profile]
    drafts_with = await asyncio.to_thread(draft_folder, opts)
    async with shaped_group(opts, profile, drafts_with) as master:
        engine = master.engine
        drafter = engine.drafter
        hidden_bytes = master.group.dims.hidden_size * itemsize(master.group.stages[0].hello.dtype)
        tasks: dict[str, dict] = {}
        for task, (kind, _) in TASKS.items():
            prompt = await asyncio.to_thread(_prompt, engine.tokenizer, task)
            modes = {}
            for mode in MODES if drafter is not None else MODES[:3]:
                engine.speculative = mode != "off"
                engine.drafter = drafter if mode.startswith("draft") else None
                engine.loop_drafts = mode not in ("master", "draft-master")
                engine.kv.forget_idle()  # every mode starts with no cached prompt
                modes[mode] = await _answer(master, prompt, hidden_bytes)
            engine.speculative, engine.drafter, engine.loop_drafts = False, drafter, True
            answers = [m.pop("tokens") for m in modes.values()]
            off = modes["off"]["decode_tokens_per_s"]
            tasks[task] = {
                "kind": kind,
                "prompt_tokens": len(prompt),
                "modes": modes,
                "tokens_identical": all(a == answers[0] for a in answers),
                "speedup": modes["speculative"]["decode_tokens_per_s"] / off,
                "master_speedup": modes["master"]["decode_tokens_per_s"] / off,
            }
            for mode in ("draft", "draft-master"):
                if mode in modes:
                    tasks[task][f"{mode}_speedup"] = modes[mode]["decode_tokens_per_s"] / off
        loop_back = master.group.loop_back.direct
    return {
        "profile": profile,
        "mbps": mbps,
        "rtt_s": rtt,
        "stages": opts.workers,
        "model": opts.model,
        "draft_model": opts.draft_model,
        "draft_folder": drafts_with,
        "answer_tokens_max": ANSWER_TOKENS,
        "loop_back_direct": loop_back,
        "tasks": tasks,
    }


async def local_copy(opts: BenchOptions) -> dict:
    """The copy task in one transformers process (torch's default threads), no links: greedy
    decode tokens/s after the first token, measured as (n - 1) / (time(n) - time(1))."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker_core import model_source

    folder = model_source.resolve(opts.model)

    def run() -> dict:
        tok = AutoTokenizer.from_pretrained(folder)
        prompt = _prompt(tok, "copy")
        model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        x = torch.tensor([prompt])
        with torch.inference_mode():
            model.generate(x, max_new_tokens=4, do_sample=False)  # warm-up
            t0 = time.perf_counter()
            model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            one = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(x, max_new_tokens=ANSWER_TOKENS, do_sample=False)
            total = time.perf_counter() - t0
        n = out.shape[1] - x.shape[1]
        return {"answer_tokens": n, "decode_tokens_per_s": (n - 1) / max(total - one, 1e-9)}

    return await asyncio.to_thread(run)


def speculative_table(rows: list[dict], local: dict | None) -> str:
    lines = [
        "| profile | task | tokens | tok/s off | tok/s spec (master) | speed-up | tok/s spec (loop-back) | speed-up "
        "| tokens/trip off | tokens/trip spec | drafts/trip | accepted/trip | trips drafted in the loop-back "
        "| KB/hop/token off | KB/hop/token spec | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for task, t in r["tasks"].items():
            off, master, on = t["modes"]["off"], t["modes"]["master"], t["modes"]["speculative"]
            lines.append(
                f"| {r['profile']} | {task} ({t['kind']}) | {on['answer_tokens']} | "
                f"{off['decode_tokens_per_s']:.1f} | {master['decode_tokens_per_s']:.1f} | "
                f"{t['master_speedup']:.2f}x | "
                f"{on['decode_tokens_per_s']:.1f} | {t['speedup']:.2f}x | "
                f"{off['tokens_per_trip']:.2f} | {on['tokens_per_trip']:.2f} | {on['drafts_per_trip']:.2f} | "
                f"{on['accepted_per_trip']:.2f} | {on['loop_draft_trips']} of {on['draft_trips']} | "
                f"{off['bytes_per_hop_per_token'] / 1e3:.2f} | "
                f"{on['bytes_per_hop_per_token'] / 1e3:.2f} | {t['tokens_identical']} |"
            )
    if local is not None:
        lines.append("")
        lines.append(
            f"one transformers process, no links, copy task: {local['decode_tokens_per_s']:.1f} tok/s "
            f"({local['answer_tokens']} tokens)"
        )
        for r in rows:
            on = r["tasks"]["copy"]["modes"]["speculative"]
            ratio = on["decode_tokens_per_s"] / local["decode_tokens_per_s"]
            lines.append(f"{r['profile']}: copy with speculation / one local process: {ratio:.2f}x")
    return "\n".join(lines)


def draft_table(rows: list[dict]) -> str:
    """The draft-model modes against no drafts: per profile, task and where the model drafts
    (empty without one)."""
    lines = [
        "| profile | draft model | task | drafts on | tok/s off | tok/s draft | speed-up | tokens/trip | model trips "
        "| model drafts/trip | model accepted/trip | lookup trips | drafting s / decode s | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for task, t in r["tasks"].items():
            for mode, where in (("draft", "last stage"), ("draft-master", "master")):
                if mode not in t["modes"]:
                    continue
                off, d = t["modes"]["off"], t["modes"][mode]
                spent = f"{d['draft_seconds']:.1f}" if mode == "draft-master" else "n/a"
                speedup = t[f"{mode}_speedup"]
                lines.append(
                    f"| {r['profile']} | {r['draft_model']} | {task} ({t['kind']}) | {where} | "
                    f"{off['decode_tokens_per_s']:.1f} | {d['decode_tokens_per_s']:.1f} | {speedup:.2f}x | "
                    f"{d['tokens_per_trip']:.2f} | {d['model_draft_trips']} | {d['model_drafts_per_trip']:.2f} | "
                    f"{d['model_accepted_per_trip']:.2f} | {d['draft_trips'] - d['model_draft_trips']} | "
                    f"{spent} / {d['decode_seconds']:.1f} | {t['tokens_identical']} |"
                )
    return "\n".join(lines) if len(lines) > 2 else ""
