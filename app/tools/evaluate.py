"""`molink eval`: what each group precision costs and keeps, measured through the real pipeline.

Contract
--------
``run_eval(opts)`` starts, for each precision in ``opts.precisions`` (``none`` always runs
first: it is the reference), an in-process master with ``--quantize`` set and ``opts.workers``
local worker processes (the same ``molink worker`` the demo starts), waits until they serve,
and measures:

* ``weight_bytes``: what each stage reports holding (``Ready.weight_bytes``), and the decoder
  layers' share of it (the stages' total minus the embeddings and head, which are never
  quantized) as a fraction of full precision;
* ``peak_rss``: each worker process's peak resident memory (Linux ``VmHWM``; elsewhere the
  current RSS), read after the run;
* ``perplexity`` over the first tokens of :data:`TEXT` (chapters I-V of Lewis Carroll's
  *Alice's Adventures in Wonderland*, 1865, public domain; the Project Gutenberg plain text
  of eBook #11 without its front matter, shipped in this package): the text is cut into
  ``windows`` equal windows that run side by side, one token per window per pipeline step,
  so the last stage returns the logits of every position (``topk`` 0: the full vocabulary);
* ``agreement``: greedy answers to :data:`PROMPTS` (chat template applied), ``new_tokens``
  each, compared position by position with the ``none`` run's answers;
* ``decode_tokens_per_s`` of one greedy request alone and ``ttft_s`` of one 500-token prompt
  (each worker computes with one thread: the stages share this machine's cores).

It prints a table and writes the figures as JSON to ``opts.out``.  ``quick`` runs 8 prompts,
16 new tokens and 2,048 text tokens instead of 32, 64 and 10,240.  Every wait is bounded;
worker processes are stopped through their control channel whatever happens.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from app.proc.spawn import start_local_workers, stop_processes
from master_core.config import MasterConfig

TEXT = "data/wonderland.txt"  # package data of ``app.tools``
SERVE_TIMEOUT = 900.0  # seconds for the workers to load their layers (4-bit quantizing on a CPU is slow)
STEP_TIMEOUT = 120.0  # seconds one pipeline step of the perplexity run may take
EVAL_REQUEST_IDS = 1 << 40  # request ids of the perplexity windows: far from the engine's own
EVAL_STEP_IDS = 1 << 40  # step ids likewise (the engine is idle while they run)
PERPLEXITY_ATTEMPTS = 3  # passes started before a changing pipeline fails the run

PROMPTS = (
    "Name three colours of the rainbow.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child.",
    "Give me a recipe for pancakes.",
    "What is photosynthesis?",
    "List four animals that live in the ocean.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Describe a cat in two sentences.",
    "What does a computer's CPU do?",
    "Suggest a name for a small bakery.",
    "How do plants drink water?",
    "What is the largest planet in the solar system?",
    "Write a short poem about autumn leaves.",
    "Explain what a verb is.",
    "What are the three states of water?",
    "Give two tips for sleeping better.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Describe the taste of a lemon.",
    "Why do we have seasons?",
    "What is a prime number?",
    "Tell me a fun fact about elephants.",
    "How many continents are there?",
    "What is the opposite of 'ancient'?",
    "Explain what a rainbow is made of.",
    "Write one sentence about friendship.",
    "What do bees make?",
    "How does a bicycle stay upright?",
    "What is the main ingredient of guacamole?",
)


@dataclass(frozen=True)
class EvalOptions:
    model: str = "default"  # checkpoint folder, hub id or "default"
    precisions: tuple[str, ...] = ("none", "int8", "int4")
    workers: int = 3  # local worker processes: one stage each
    quick: bool = False  # 8 prompts x 16 tokens, 2,048 text tokens
    out: Path = field(default_factory=lambda: Path("eval.json"))

    @property
    def prompts(self) -> tuple[str, ...]:
        return PROMPTS[:8] if self.quick else PROMPTS

    @property
    def new_tokens(self) -> int:
        return 16 if self.quick else 64

    @property
    def windows(self) -> tuple[int, int]:
        """(windows, tokens per window) of the perplexity run."""
        return (8, 256) if self.quick else (32, 320)


def eval_text() -> str:
    """The shipped evaluation text (UTF-8)."""
    return resources.files("app.tools").joinpath(TEXT).read_text(encoding="utf-8")


def peak_rss(pid: int) -> int:
    """Peak resident bytes of process ``pid`` (Linux VmHWM; the current RSS where there is none)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    info = psutil.Process(pid).memory_info()
    return int(getattr(info, "peak_wset", 0) or info.rss)


