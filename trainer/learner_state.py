"""What a learner checkpoint holds besides the model and DeepSpeed's state: the format number and
DeepSpeed's tag, every rank's RNG state (its file, capture, restore, and the seeding at start) and
the JSON form of the config written to ``learner_state.json``.

The checkpoint files themselves are written and checked by ``Learner.save_checkpoint_files`` and
``Learner.load_checkpoint_files`` (``flowlane.trainer.learner``), which hold the engine.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch

from flowlane.kit.checkpoints import DEEPSPEED_DIR, RNG_FILE

CHECKPOINT_FORMAT = 1
DEEPSPEED_TAG = "state"


def rng_file(rank: int) -> str:
    """Rank 0's RNG state at the top (as with one rank), the other ranks' next to their ZeRO shards."""
    return RNG_FILE if rank == 0 else f"{DEEPSPEED_DIR}/rng_state_rank{rank}.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def jsonable(value: Any) -> Any:
    """Round-trip through JSON types (tuples become lists, enums their values)."""
    return json.loads(json.dumps(value, default=str))
