"""A small draft model for speculative decoding (``--draft-model``): on the master, and on the
last stage where it drafts inside the loop-back.

Contract
--------
:func:`load_draft_model` opens a local Hugging Face folder of a small causal LM that shares the
served model's tokenizer (a same-family pair: SmolLM2-135M for SmolLM2-1.7B, Qwen2.5-0.5B for
Qwen2.5-7B, ...) and refuses, with one clear ``ValueError`` line and before any weight is read,
a folder that is missing, has no tokenizer, or whose vocabulary (token -> id) differs from the
served model's, or whose embeddings do not cover it.  Token ids are only meaningful between
the two models when the vocabularies are the same.  :func:`open_draft_model` loads a folder the
master checked already (a last stage: the weights the master delivered, no tokenizer).

:meth:`DraftModel.propose` drafts, for each request of a micro-batch, up to ``k`` tokens that
may follow its tokens: **greedy** (the draft model's most likely token, one at a time), so a
draft is a point mass and :func:`master_core.speculation.verify`'s rule (keep draft ``x`` with
the target's probability ``p(x)``, else draw from ``p`` without ``x``) stays exact rejection
sampling; drawing drafts from the draft model's own distribution would need the general
``min(1, p/q)`` rule, which is not implemented on purpose.  A draft stops early at a token the
served model's logits cannot hold (an id past its vocabulary).

Where it runs: the master drafts for the steps it drives (it draws and verifies every token of
such a request: :mod:`master_core.speculation`); where the loop-back drafts, the last stage
holds a copy too (``wire.Assign.draft_model``) and drafts with it where its prompt lookup finds
nothing (:meth:`worker_core.session.Session._loop_back`), so a loop's next step carries the
model's drafts without a trip to the master.  The model is small (a tenth of the served model
or less) and runs on the CPU, in float32.

Each request has its own KV cache (a transformers ``DynamicCache``) and the tokens it holds:
a new call feeds only what changed since the last one, cropping the cache back to the longest
common prefix first (the rejected drafts, or a replay from scratch); a cache that cannot be
cropped (sliding window past its size) is rebuilt.  :meth:`DraftModel.free` drops a request's
cache when it ends; at most ``max_sessions`` caches of ``MAX_CACHED_TOKENS`` tokens in all are
kept (the least recently used goes first; a request whose cache went is fed again from its
start at its next draft).

:attr:`DraftModel.token_seconds` is the measured cost of one drafted token, which the engine
adds to a trip's time when it chooses the draft model's ``k`` after the model's drafts
(:meth:`master_core.speculation.Speculator.observe`, ``model_k``): the draft model switches
itself off where it costs more than the trips it saves, while prompt lookup (free) keeps its
own ``k``.

All model work runs in one worker thread, never on the event loop; ``propose`` waits at most
``timeout`` seconds and then drafts nothing (verification never needs a draft).  The session
table is guarded by a lock held only for dict operations, so ``free`` never waits for a forward
pass.  ``close`` stops the thread (a pass in progress finishes) and drops every cache.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("molink.draft")

DRAFT_TIMEOUT = 30.0  # seconds a micro-batch waits for its drafts at most (a long first prefill included)
MAX_SESSIONS = 64  # per-request caches kept at most (least recently used dropped first)
MAX_CACHED_TOKENS = 32768  # tokens of KV over all those caches at most (a 135M draft: about 45 KB per token)


@dataclass
class _Session:
    """One request's draft-model state: its KV cache and the tokens whose KV it holds."""

    cache: Any  # transformers DynamicCache: [layers] x (keys, values) [1, kv_heads, len(fed), head_dim]
    fed: list[int] = field(default_factory=list)
    used: float = 0.0  # time.monotonic() of its last draft (LRU)


def check_vocab(draft_vocab: dict[str, int], served_vocab: dict[str, int], draft_rows: int, where: str) -> None:
    """Raise ``ValueError`` unless the two tokenizers map every token to the same id and the
    draft model's embedding has a row for each (``draft_rows``: its ``config.vocab_size``)."""
    if draft_vocab != served_vocab:
        differ = (
            sorted(t for t in draft_vocab.keys() ^ served_vocab.keys())[:3]
            or sorted(t for t in draft_vocab if draft_vocab[t] != served_vocab[t])[:3]
        )
        raise ValueError(
            f"--draft-model {where}: its vocabulary differs from the served model's ({len(draft_vocab)} tokens "
            f"against {len(served_vocab)}; first differing: {differ}): a draft model must share the served "
            "model's tokenizer (a smaller model of the same family)"
        )
    top = max(served_vocab.values(), default=-1)
    if draft_rows <= top:
        raise ValueError(
            f"--draft-model {where}: its config has vocab_size {draft_rows}, but the tokenizer has ids up to {top}"
        )