async def _wait_serving(master: Any, procs: list) -> None:
    deadline = time.monotonic() + SERVE_TIMEOUT
    while not (master.group.serving and master.engine.profiled):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workers did not come up in {SERVE_TIMEOUT:.0f} s: {master.group.problem}")
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a worker exited: {master.group.problem}")
        await asyncio.sleep(0.2)


async def perplexity(master: Any, tokens: list[int], windows: int, length: int, procs: list) -> tuple[float, int]:
    """(perplexity, tokens scored) of ``windows`` windows of ``length`` tokens of ``tokens``,
    each position's next token scored from the last stage's full logits.  A pipeline that
    changes meanwhile (a worker dropped as unresponsive on a busy machine re-joins) starts
    the pass again, at most ``PERPLEXITY_ATTEMPTS`` times."""
    from master_core.link import LinkGone, StepFailed

    for attempt in range(1, PERPLEXITY_ATTEMPTS + 1):
        await _wait_serving(master, procs)
        try:
            return await _perplexity_pass(master, tokens, windows, length)
        except (LinkGone, StepFailed, asyncio.TimeoutError) as e:
            if attempt == PERPLEXITY_ATTEMPTS:
                raise RuntimeError(f"the perplexity pass failed {attempt} times, last: {e or type(e).__name__}") from e
            print(f"molink eval: the pipeline changed ({e or type(e).__name__}); again", file=sys.stderr)
    raise AssertionError("unreachable")


async def _perplexity_pass(master: Any, tokens: list[int], windows: int, length: int) -> tuple[float, int]:
    import torch

    from worker_core.wire import Segment, Step

    if len(tokens) < windows * length:
        raise ValueError(f"the text has {len(tokens)} tokens, the run needs {windows * length}")
    stages, epoch = list(master.group.stages), master.group.epoch
    seqs = [tokens[w * length : (w + 1) * length] for w in range(windows)]
    ids = [EVAL_REQUEST_IDS + w for w in range(windows)]
    step_ids = itertools.count(EVAL_STEP_IDS)
    nll, scored = 0.0, 0
    try:
        for pos in range(length - 1):
            segments = tuple(Segment(ids[w], pos, 1, True) for w in range(windows))
            x = torch.tensor([s[pos] for s in seqs], dtype=torch.int64)  # [windows]
            for link in stages:
                _, result = await asyncio.wait_for(link.call(Step(next(step_ids), epoch, segments, x, 0)), STEP_TIMEOUT)
                x = result.tensor  # hidden [windows, hidden], then logits [windows, vocab]
            logp = torch.log_softmax(x.float(), dim=-1)
            target = torch.tensor([s[pos + 1] for s in seqs], dtype=torch.int64)
            nll -= float(logp.gather(1, target.unsqueeze(1)).sum())
            scored += windows
    finally:
        for link in stages:
            link.free(ids)
    return math.exp(nll / scored), scored


