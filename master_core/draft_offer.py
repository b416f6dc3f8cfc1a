"""The draft model a last stage holds, as its ``Assign`` names it.

Contract
--------
Where the master has a draft model (``--draft-model``), the stage that ends at the last layer
holds a copy too, to draft inside the loop-back (:mod:`worker_core.drafting`).
``offer_draft(folder, source, vocab_size)`` (blocking: call it in a thread) describes it: in a
paired group (``source``, a :class:`~master_core.weight_source.WeightSource` over ``folder``)
its config and every tensor it needs, delivered like a range's weights (``Fetch`` and ``Chunk``,
by hash) under the digest of both; in a local group the folder, which the worker reads itself.
:attr:`DraftOffer.nbytes` is what holding it costs the stage (float32, as it runs), taken from
the stage's memory before its KV budget is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker_core.shard import checkpoint_files, load_config, needed_tensors
from worker_core.weights import manifest_digest, read_locations
from worker_core.wire import TensorSpec

from .weight_source import WeightSource


@dataclass(frozen=True)
class DraftOffer:
    model: str  # a folder (local groups) or the digest of the delivered config and tensors
    config_json: str = ""
    manifest: tuple[TensorSpec, ...] = ()
    nbytes: int = 0  # its parameters in float32

    def fields(self) -> dict[str, Any]:
        """The ``wire.Assign`` fields that name it."""
        return {"draft_model": self.model, "draft_config_json": self.config_json, "draft_manifest": self.manifest}


def offer_draft(folder: Path, source: WeightSource | None) -> DraftOffer:
    """The offer of the draft model in ``folder`` (see the module docstring)."""
    layers = int(load_config(folder).num_hidden_layers)
    if source is None:
        files = checkpoint_files(folder)
        where = {name: shape for path in set(files.values()) for name, (_, shape, _, _) in read_locations(path).items()}
        params = sum(math.prod(where[name]) for name in needed_tensors(folder, 0, layers))
        return DraftOffer(str(folder.resolve()), nbytes=4 * params)
    config_json, specs = source.manifest(0, layers)
    params = sum(math.prod(s.shape) for s in specs)
    return DraftOffer(manifest_digest(config_json, specs), config_json, tuple(specs), 4 * params)
