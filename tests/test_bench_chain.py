"""The --single bench's floor (a bare process chain over the same layer ranges) decodes the model itself."""

import pytest
from tiny_models import make_tiny_checkpoint, reference_greedy

from app.tools.bench.chain import chain_decode


@pytest.mark.slow
def test_a_bare_process_chain_gives_transformers_greedy_tokens(tmp_path):
    folder = make_tiny_checkpoint("llama", tmp_path / "llama", num_layers=4, seed=3)
    prompt = [5, 17, 42, 9, 23]
    res = chain_decode(folder, [(0, 1), (1, 3), (3, 4)], threads=1, prompt=prompt, new_tokens=8, timeout=120)
    assert res["tokens"] == reference_greedy(folder, prompt, 8)
    assert res["stages"] == 3 and len(res["stage_compute_ms"]) == 3 and res["decode_tokens_per_s"] > 0
