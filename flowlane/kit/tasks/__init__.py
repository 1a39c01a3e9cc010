"""Verifiable task sets: bundled offline ones and user data, with deterministic splits.

Bundled (no network, no downloads): ``arithmetic`` (multi-digit + - *, exact answers),
``game24`` (four numbers to make 24; any valid expression scores) and ``multihop`` (two-fact
questions about a fictional world, answerable only by searching the bundled corpus). Each has a
``train`` and a held-out ``test`` split that never overlap. ``load_tasks`` also reads user data
(JSONL or Parquet, from a path or ``s3://``); see ``loaders``.
"""

from flowlane.kit.tasks.loaders import bundled_task_sets, load_tasks
from flowlane.kit.tasks.task import Split, Task, carve_validation, resolve_split

__all__ = ["Split", "Task", "bundled_task_sets", "carve_validation", "load_tasks", "resolve_split"]
