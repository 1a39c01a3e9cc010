"""How a checkpoint root is laid out: ``step-<08d>/`` directories, each with a manifest, and a pointer.

The names here are shared by the store, by model provisioning (which reads checkpoints a FlowRun
wrote) and by the learner (which decides what a checkpoint directory holds).
"""

from __future__ import annotations

import re

MANIFEST_NAME = "MANIFEST.json"
# The file in a checkpoint root that names its latest step (a run's checkpoints/ directory has one).
CHECKPOINT_POINTER = "latest"
POINTER_NAME = CHECKPOINT_POINTER
# A step directory's name; group 1 is the step.
STEP_DIR_PATTERN = re.compile(r"^step-(\d{8})$")

#: The parts of a learner checkpoint that only resuming training reads: DeepSpeed's optimizer and
#: lr-scheduler state (twice the weights' size with Adam) and the RNG states. Serving and
#: evaluating a checkpoint need the rest: weights, config and tokenizer.
DEEPSPEED_DIR = "deepspeed"
RNG_FILE = "rng_state.pt"


def is_training_state(path: str) -> bool:
    """True for a checkpoint file (manifest path) that only resuming training needs."""
    return path == RNG_FILE or path.startswith(f"{DEEPSPEED_DIR}/")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"

