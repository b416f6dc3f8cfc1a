"""Recovery that keeps what survived: a step given up on (its stages alive, one only late) goes
on from what every stage holds, not from token 0; the answers stay transformers' tokens and no
stage keeps a cache once the requests ended."""

import asyncio
import gc
import threading
import time

import pytest
from harness import Cluster, greedy, run
from tiny_models import make_tiny_checkpoint, reference_greedy

from worker_core.session import Session

PROMPTS = [list(range(30, 78)), list(range(90, 131))]  # 48 and 41 tokens
NEW = 40
FREEZE = 3.0  # seconds the middle stage stalls: past a step's deadline (1.5 s), short of a hung link's


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("resume") / "llama", num_layers=6, seed=11)


@pytest.fixture(scope="module")
def want(ckpt):
    return [reference_greedy(ckpt, p, NEW) for p in PROMPTS]


def _sessions() -> list[Session]:
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is Session and o.runner is not None and not o.ws.closed]


def _freeze_middle_stage_once(seconds: float) -> threading.Event:
    """The next step the middle stage computes stalls ``seconds`` first (its thread sleeps; the
    worker's loop answers pings meanwhile): set the returned event to arm it."""
    middle = next(s for s in _sessions() if not s.runner.shard.is_first and not s.runner.shard.is_last)
    runner = middle.runner
    plain = runner.run
    armed = threading.Event()

    def stalled(*args, **kw):
        if armed.is_set():
            armed.clear()
            time.sleep(seconds)
        return plain(*args, **kw)

    runner.run = stalled  # type: ignore[method-assign]  # the test stalls this stage on purpose
    return armed


@pytest.mark.parametrize("loop_back", [False, True], ids=["master-driven", "looped-back"])
def test_a_step_given_up_on_goes_on_from_what_every_stage_holds(ckpt, want, monkeypatch, loop_back):
    import master_core.link

    monkeypatch.setattr(master_core.link, "STEP_DEADLINE_FLOOR", 1.5)  # steps here take milliseconds

    async def main():
        async with Cluster(ckpt, workers=3) as c:
            g, e = c.master.group, c.engine
            e.loop_back = loop_back
            start, links = g.epoch, len(g.links)
            assert all(h.direct for h in g.hops), [h.describe() for h in g.hops]
            while not e.profiled:
                await asyncio.sleep(0.01)
            armed = _freeze_middle_stage_once(FREEZE)
            gens = [asyncio.create_task(e.generate(p, greedy(NEW))) for p in PROMPTS]
            while e.tokens_generated < 8:
                await asyncio.sleep(0.005)
            armed.set()
            got = await asyncio.wait_for(asyncio.gather(*gens), 60)
            assert not armed.is_set(), "the middle stage never stalled"
            counts = (g.epoch - start, links - len(g.links), e.resumed, e.replays, e.recomputed_tokens)
            e.forget_idle_prefixes()  # the ended requests' caches were kept for reuse: drop them
            deadline = time.monotonic() + 5
            while any(len(s.runner.kv) for s in _sessions()) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            left = [len(s.runner.kv) for s in _sessions()]
            return [r[0] for r in got], counts, left, e.held()

    got, (epochs, lost, resumed, replays, recomputed), left, held = run(main())
    assert got == want
    assert epochs == 0 and lost == 0, "a stage that was only late was dropped"
    assert resumed >= 1 and replays == 0, (resumed, replays)
    # what was in flight went again (a decode token per request and, looped back, the tokens it
    # ran ahead), never a prompt: a restart from 0 sends 41 + 48 prompt tokens and the outputs
    assert 0 < recomputed <= len(PROMPTS) * 9, recomputed
    assert left == [0, 0, 0] and held == {"running": 0, "waiting": 0, "text_streams": 0}, (left, held)