def load_draft_model(folder: str, served_tokenizer: Any, served_vocab_size: int, max_sessions: int) -> DraftModel:
    """Check ``folder`` against the served model's tokenizer, then load it (blocking: call it
    off the event loop).  Raises ``ValueError`` for a folder that is not a usable draft model."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"--draft-model {folder}: not a local model folder (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--draft-model {folder}: no tokenizer to check it against the served model ({e})") from e
    config = AutoConfig.from_pretrained(path)
    check_vocab(tokenizer.get_vocab(), served_tokenizer.get_vocab(), int(config.vocab_size), folder)
    return open_draft_model(path, served_vocab_size, max_sessions)


def open_draft_model(folder: Path, served_vocab_size: int, max_sessions: int) -> DraftModel:
    """Load the draft model in ``folder`` (checked against the served model already; blocking:
    call it off the event loop).  Its tensors are read by name wherever the folder's index puts
    them (a worker's delivered weights live in a shared tensor store beside the folder, which
    ``from_pretrained`` refuses); a tensor missing that no other one stands for (tied
    embeddings) is a ``ValueError``."""
    from transformers import AutoModelForCausalLM

    from .shard import load_config, read_checkpoint

    config = load_config(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    state = read_checkpoint(folder)
    missing, _ = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    model.tie_weights()
    params = model.state_dict()
    loaded = {params[k].data_ptr() for k in params if k in state}
    unfilled = [k for k in missing if params[k].data_ptr() not in loaded]
    if unfilled:
        raise ValueError(f"the draft model in {folder} has no tensor for {', '.join(unfilled[:3])}")
    model.eval()
    log.info("draft model %s: %d parameters", folder, sum(p.numel() for p in model.parameters()))
    return DraftModel(model, min(served_vocab_size, int(model.config.vocab_size)), max_sessions)


class DraftModel:
    """A loaded draft model and its per-request caches (see the module docstring)."""

    def __init__(
        self, model: Any, vocab_limit: int, max_sessions: int = MAX_SESSIONS, max_tokens: int = MAX_CACHED_TOKENS
    ) -> None:
        self.model = model
        self.vocab_limit = vocab_limit  # draft ids at or past it cannot be verified: a draft stops there
        self.max_sessions = max(1, max_sessions)
        self.max_tokens = max(1, max_tokens)
        self._sessions: dict[int, _Session] = {}
        self._busy: set[int] = set()  # keys a forward pass works on now (their session is out of the table)
        self._dropped: set[int] = set()  # keys freed while busy: their session is not put back
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="molink-draft")
        self.forward_passes = 0  # draft-model forward calls (diagnostics)
        self.seconds = 0.0  # time its thread spent drafting (diagnostics, benchmarks)
        self.token_seconds = 0.0  # seconds one drafted token costs (a one-token pass; decayed average)
        # transformers renamed the cache argument (past_key_values -> cache) within 5.x
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def held(self) -> int:
        """Per-request caches held now (busy ones included): 0 when no request is alive."""
        with self._lock:
            return len(self._sessions) + len(self._busy - self._dropped)

    def free(self, key: int) -> None:
        """Drop request ``key``'s cache (now, or when the pass working on it ends)."""
        with self._lock:
            self._sessions.pop(key, None)
            if key in self._busy:
                self._dropped.add(key)

    async def propose(
        self, jobs: Sequence[tuple[int, Sequence[int], int]], timeout: float = DRAFT_TIMEOUT
    ) -> list[tuple[int, ...]]:
        """Drafts for ``jobs`` of (request key, its tokens, at most k), in order, in the worker
        thread; empty drafts for all when they take longer than ``timeout`` seconds."""
        if not jobs:
            return []
        snapshot = [(key, tuple(tokens), k) for key, tokens, k in jobs]  # the loop keeps appending to tokens
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._draft_all, snapshot)
        done, _ = await asyncio.wait({future}, timeout=timeout)
        if not done:
            log.warning("draft model took over %.0f s for %d request(s): no drafts this step", timeout, len(jobs))
            future.add_done_callback(lambda f: f.exception())  # consumed when it ends: nothing is logged twice
            return [() for _ in jobs]
        return future.result()

    def close(self) -> None:
        """Stop the worker thread (a pass in progress finishes) and drop every cache."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._sessions.clear()

    # ------------------------------------------------------------------ the worker thread
    def _draft_all(self, jobs: list[tuple[int, tuple[int, ...], int]]) -> list[tuple[int, ...]]:
        began = time.perf_counter()
        out = []
        for key, tokens, k in jobs:
            try:
                out.append(self._draft_one(key, tokens, k))
            except Exception:  # a draft is optional: a failure costs this step's drafts, nothing else
                log.exception("draft model failed for a request; it drafts nothing this step")
                self.free(key)
                out.append(())
        self.seconds += time.perf_counter() - began
        return out

    def _take(self, key: int) -> _Session | None:
        with self._lock:
            self._busy.add(key)
            self._dropped.discard(key)
            return self._sessions.pop(key, None)

    def _put_back(self, key: int, session: _Session) -> None:
        with self._lock:
            self._busy.discard(key)
            if key in self._dropped:
                self._dropped.discard(key)
                return
            self._sessions[key] = session
            while len(self._sessions) > 1 and (
                len(self._sessions) > self.max_sessions
                or sum(len(s.fed) for s in self._sessions.values()) > self.max_tokens
            ):
                oldest = min(self._sessions, key=lambda s: self._sessions[s].used)
                del self._sessions[oldest]

    @torch.inference_mode()
    def _draft_one(self, key: int, tokens: tuple[int, ...], k: int) -> tuple[int, ...]:
        if k <= 0 or not tokens:
            return ()
        session = self._take(key)
        drafts: list[int] = []
        try:
            session = self._rewind(session, tokens)
            feed = list(tokens[len(session.fed) :])  # at least the last token (_rewind keeps it out)
            for _ in range(k):
                began = time.perf_counter()
                logits = self._forward(session, feed)  # [vocab] of the last position fed
                if len(feed) == 1:
                    took = time.perf_counter() - began
                    self.token_seconds = took if not self.token_seconds else 0.8 * self.token_seconds + 0.2 * took
                token = int(torch.argmax(logits))
                if token >= self.vocab_limit:
                    break
                drafts.append(token)
                feed = [token]
            session.used = time.monotonic()
        except BaseException:  # its cache may not match its tokens now: dropped
            with self._lock:
                self._busy.discard(key)
                self._dropped.discard(key)
            raise
        self._put_back(key, session)
        return tuple(drafts)

    def _rewind(self, session: _Session | None, tokens: tuple[int, ...]) -> _Session:
        """``session`` cropped to its longest common prefix with ``tokens`` less the last token
        (a forward needs at least one token to give logits); a new one where none is, or where
        the cache cannot be cropped."""
        keep = 0
        if session is not None:
            limit = min(len(session.fed), len(tokens) - 1)
            while keep < limit and session.fed[keep] == tokens[keep]:
                keep += 1
            if keep < len(session.fed):
                try:
                    session.cache.crop(keep - len(session.fed))  # a negative count: that many removed
                    if session.cache.get_seq_length() != keep:
                        raise RuntimeError("the crop left another length")
                    del session.fed[keep:]
                except (RuntimeError, ValueError):
                    session = None
        if session is None:
            from transformers import DynamicCache

            session = _Session(DynamicCache(config=self.model.config))
        return session

    def _forward(self, session: _Session, feed: list[int]) -> torch.Tensor:
        """Run ``feed`` after the session's tokens; its KV joins the cache; the last logits row."""
        start = len(session.fed)
        ids = torch.tensor([feed], dtype=torch.long)
        positions = torch.arange(start, start + len(feed), dtype=torch.long).unsqueeze(0)
        out = self.model(input_ids=ids, position_ids=positions, use_cache=True, **{self._cache_arg: session.cache})
        self.forward_passes += 1
        session.fed.extend(feed)
        return out.logits[0, -1]
