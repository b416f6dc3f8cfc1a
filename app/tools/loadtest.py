"""Load test of the master alone: many concurrent streams through the real API, fake stages.

Contract
--------
``run_load(options)`` starts three parties and returns the measured figures as a dict:

* the **master**, a real :class:`master_core.server.Master` (API, scheduler, relay, sampling,
  detokenization, SSE) in a child process of its own, so its CPU time is its own;
* **fake stages** in another child process: workers that dial the master's plain loopback
  tunnel and speak the real wire protocol (``Hello``, ``Assign`` -> ``Ready``, ``Step`` ->
  ``Result``) but compute nothing: a first or middle stage answers zeros of the right shape,
  the last stage a fixed logits row (``FAKE_TOP`` ordinary word tokens at equal logits, so
  sampling at temperature 1 makes varied text and every token is one SSE event).  Each
  step's time inside the fake stage (decode to encode) is counted;
* this process: ``streams`` concurrent streaming ``/v1/completions`` clients (aiohttp), each
  timing its first token and the gaps between its tokens.

Reported: tokens, wall time, throughput; time to first token; time per output token (a
stream's mean gap between tokens, p50/p99 over streams) and the single gaps (p50/p99); the
master's added latency per token, which is the time per output token minus the fake stages'
time per round of the pipeline (the stages cost about nothing, so what remains is what the
master and loopback add); the master's CPU seconds per token (its process's user + system
time over the measured phase, divided by the tokens streamed); the clients' CPU seconds
(they share the machine).  A short warm-up (a few
streams) runs first and is not measured.

``placement_times(sizes)`` times :func:`master_core.placement.plan_pipeline` on random groups
of each size (a 70B-like model of 80 layers), returning milliseconds per size.

Every wait is bounded (``LoadOptions.timeout``); the children are stopped through an event,
then terminated, then killed.  Servers bind 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import multiprocessing
import random
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("molink.loadtest")

FAKE_TOP = 64  # tokens of equal logit in the fake last stage's row (the rest far below)
FAKE_LOGIT = 8.0  # their logit; every other token has 0
FAKE_MEMORY = 64 * 2**30  # bytes a fake stage offers: room for any KV budget
WARMUP_STREAMS = 8  # unmeasured streams first: imports, caches, the start-up profile
START_TIMEOUT = 180.0  # seconds for the master to start and the fake pipeline to serve
STOP_GRACE = 10.0  # seconds a child gets to stop before it is terminated (then killed)
HEALTH_POLL = 0.2  # seconds between /health polls while the pipeline forms
FD_TARGET = 16384  # open files wanted (one socket per stream on both ends)


@dataclass(frozen=True)
class LoadOptions:
    model: str = "default"  # the master's model: its tokenizer and dimensions (no weights are loaded)
    streams: int = 1000  # concurrent streaming requests
    tokens: int = 32  # tokens generated per stream (ignore_eos)
    stages: int = 1  # fake stages in the pipeline
    prompt: str = "Write a short story about a lighthouse keeper."
    timeout: float = 600.0  # seconds for the whole measured phase
    max_batch_tokens: int = 512  # the master's step budget (tokens per micro-batch; MasterConfig's default)


# --------------------------------------------------------------------------- fake stages


def _top_ids(folder: Path, vocab: int) -> list[int]:
    """``FAKE_TOP`` ids that decode alone to one plain word with a leading space (whole
    characters, so each sampled token is text at once); any ids when the vocabulary has few."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    word = re.compile(r"^ [A-Za-z]{2,}$")
    special = set(tok.all_special_ids)
    picked: list[int] = []
    for i in range(min(vocab, 50_000)):
        if i not in special and word.match(tok.decode([i])):
            picked.append(i)
            if len(picked) == FAKE_TOP:
                break
    if len(picked) < FAKE_TOP:
        picked += [i for i in range(vocab) if i not in special and i not in picked][: FAKE_TOP - len(picked)]
    return picked


class _Rows:
    """The fixed last-stage row, full or packed top-k (see ``worker_core.wire.Result``)."""

    def __init__(self, vocab: int, top: list[int]) -> None:
        import torch

        self.full = torch.zeros(vocab, dtype=torch.float32)
        self.full[top] = FAKE_LOGIT
        self._packed: dict[int, Any] = {}

    def row(self, topk: int):  # -> torch.Tensor [width] float32
        import torch

        from worker_core.wire import logits_row_width

        if logits_row_width(topk, self.full.numel()) == self.full.numel():
            return self.full
        if topk not in self._packed:
            values, ids = torch.topk(self.full, topk)
            lse = torch.logsumexp(self.full, 0).reshape(1)
            self._packed[topk] = torch.cat([lse, values, ids.to(torch.float32)])
        return self._packed[topk]


