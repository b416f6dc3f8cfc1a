"""Structured outputs, measured: ``python -m app.tools.bench.structured [--model M] [--out FILE]``.

Contract
--------
``engines(folder)``: for each grammar engine installed (llguidance, MoLink's; xgrammar and
outlines-core when present, for the comparison of docs/structured-outputs.md), with the
model's tokenizer and a fixed set of JSON schemas: compile time, and the time of each token's
mask over a walk of up to ``STEPS`` tokens that draws, at every step, the allowed token with the
largest seeded random score (so every engine sees the same kind of walk); median and max.

``decode(model, workers)``: a master and ``workers`` local worker processes on the model;
greedy decode tokens/s of one request at a time, unconstrained (loop-back on, then off: a
constrained request is master-driven) and under a JSON schema, plus the mask time per token the
engine measured on the master.  Everything in one run, written as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

STEPS = 64
SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["name", "age", "ok"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1},
                    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 5},
                },
                "required": ["id", "tags"],
            },
            "score": {"type": "number"},
        },
        "required": ["user", "score"],
    },
    "anyof_ref": {
        "$defs": {
            "pt": {
                "type": "object",
                "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                "required": ["x", "y"],
            }
        },
        "type": "object",
        "properties": {
            "shape": {"anyOf": [{"$ref": "#/$defs/pt"}, {"type": "array", "items": {"$ref": "#/$defs/pt"}}]}
        },
        "required": ["shape"],
    },
    "pattern": {
        "type": "object",
        "properties": {
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "code": {"type": "string", "minLength": 2, "maxLength": 8},
        },
        "required": ["date", "code"],
    },
    "format": {
        "type": "object",
        "properties": {
            "when": {"type": "string", "format": "date-time"},
            "mail": {"type": "string", "format": "email"},
        },
        "required": ["when", "mail"],
    },
    "recursive": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                "required": ["v"],
            }
        },
        "$ref": "#/$defs/node",
    },
}
DECODE_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 80},
        "year": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 6},
        "summary": {"type": "string", "maxLength": 300},
    },
    "required": ["title", "year", "tags", "summary"],
    "additionalProperties": False,
}


def _walk(vocab: int, eos: int, mask, advance, stopped) -> list[float]:
    """Mask times (seconds) over one walk; ``mask()`` returns int32 bit words."""
    import torch

    g = torch.Generator().manual_seed(0)
    times: list[float] = []
    for _ in range(STEPS):
        t = time.perf_counter()
        words = mask()
        times.append(time.perf_counter() - t)
        if stopped():
            break
        bits = ((words.unsqueeze(1) >> torch.arange(32)) & 1).bool().flatten()[:vocab]
        scores = torch.rand(vocab, generator=g)
        scores[~bits] = -1
        token = int(torch.argmax(scores))
        if token == eos:
            break
        advance(token)
    return times


def _summary(compile_s: float, times: list[float]) -> dict[str, float]:
    return {
        "compile_ms": round(compile_s * 1e3, 2),
        "mask_median_us": round(statistics.median(times) * 1e6, 1),
        "mask_max_us": round(max(times) * 1e6, 1),
        "tokens": len(times),
    }


def _llguidance(tok: Any, vocab: int) -> dict[str, Any]:
    import torch

    from master_core.grammar import GrammarError, Grammars, fill, schema_spec

    grammars = Grammars(tok, vocab, [tok.eos_token_id])
    t = time.perf_counter()
    grammars._tokenizer()
    out: dict[str, Any] = {"tokenizer_s": round(time.perf_counter() - t, 2), "license": "MIT", "dependencies": "none"}
    for name, schema in SCHEMAS.items():
        t = time.perf_counter()
        try:
            g = grammars.compile_now(schema_spec(schema))
        except GrammarError as e:
            out[name] = {"error": str(e)}
            continue
        c = time.perf_counter() - t
        m = g.matcher()._m  # the engine's matcher, to time its masks alone
        words = torch.zeros(g._words, dtype=torch.int32)

        def mask(m=m, words=words):
            fill(m, words)
            return words

        out[name] = _summary(c, _walk(vocab, tok.eos_token_id, mask, m.consume_token, m.is_stopped))
    return out


def _xgrammar(tok: Any, vocab: int) -> dict[str, Any]:
    # compared only where it is installed (not a dependency): no stubs to check against
    import xgrammar as xgr  # type: ignore[import-not-found]

    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    out: dict[str, Any] = {
        "tokenizer_s": round(time.perf_counter() - t, 2),
        "license": "Apache-2.0",
        "dependencies": "torch, triton, transformers, apache-tvm-ffi, ...",
    }
    for name, schema in SCHEMAS.items():
        try:
            t = time.perf_counter()
            cg = compiler.compile_json_schema(json.dumps(schema))
            c = time.perf_counter() - t
        except Exception as e:  # an engine's refusal, recorded as coverage
            out[name] = {"error": str(e)[:200]}
            continue
        m = xgr.GrammarMatcher(cg)
        bits = xgr.allocate_token_bitmask(1, info.vocab_size)

        def mask(m=m, bits=bits):
            m.fill_next_token_bitmask(bits)
            return bits[0]

        out[name] = _summary(c, _walk(vocab, tok.eos_token_id, mask, m.accept_token, m.is_terminated))
    return out


def _outlines(tok: Any, vocab: int) -> dict[str, Any]:
    # compared only where it is installed (not a dependency): no stubs to check against
    import outlines_core as oc  # type: ignore[import-not-found]
    import torch
    from outlines_core.json_schema import build_regex_from_schema  # type: ignore[import-not-found]

    t = time.perf_counter()
    table: dict[str, list[int]] = {}
    for i in range(len(tok)):
        if i != tok.eos_token_id:
            table.setdefault(tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)]), []).append(i)
    voc = oc.Vocabulary(tok.eos_token_id, table)
    out: dict[str, Any] = {
        "tokenizer_s": round(time.perf_counter() - t, 2),
        "license": "Apache-2.0",
        "dependencies": "none",
    }
    for name, schema in SCHEMAS.items():
        try:
            t = time.perf_counter()
            guide = oc.Guide(oc.Index(build_regex_from_schema(json.dumps(schema)), voc))
            c = time.perf_counter() - t
        except Exception as e:  # an engine's refusal, recorded as coverage
            out[name] = {"error": str(e)[:200]}
            continue
        words = torch.zeros((vocab + 31) // 32, dtype=torch.int32)

        def mask(guide=guide, words=words):
            guide.write_mask_into(words.data_ptr(), words.numel(), 4)
            return words

        out[name] = _summary(c, _walk(vocab, tok.eos_token_id, mask, guide.advance, guide.is_finished))
    return out


def engines(folder: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    vocab = len(tok)
    out: dict[str, Any] = {"vocab": vocab, "steps": STEPS}
    for name, fn in (("llguidance", _llguidance), ("xgrammar", _xgrammar), ("outlines-core", _outlines)):
        try:
            out[name] = fn(tok, vocab)
        except ImportError:
            out[name] = "not installed"
    return out


async def decode(model: str, workers: int, new_tokens: int = 96, repeats: int = 3) -> dict[str, Any]:
    from app.proc.spawn import start_local_workers, stop_processes
    from master_core.config import MasterConfig
    from master_core.grammar import schema_spec
    from master_core.request import FinishEvent, SamplingParams
    from master_core.server import Master

    master = Master(MasterConfig(model=model, port=0, min_workers=workers))
    await master.start()
    procs = start_local_workers(master.address, [f"stage-{i}" for i in range(workers)], "--threads", "1")
    try:
        while not (master.group.serving and master.engine.profiled):
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a worker exited")
            await asyncio.sleep(0.2)
        engine = master.engine
        grammar = await master.api.grammars.compile(schema_spec(DECODE_SCHEMA))
        text = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Describe a film as JSON with title, year, tags and a summary."}],
            add_generation_prompt=True,
            tokenize=False,
        )
        prompt = engine.tokenizer(text, add_special_tokens=False)["input_ids"]

        async def one(params: SamplingParams) -> tuple[float, int, float]:
            req = engine.submit(prompt, params)
            times = []
            while not isinstance(await req.events.get(), FinishEvent):
                times.append(time.perf_counter())
            c = req.constraint
            per_mask = c.mask_seconds / c.masks if c is not None and c.masks else 0.0
            return (len(times) - 1) / (times[-1] - times[0]), len(times), per_mask

        modes: dict[str, Any] = {}
        await one(SamplingParams(max_tokens=8, temperature=0.0))  # warm-up
        for mode, loop_back, g in (
            ("unconstrained, loop-back on", True, None),
            ("unconstrained, loop-back off", False, None),
            ("json_schema", True, grammar),
        ):
            engine.loop_back = loop_back
            runs = [
                await one(SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=g is None, grammar=g))
                for _ in range(repeats)
            ]
            modes[mode] = {
                "decode_tokens_per_s": round(statistics.median(r[0] for r in runs), 2),
                "tokens": runs[0][1],
                "mask_us_per_token": round(statistics.median(r[2] for r in runs) * 1e6, 1) if g else None,
            }
        return {"model": model, "workers": workers, "new_tokens_max": new_tokens, "repeats": repeats, "modes": modes}
    finally:
        await master.stop()
        await asyncio.to_thread(stop_processes, procs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--model", default="default")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("docs/structured.json"))
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args(argv)
    from worker_core import model_source

    folder = str(model_source.resolve(args.model))
    result: dict[str, Any] = {"engines": engines(folder)}
    if not args.skip_decode:
        result["decode"] = asyncio.run(decode(args.model, args.workers))
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
