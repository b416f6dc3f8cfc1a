"""A stage pauses a longer step between its layers for decode steps of other requests
(worker_core.stage.StepRun, worker_core.interleave): what every step computes is what it
computes alone; a step on a request being computed is refused; the open step's tokens count in
the KV budget; an abandoned step commits nothing; the layer clock picks the layers per run."""

import math

import pytest
import torch
from tiny_models import make_tiny_checkpoint

from worker_core.interleave import PAUSE_SECONDS, LayerClock
from worker_core.shard import load_shard
from worker_core.stage import StageRunner, StepRejected
from worker_core.wire import Segment

CPU = torch.device("cpu")
PROMPT = list(range(20, 60))  # 40 tokens
OTHER = [7, 8, 9, 10, 11]


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("interleave") / "llama", num_layers=4, seed=11)
    return load_shard(path, 0, 4, CPU, torch.float32)  # the whole model: ids in, logits out


def ids(tokens: list[int]) -> torch.Tensor:
    return torch.tensor(tokens, dtype=torch.int64)


def test_steps_between_layers_compute_what_they_compute_alone(shard):
    alone = StageRunner(shard, 1024, 256)
    want_decode_0 = alone.run((Segment(2, 0, len(OTHER), True),), ids(OTHER))
    want_prompt = alone.run((Segment(1, 0, len(PROMPT), True),), ids(PROMPT))
    want_decode_1 = alone.run((Segment(2, len(OTHER), 1, True),), ids([3]))

    r = StageRunner(shard, 1024, 256)
    r.run((Segment(2, 0, len(OTHER), True),), ids(OTHER))
    step = r.begin((Segment(1, 0, len(PROMPT), True),), ids(PROMPT))
    assert not step.advance(1)  # one layer of four
    decoded = r.run((Segment(2, len(OTHER), 1, True),), ids([3]))  # another request's decode step, between layers
    with pytest.raises(StepRejected, match="request 1 is being computed"):
        r.run((Segment(1, 0, 2, True),), ids([1, 2]))
    assert r.kv.length(1) == 0  # nothing of the open step committed yet
    while not step.advance(1):
        decoded_again = r.run((Segment(2, r.kv.length(2), 1, True),), ids([4]))
        assert decoded_again.shape == decoded.shape
    assert torch.allclose(step.result, want_prompt, atol=1e-5)
    assert torch.allclose(decoded, want_decode_1, atol=1e-5)
    assert r.kv.length(1) == len(PROMPT)
    assert want_decode_0.shape[0] == 1


def test_an_open_step_counts_in_the_budget_and_an_abandoned_one_commits_nothing(shard):
    r = StageRunner(shard, len(PROMPT) + 3, 256)
    step = r.begin((Segment(1, 0, len(PROMPT), True),), ids(PROMPT))
    with pytest.raises(StepRejected, match="KV budget"):  # 40 open + 5 > 43
        r.run((Segment(2, 0, len(OTHER), True),), ids(OTHER))
    step.advance(1)
    step.close()  # abandoned (its session failed or was cancelled)
    assert r.kv.length(1) == 0
    r.run((Segment(2, 0, len(OTHER), True),), ids(OTHER))  # its tokens no longer count
    again = r.begin((Segment(1, 0, len(PROMPT) - 5, True),), ids(PROMPT[:-5]))  # the request is free again
    while not again.advance(4):
        pass
    assert r.kv.length(1) == len(PROMPT) - 5


def test_the_layer_clock():
    clock = LayerClock()
    assert clock.layers(500, 30) == 1  # nothing measured: pause after every layer
    clock.observe(8, 30, 1.0)  # too short a step to tell
    assert not math.isfinite(clock.per_token_layer)
    clock.observe(100, 10, 0.1)  # 0.1 ms per token and layer
    assert clock.per_token_layer == pytest.approx(1e-4)
    assert clock.layers(100, 10) == int(PAUSE_SECONDS / (1e-4 * 100))  # about PAUSE_SECONDS per run
    assert clock.layers(10_000, 10) == 1
    assert clock.layers(1, 10) == 10  # a fast step runs whole
