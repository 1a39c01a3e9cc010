"""Which concrete weight dtype ``auto`` means on this machine, for the engines and the learner alike.

Both sides must agree: the learner re-scores the rollout's sampling log-probs, and a dtype
mismatch between them shifts the Flow-GRPO importance ratio.
"""

from __future__ import annotations

# torch at module level: the question is about this machine's accelerator; only weight code imports this.
import torch

from flowlane.api.enums import Dtype
from flowlane.api.errors import ConfigError

#: Weight dtypes an engine or the learner accepts; "auto" picks per machine (``resolve_dtype``).
DTYPES = tuple(kind.value for kind in Dtype)


def resolve_dtype(dtype: str) -> str:
    """A dtype name to a concrete one: "auto" is bfloat16 on a GPU that has it, else float32.

    float32 on CPU keeps rollout log-probs within ~1e-5 of the learner's float32 re-scoring;
    bfloat16 there is faster but must be asked for.
    """
    name = dtype.strip().lower()
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if name != "auto":
        return name
    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