async def _fake_stage(address: str, name: str, folder: Path, rows: _Rows, busy: Any, steps: Any) -> None:
    """One fake worker: serve steps on the tunnel until it closes (or cancelled)."""
    import aiohttp
    import torch

    from master_core.model_dims import ModelDims
    from worker_core.pieces import Joiner
    from worker_core.wire import (
        MAX_FRAME_BYTES,
        Assign,
        Failure,
        Free,
        Hello,
        Ready,
        Result,
        Step,
        encode,
    )

    dims = ModelDims.load(folder)
    last = False  # this stage holds the last layer: it answers logits
    epoch = -1
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"ws://{address}/v1/tunnel", max_msg_size=MAX_FRAME_BYTES, compress=0, heartbeat=5.0) as ws,
    ):
        await ws.send_bytes(encode(Hello(name, "cpu", "fake stage", FAKE_MEMORY, FAKE_MEMORY, "float32")))
        joiner = Joiner()
        async for frame in ws:
            if frame.type is not aiohttp.WSMsgType.BINARY:
                break
            t0 = time.perf_counter()
            if (msg := joiner.feed(frame.data, MAX_FRAME_BYTES)) is None:
                continue  # a piece of a longer frame (worker_core.pieces)
            if isinstance(msg, Assign):
                epoch, last = msg.epoch, msg.layer_end == msg.num_layers
                await ws.send_bytes(encode(Ready(msg.epoch, dims.hidden_size, dims.vocab_size, 0.0, 0)))
            elif isinstance(msg, Step):
                if msg.epoch != epoch:
                    await ws.send_bytes(encode(Failure(f"fake stage serves epoch {epoch}", msg.step_id)))
                    continue
                if last:
                    n = sum(s.want_logits for s in msg.segments)
                    out = rows.row(msg.topk).expand(n, -1)  # logits [n, row] float32
                else:
                    tokens = msg.tensor.shape[0]
                    out = torch.zeros(tokens, dims.hidden_size, dtype=torch.float32)  # hidden [T, hidden]
                frame_out = encode(Result(msg.step_id, msg.epoch, 0.0, time.perf_counter() - t0, out))
                busy.value += time.perf_counter() - t0
                steps.value += 1
                await ws.send_bytes(frame_out)
            elif isinstance(msg, (Free, Failure)):
                continue


def _fake_process(address: str, folder: str, stages: int, busy: Any, steps: Any, stop: Any) -> None:
    """Child process: ``stages`` fake workers until ``stop`` is set."""
    logging.basicConfig(level=logging.WARNING)

    async def main() -> None:
        from master_core.model_dims import ModelDims

        path = Path(folder)
        dims = ModelDims.load(path)
        rows = _Rows(dims.vocab_size, await asyncio.to_thread(_top_ids, path, dims.vocab_size))
        tasks = [asyncio.create_task(_fake_stage(address, f"fake{i}", path, rows, busy, steps)) for i in range(stages)]
        while not await asyncio.to_thread(stop.wait, 0.5):
            if all(t.done() for t in tasks):
                break
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


# --------------------------------------------------------------------------- the master


def _raise_open_files() -> None:
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = FD_TARGET if hard == resource.RLIM_INFINITY else min(FD_TARGET, hard)
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _master_process(config: Any, address: Any, stop: Any) -> None:
    """Child process: a master on ``config`` until ``stop`` is set; its address goes to ``address``."""
    logging.basicConfig(level=logging.WARNING)
    _raise_open_files()

    async def main() -> None:
        from master_core.server import Master

        master = Master(config)
        await master.start()
        address.put(master.address)
        try:
            while not await asyncio.to_thread(stop.wait, 0.5):
                pass
        finally:
            await master.stop()

    asyncio.run(main())


# --------------------------------------------------------------------------- clients


@dataclass
class _Stream:
    first: float = math.nan  # seconds from the request to its first token
    gaps: tuple[float, ...] = ()  # seconds between consecutive tokens
    tokens: int = 0
    error: str = ""