async def _single(master: Any, short: list[int], long: list[int], new_tokens: int) -> tuple[float, float]:
    """(decode tokens/s of one greedy request alone, seconds to the first token of ``long``)."""
    from master_core.request import FinishEvent, SamplingParams

    greedy = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    req = master.engine.submit(short, greedy)
    times = []
    while not isinstance(await asyncio.wait_for(req.events.get(), STEP_TIMEOUT), FinishEvent):
        times.append(time.perf_counter())
    t0 = time.perf_counter()
    req = master.engine.submit(long, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while not isinstance(await asyncio.wait_for(req.events.get(), STEP_TIMEOUT), FinishEvent):
        pass
    ttft = time.perf_counter() - t0
    return (len(times) - 1) / max(1e-9, times[-1] - times[0]), ttft


async def measure(opts: EvalOptions, precision: str, tokenizer: Any, text_ids: list[int]) -> dict:
    """Every figure of one precision (see the module docstring); the answers under ``answers``."""
    from master_core.request import SamplingParams
    from master_core.server import Master

    windows, length = opts.windows
    cfg = MasterConfig(
        model=opts.model,
        port=0,
        min_workers=opts.workers,
        quantize=precision,
        max_kv_tokens=windows * length + 1024,
        capacity_wait=SERVE_TIMEOUT,  # a worker dropped on a busy machine re-joins and reloads: wait for it
    )
    master = Master(cfg)
    await master.start()
    # one compute thread per stage: the stages share this machine's cores
    procs = start_local_workers(master.address, [f"stage-{i}" for i in range(opts.workers)], "--threads", "1")
    try:
        await _wait_serving(master, procs)
        weight_bytes = [link.ready.weight_bytes if link.ready else 0 for link in master.group.stages]
        t0 = time.perf_counter()
        ppl, scored = await perplexity(master, text_ids, windows, length, procs)
        ppl_seconds = time.perf_counter() - t0
        prompts = [
            tokenizer(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
                ),
                add_special_tokens=False,
            )["input_ids"]
            for p in opts.prompts
        ]
        greedy = SamplingParams(max_tokens=opts.new_tokens, temperature=0.0, ignore_eos=True)
        answers = [r[0] for r in await asyncio.gather(*(master.engine.generate(p, greedy) for p in prompts))]
        decode, ttft = await _single(master, prompts[0], text_ids[:500], opts.new_tokens)
        rss = [peak_rss(p.pid) for p in procs]
    finally:
        await master.stop()
        await asyncio.to_thread(stop_processes, procs)
    dims = master.dims
    outer = (dims.embed_params + dims.head_params) * 4  # float32 on the CPU: never quantized
    return {
        "precision": precision,
        "weight_bytes": weight_bytes,
        "decoder_bytes": sum(weight_bytes) - outer,
        "peak_rss": rss,
        "perplexity": ppl,
        "scored_tokens": scored,
        "perplexity_seconds": ppl_seconds,
        "decode_tokens_per_s": decode,
        "ttft_s": ttft,
        "answers": answers,
    }


def agreement(answers: list[list[int]], reference: list[list[int]]) -> float:
    """Share of generated tokens equal to the reference's at the same position."""
    same = sum(a == b for x, r in zip(answers, reference) for a, b in zip(x, r))
    return same / max(1, sum(len(r) for r in reference))


def table(rows: list[dict]) -> str:
    """The results as a Markdown table (sizes in MB)."""
    base = next(r for r in rows if r["precision"] == "none")
    out = [
        "| precision | weight MB per stage | decoder layers vs none | peak RSS MB per worker | decode tok/s "
        "| TTFT (500 tokens) | perplexity | vs none | greedy agreement |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        mb = " / ".join(f"{b / 1e6:.0f}" for b in r["weight_bytes"])
        rss = " / ".join(f"{b / 1e6:.0f}" for b in r["peak_rss"])
        out.append(
            f"| {r['precision']} | {mb} | {r['decoder_bytes'] / base['decoder_bytes']:.2f}x | {rss} "
            f"| {r['decode_tokens_per_s']:.1f} | {r['ttft_s']:.2f} s | {r['perplexity']:.2f} "
            f"| {100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}% | {r['agreement']:.3f} |"
        )
    return "\n".join(out)


async def _run(opts: EvalOptions) -> list[dict]:
    from transformers import AutoTokenizer

    from worker_core import model_source

    folder = await asyncio.to_thread(model_source.resolve, opts.model)
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, folder)
    text = await asyncio.to_thread(eval_text)
    text_ids = (await asyncio.to_thread(tokenizer, text, add_special_tokens=False))["input_ids"]
    order = ["none"] + [p for p in opts.precisions if p != "none"]
    rows: list[dict] = []
    for precision in order:
        print(f"molink eval: {precision} ...", file=sys.stderr, flush=True)
        row = await measure(opts, precision, tokenizer, text_ids)
        row["agreement"] = agreement(row["answers"], rows[0]["answers"] if rows else row["answers"])
        rows.append(row)
    return rows


async def run_eval(opts: EvalOptions) -> int:
    rows = await _run(opts)
    windows, length = opts.windows
    print(
        f"{opts.model}: {opts.workers} stages, perplexity over {rows[0]['scored_tokens']} tokens "
        f"({windows} windows of {length}), greedy agreement over {len(opts.prompts)} prompts x {opts.new_tokens}"
    )
    print(table(rows))
    report = json.dumps({"options": {**opts.__dict__, "out": str(opts.out)}, "rows": rows}, indent=1)
    await asyncio.to_thread(opts.out.write_text, report)
    print(f"written: {opts.out}")
    return 0
