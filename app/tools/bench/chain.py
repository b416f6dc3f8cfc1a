"""The floor under `molink bench --single`: the same stages as bare processes in a pipe chain.

Contract: ``chain_decode(folder, cuts, threads, prompt, new_tokens) -> dict`` starts one child
process per layer range in ``cuts`` (each loads its shard with :func:`worker_core.shard.load_shard`
and runs it with :class:`worker_core.stage.StageRunner`, ``threads`` torch threads, float32 on the
CPU; 0: torch's default), feeds a greedy decode through them one stage after the other over local pipes, and reports
decode tokens/s, each stage's median compute per token, and the greedy tokens.  No master, no scheduler, no tunnel,
no asyncio: what is left is the cost of cutting the model across processes on this machine,
the part of MoLink's gap to one process that serving code cannot remove.

Frames between the processes are raw bytes with a JSON header (nothing is unpickled); every
wait on a child is bounded by ``timeout`` seconds, and the children are ended on any failure.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any


def _stage(folder: str, start: int, end: int, threads: int, conn: Connection) -> None:
    """Child: load layers [start, end), then run every step received until an empty frame."""
    import torch

    from worker_core.shard import load_shard
    from worker_core.stage import StageRunner
    from worker_core.wire import Segment

    if threads:
        torch.set_num_threads(threads)
    runner = StageRunner(load_shard(Path(folder), start, end, torch.device("cpu"), torch.float32), 1 << 20, 1 << 16)
    conn.send_bytes(b"ready")
    computes: list[float] = []
    while True:
        head = conn.recv_bytes()
        if not head:
            break
        meta, data = json.loads(head), conn.recv_bytes()
        x = torch.frombuffer(bytearray(data), dtype=getattr(torch, meta["dtype"])).reshape(meta["shape"])
        seg = Segment(request_id=1, start=meta["start"], length=meta["length"], want_logits=True)
        out = runner.run((seg,), x)
        computes.append(runner.last_compute_seconds)
        conn.send_bytes(json.dumps({"dtype": str(out.dtype).removeprefix("torch."), "shape": list(out.shape)}).encode())
        conn.send_bytes(out.numpy().tobytes())
    conn.send_bytes(json.dumps(computes).encode())


def chain_decode(
    folder: Path, cuts: list[tuple[int, int]], threads: int, prompt: list[int], new_tokens: int, timeout: float = 300.0
) -> dict[str, Any]:
    """Greedy decode of ``new_tokens`` after ``prompt`` through one process per range of ``cuts``."""
    import torch

    ctx = mp.get_context("spawn")
    pipes: list[Connection] = []
    procs = []
    try:
        for start, end in cuts:
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=_stage, args=(str(folder), start, end, threads, theirs), daemon=True)
            p.start()
            pipes.append(ours)
            procs.append(p)
        for conn, p in zip(pipes, procs):
            if _recv(conn, p, timeout) != b"ready":
                raise RuntimeError("a chain stage did not start")

        def through(start: int, x: Any) -> Any:
            for conn, p in zip(pipes, procs):
                meta = {"dtype": str(x.dtype).removeprefix("torch."), "shape": list(x.shape)}
                conn.send_bytes(json.dumps({**meta, "start": start, "length": int(x.shape[0])}).encode())
                conn.send_bytes(x.numpy().tobytes())
                head = json.loads(_recv(conn, p, timeout))
                x = torch.frombuffer(bytearray(_recv(conn, p, timeout)), dtype=getattr(torch, head["dtype"]))
                x = x.reshape(head["shape"])
            return x

        tokens = [int(through(0, torch.tensor(prompt, dtype=torch.int64))[-1].argmax())]
        stamps = [time.perf_counter()]
        for pos in range(len(prompt), len(prompt) + new_tokens - 1):
            tokens.append(int(through(pos, torch.tensor(tokens[-1:], dtype=torch.int64))[-1].argmax()))
            stamps.append(time.perf_counter())
        for conn in pipes:
            conn.send_bytes(b"")
        computes = [json.loads(_recv(conn, p, timeout)) for conn, p in zip(pipes, procs)]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    skip = min(4, len(stamps) // 4)  # the first steps warm the caches up
    return {
        "stages": len(cuts),
        "threads": threads,
        "decode_tokens_per_s": (len(stamps) - 1 - skip) / (stamps[-1] - stamps[skip]),
        "stage_compute_ms": [round(1000 * statistics.median(c[1 + skip :]), 2) for c in computes],
        "tokens": tokens,
    }


def _recv(conn: Connection, proc: Any, timeout: float) -> bytes:
    """The next frame from one stage; an error as soon as that stage's process is gone, or after ``timeout``."""
    end = time.monotonic() + timeout
    while not conn.poll(0.2):
        if not proc.is_alive():
            raise RuntimeError(f"a chain stage exited with code {proc.exitcode}")
        if time.monotonic() > end:
            raise TimeoutError(f"a chain stage sent nothing for {timeout:.0f} s")
    return conn.recv_bytes()