async def _one_stream(http: Any, base: str, model: str, opts: LoadOptions, seed: int) -> _Stream:
    body = {
        "model": model,
        "prompt": opts.prompt,
        "max_tokens": opts.tokens,
        "temperature": 1.0,
        "seed": seed,
        "ignore_eos": True,
        "stream": True,
    }
    t0 = time.perf_counter()
    times: list[float] = []
    try:
        async with http.post(f"{base}/v1/completions", json=body) as resp:
            if resp.status != 200:
                return _Stream(error=f"HTTP {resp.status}: {(await resp.text())[:200]}")
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                choice = (event.get("choices") or [{}])[0]
                if choice.get("text"):
                    times.append(time.perf_counter())
    except Exception as e:  # a failed stream is counted and reported, not fatal to the test
        return _Stream(error=f"{type(e).__name__}: {e}")
    if not times:
        return _Stream(error="no tokens")
    return _Stream(times[0] - t0, tuple(b - a for a, b in zip(times, times[1:])), len(times))


async def _streams(base: str, model: str, opts: LoadOptions, count: int, seed0: int) -> list[_Stream]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=opts.timeout)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        return list(await asyncio.gather(*(_one_stream(http, base, model, opts, seed0 + i) for i in range(count))))


async def _wait_serving(base: str, deadline: float) -> str:
    """The model id the master serves, once its pipeline serves."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.get(f"{base}/health") as resp:
                    serving = resp.status == 200 and (await resp.json()).get("status") == "ok"
                if serving:
                    async with http.get(f"{base}/v1/models") as resp:
                        return (await resp.json())["data"][0]["id"]
            await asyncio.sleep(HEALTH_POLL)
    raise TimeoutError("the fake pipeline did not start serving in time")


def _pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


# --------------------------------------------------------------------------- the run


def _stop(proc: Any) -> None:
    """Called after the shared ``stop`` event (the children's control channel) is set: wait up to
    ``STOP_GRACE`` for the child to end by itself, only then end it hard."""
    proc.join(STOP_GRACE)
    if proc.is_alive():
        proc.kill()
        proc.join(STOP_GRACE)


async def run_load(opts: LoadOptions) -> dict:
    """Measure the master under ``opts.streams`` concurrent streams; see the module docstring."""
    import psutil

    from master_core.config import MasterConfig
    from worker_core import model_source

    _raise_open_files()
    folder = await asyncio.to_thread(model_source.resolve, opts.model)
    kv = opts.streams * (len(opts.prompt) + opts.tokens + 16) * 2  # tokens: more than every stream needs
    config = MasterConfig(
        model=str(folder),
        port=0,
        min_workers=opts.stages,
        max_running=opts.streams,
        max_queued=opts.streams,
        max_kv_tokens=kv,
        max_batch_tokens=opts.max_batch_tokens,
        max_tokens_limit=max(opts.tokens, MasterConfig.max_tokens_limit),
    )
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    addresses = ctx.Queue()
    busy, steps = ctx.Value("d", 0.0), ctx.Value("q", 0)
    master = ctx.Process(target=_master_process, args=(config, addresses, stop), name="loadtest-master")
    fakes = None
    master.start()
    try:
        address = await asyncio.to_thread(addresses.get, True, START_TIMEOUT)
        base = f"http://{address}"
        fakes = ctx.Process(
            target=_fake_process, args=(address, str(folder), opts.stages, busy, steps, stop), name="loadtest-stages"
        )
        fakes.start()
        model = await _wait_serving(base, time.monotonic() + START_TIMEOUT)
        warm = await _streams(base, model, opts, WARMUP_STREAMS, 10**6)
        if any(s.error for s in warm):
            raise RuntimeError(f"warm-up failed: {next(s.error for s in warm if s.error)}")
        proc, me = psutil.Process(master.pid), psutil.Process()
        cpu0, mine0 = proc.cpu_times(), me.cpu_times()
        busy0, steps0, t0 = busy.value, steps.value, time.perf_counter()
        results = await asyncio.wait_for(_streams(base, model, opts, opts.streams, 0), opts.timeout + 30.0)
        wall = time.perf_counter() - t0
        cpu1, mine1, busy1, steps1 = proc.cpu_times(), me.cpu_times(), busy.value, steps.value
    finally:
        stop.set()
        await asyncio.to_thread(_stop, master)
        if fakes is not None:
            await asyncio.to_thread(_stop, fakes)
    ok = [s for s in results if not s.error]
    tokens = sum(s.tokens for s in ok)
    gaps = [g for s in ok for g in s.gaps]
    # a stream's time per output token: its mean gap (single gaps are bursty: SSE events of
    # one stream may arrive together when the client process is busy)
    tpots = [sum(s.gaps) / len(s.gaps) for s in ok if s.gaps]
    firsts = [s.first for s in ok]
    master_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    stage_busy = busy1 - busy0
    per_round = stage_busy / max(1, opts.tokens)  # fake stages' time in one round of every stream's token
    tpot50, tpot99 = _pct(tpots, 0.5), _pct(tpots, 0.99)
    return {
        "options": asdict(opts),
        "streams_ok": len(ok),
        "errors": sorted({s.error for s in results if s.error})[:5],
        "tokens": tokens,
        "wall_seconds": round(wall, 3),
        "tokens_per_second": round(tokens / wall, 1),
        "ttft_p50_ms": round(1000 * _pct(firsts, 0.5), 1),
        "ttft_p99_ms": round(1000 * _pct(firsts, 0.99), 1),
        "tpot_p50_ms": round(1000 * tpot50, 2),
        "tpot_p99_ms": round(1000 * tpot99, 2),
        "gap_p50_ms": round(1000 * _pct(gaps, 0.5), 2),
        "gap_p99_ms": round(1000 * _pct(gaps, 0.99), 2),
        "stage_steps": steps1 - steps0,
        "stage_ms_per_round": round(1000 * per_round, 2),
        "master_added_p50_ms": round(1000 * (tpot50 - per_round), 2),
        "master_added_p99_ms": round(1000 * (tpot99 - per_round), 2),
        "master_cpu_seconds": round(master_cpu, 2),
        "master_cpu_ms_per_token": round(1000 * master_cpu / max(1, tokens), 3),
        # the clients share the machine: their CPU is what the master did not get
        "client_cpu_seconds": round((mine1.user + mine1.system) - (mine0.user + mine0.system), 2),
    }


# --------------------------------------------------------------------------- placement


def placement_times(sizes: tuple[int, ...] = (8, 16, 32, 64), repeats: int = 5, seed: int = 0) -> dict[int, dict]:
    """Milliseconds :func:`~master_core.placement.plan_pipeline` takes on random groups of each
    size: GPUs of 8-24 GB at speeds within 4x, a third behind slower links, an 80-layer model
    of 0.45 GB layers (a 70B model in 4 bits) with 0.5 GB embeddings and head."""
    from master_core.placement import Member, ModelShape, plan_pipeline

    gb = 10**9
    shape = ModelShape(
        num_layers=80, layer_bytes=45 * gb // 100, first_bytes=gb // 2, last_bytes=gb // 2, kv_bytes_per_layer=gb // 20
    )
    rng = random.Random(seed)
    out: dict[int, dict] = {}
    for n in sizes:
        times, used = [], []
        for _ in range(repeats):
            members = [
                Member(
                    f"m{i}",
                    rng.choice([8, 12, 16, 24]) * gb,
                    rng.uniform(0.5, 2.0) * 1e-3,
                    rng.choice([0.0, 0.0, rng.uniform(0.0, 0.05)]),
                )
                for i in range(n)
            ]
            t0 = time.perf_counter()
            plan = plan_pipeline(shape, members)
            times.append(1000 * (time.perf_counter() - t0))
            used.append(len(plan.order))
        out[n] = {
            "median_ms": round(statistics.median(times), 2),
            "max_ms": round(max(times), 2),
            "members_used": used,
        }
    return out


def print_report(result: dict) -> None:
    w = sys.stdout.write
    if "placement" in result:
        w("placement (80 layers, random groups, 5 each):\n")
        for n, row in result["placement"].items():
            w(f"  {n:>3} members: median {row['median_ms']:.2f} ms, max {row['max_ms']:.2f} ms\n")
    if "load" in result:
        r = result["load"]
        o = r["options"]
        w(f"master load test: {o['streams']} streams x {o['tokens']} tokens, {o['stages']} fake stage(s)\n")
        for key in (
            "streams_ok",
            "tokens",
            "wall_seconds",
            "tokens_per_second",
            "ttft_p50_ms",
            "ttft_p99_ms",
            "tpot_p50_ms",
            "tpot_p99_ms",
            "gap_p50_ms",
            "gap_p99_ms",
            "stage_ms_per_round",
            "master_added_p50_ms",
            "master_added_p99_ms",
            "master_cpu_seconds",
            "master_cpu_ms_per_token",
            "client_cpu_seconds",
        ):
            w(f"  {key}: {r[key]}\n")
        if r["errors"]:
            w(f"  errors: {r['errors']}\n")
