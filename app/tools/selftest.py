"""`molink selftest`: the engine end to end on this machine, checked against one process.

Contract
--------
``run_selftest(options, out)`` prints the versions (molink, Python, torch, transformers), the
device, then: prepares the embedded default model (converted once into the user cache), starts a
master in this process on 127.0.0.1 (a port chosen at run time) and two worker processes
(``molink worker``, started the way every frontend starts the engine: :func:`app.proc.spawn.engine_command`)
that split the model's layers between them, generates ``tokens`` tokens greedily through the
pipeline, stops the group, runs the same checkpoint in this one process with transformers
(same device and dtype as the workers), and compares the two token lists.  Equal: it prints
``OK`` and returns 0.  Anything else (a worker that exits, no group within
``options.startup_timeout``, tokens that differ, an exception) prints one line
``selftest failed: ...`` (with the tail of a worker's log where there is one; for a package of the
engine that cannot be imported, how to repair the environment) and returns 1.
Every process it started is stopped when it returns, whichever way it returns.

It runs wherever the engine is installed: a source checkout (``python -m app.cli selftest``)
and the per-user engine runtime of an installed app (the frozen ``molink`` launcher runs it
there), because the workers are started with this interpreter.
"""

from __future__ import annotations

import asyncio
import functools
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from app.proc.spawn import start_local_workers, stop_processes

QUESTION = "What is the capital of France?"
REPAIR_HINT = (
    "the engine's packages are incomplete: in an installed MoLink run `molink runtime install --repair`, "
    "from a source checkout reinstall its dependencies"
)
WORKERS = 2


@dataclass(frozen=True)
class SelftestOptions:
    device: str = "auto"  # auto | cpu | cuda | cuda:N: the workers' --device and the reference's device
    tokens: int = 8  # tokens generated greedily
    startup_timeout: float = 600.0  # seconds for the model to be ready and both workers to serve
    generate_timeout: float = 300.0  # seconds for the pipeline to generate the tokens


class SelftestFailed(Exception):
    """One sentence saying what went wrong."""


def versions() -> dict[str, str]:
    """molink, Python, torch (with its CUDA build), transformers, OS."""
    from importlib import metadata

    import torch
    import transformers

    try:
        molink = metadata.version("molink")
    except metadata.PackageNotFoundError:
        molink = "source checkout"
    return {
        "molink": molink,
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})"
        if torch.version.cuda
        else f"{torch.__version__} (CPU build)",
        "transformers": transformers.__version__,
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
    }


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


@functools.lru_cache(maxsize=2)
def _tokenizer(folder: Path) -> Any:
    """The checkpoint's tokenizer, read once per run (the prompt and both answers use it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _prompt(folder: Path) -> list[int]:
    tok = _tokenizer(folder)
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _decode(folder: Path, ids: list[int]) -> str:
    return _tokenizer(folder).decode(ids)


def reference_tokens(folder: Path, prompt: list[int], tokens: int, device: str) -> list[int]:
    """The same checkpoint in this one process with transformers: greedy, no early stop at EOS."""
    import torch
    from transformers import AutoModelForCausalLM

    from worker_core.device import pick

    dev = pick(device)
    loaded: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=dev.dtype)  # transformers' stubs lose .to()
    model = loaded.to(dev.device).eval()
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt], device=dev.device),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=dev.device),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


async def _pipeline_tokens(
    folder: Path, prompt: list[int], opts: SelftestOptions, logs: Path, say: Callable[[str], None]
) -> list[int]:
    from master_core.config import MasterConfig
    from master_core.request import SamplingParams
    from master_core.server import Master

    master = Master(MasterConfig(model=str(folder), host="127.0.0.1", port=0, min_workers=WORKERS))
    await master.start()
    procs: list[subprocess.Popen] = []
    log_files = [logs / f"worker-{i + 1}.log" for i in range(WORKERS)]
    try:
        for i, log_file in enumerate(log_files):
            procs += start_local_workers(master.address, [f"selftest-{i + 1}"], device=opts.device, log=log_file)
        say(f"started {WORKERS} worker processes; waiting for the group (at most {opts.startup_timeout:.0f} s)")
        deadline = time.monotonic() + opts.startup_timeout
        while not (master.group.serving and len(master.group.stages) == WORKERS):
            for p, log_file in zip(procs, log_files):
                if p.poll() is not None:
                    raise SelftestFailed(f"a worker process exited with code {p.returncode}:\n{_tail(log_file)}")
            if time.monotonic() > deadline:
                raise SelftestFailed(
                    f"the group did not serve on {WORKERS} workers within {opts.startup_timeout:.0f} s "
                    f"({master.group.problem}):\n{_tail(log_files[0])}"
                )
            await asyncio.sleep(0.2)
        for i, link in enumerate(master.group.stages):
            a = link.assignment  # every stage of a serving group holds an assignment
            where = f"layers [{a.layer_start}, {a.layer_end})" if a is not None else "no layers"
            say(f"stage {i}: {link.name} ({link.hello.device}) {where}")
        params = SamplingParams(max_tokens=opts.tokens, temperature=0.0, ignore_eos=True)
        ids, _text, _reason = await asyncio.wait_for(master.engine.generate(prompt, params), opts.generate_timeout)
        return list(ids)
    finally:
        await master.stop()
        await asyncio.to_thread(stop_processes, procs)


def run_selftest(opts: SelftestOptions, out: TextIO | None = None) -> int:
    out = out or sys.stdout

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    t0 = time.monotonic()
    try:
        for key, value in versions().items():
            say(f"{key}: {value}")
        from worker_core.default_model import ensure_default_model
        from worker_core.device import pick

        dev = pick(opts.device)  # fails here, with one line, on a device that does not exist
        say(f"device: {dev.device} ({dev.name}, {str(dev.dtype).removeprefix('torch.')})")
        say("preparing the default model (the first run converts it once) ...")
        folder = ensure_default_model()
        say(f"model: {folder}")
        prompt = _prompt(folder)
        with tempfile.TemporaryDirectory(prefix="molink-selftest-") as logs:
            got = asyncio.run(_pipeline_tokens(folder, prompt, opts, Path(logs), say))
        say(f"pipeline ({WORKERS} worker processes): {got} {_decode(folder, got)!r}")
        want = reference_tokens(folder, prompt, opts.tokens, opts.device)
        say(f"one process (transformers):  {want} {_decode(folder, want)!r}")
        if got != want:
            raise SelftestFailed(f"the pipeline's {opts.tokens} greedy tokens differ from the single-process run")
    except SelftestFailed as e:
        say(f"selftest failed: {e}")
        return 1
    except ImportError as e:  # a package of the engine is missing: the environment is broken, not the engine
        say(f"selftest failed: {type(e).__name__}: {e}; {REPAIR_HINT}")
        return 1
    except Exception as e:  # noqa: BLE001 - any failure is one line and exit 1
        say(f"selftest failed: {type(e).__name__}: {e}")
        return 1
    say(f"OK ({time.monotonic() - t0:.0f} s)")
    return 0
