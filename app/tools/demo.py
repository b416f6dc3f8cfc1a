"""`molink demo`: a master and N local worker processes on the embedded default model.

Contract: ``run_demo(options)`` converts the default model if needed, starts a master in this
process on 127.0.0.1 and ``options.workers`` worker processes that dial it, waits until the
pipeline serves, then either asks one chat question over the HTTP API (streaming the answer
to the terminal, printing each stage's layer range and the decode tokens per second) and
returns 0, or with ``serve`` keeps the API up until cancelled.  Every process it started is
stopped when it returns, whichever way it returns.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass

from app.proc.spawn import start_local_workers, stop_processes
from master_core.config import MasterConfig


@dataclass(frozen=True)
class DemoOptions:
    serve: bool = False
    port: int = MasterConfig.port  # the API's with serve (else a free one)
    workers: int = 3
    model: str = "default"
    question: str = "Explain in three sentences why the sky is blue."
    max_tokens: int = 64
    startup_timeout: float = 600.0  # seconds for workers to join and load


async def _ask(base: str, model_id: str, question: str, max_tokens: int) -> None:
    import aiohttp

    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    print(f"\nQ: {question}\nA: ", end="", flush=True)
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    usage = {}
    async with aiohttp.ClientSession() as http, http.post(f"{base}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"the API answered {resp.status}: {await resp.text()}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            usage = payload.get("usage") or usage
            for choice in payload["choices"]:
                text = choice.get("delta", {}).get("content")
                if text:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    chunks += 1
                    print(text, end="", flush=True)
    print()
    n = usage.get("completion_tokens", chunks)
    if first is None or last is None:
        print("(no tokens generated)")
        return
    decode_tps = (n - 1) / (last - first) if n > 1 and last > first else float("nan")
    print(
        f"\n{n} tokens; time to first token {first - t0:.2f} s; decode {decode_tps:.1f} tokens/s; "
        f"overall {n / (last - t0):.1f} tokens/s"
    )


async def run_demo(opts: DemoOptions) -> int:
    from master_core.server import Master  # the engine (torch) only when the demo runs

    port = opts.port if opts.serve else 0
    master = Master(MasterConfig(model=opts.model, host="127.0.0.1", port=port, min_workers=opts.workers))
    print("Preparing the model (the first run converts it once)...", flush=True)
    await master.start()
    procs = start_local_workers(master.address, [f"local-{i + 1}" for i in range(opts.workers)])
    try:
        print(f"Started {opts.workers} worker processes; loading layers...", flush=True)
        deadline = time.monotonic() + opts.startup_timeout
        while not master.group.serving:
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                print(f"molink demo: a worker process exited with code {dead[0].returncode}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print(
                    f"molink demo: workers not ready after {opts.startup_timeout:.0f} s ({master.group.problem})",
                    file=sys.stderr,
                )
                return 1
            await asyncio.sleep(0.2)
        print(f"Model {master.model_id}: {master.dims.num_layers} decoder layers in {len(master.group.stages)} stages")
        for i, link in enumerate(master.group.stages):
            a = link.assignment
            layers = f"layers [{a.layer_start}, {a.layer_end})" if a else "no layers"
            print(f"  stage {i}: {link.name} ({link.hello.device}) {layers}")
        base = f"http://{master.address}"
        if opts.serve:
            print(f"\nOpenAI-compatible API on {base}/v1 (model {master.model_id!r}); Ctrl-C stops.", flush=True)
            await asyncio.Event().wait()
        await _ask(base, master.model_id, opts.question, opts.max_tokens)
        return 0
    finally:
        await master.stop()
        await asyncio.to_thread(stop_processes, procs)
