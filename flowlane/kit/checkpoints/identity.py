"""Which model a checkpoint belongs to, so one of another model is refused instead of loaded."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowlane.api.errors import ConfigError
from flowlane.kit.checkpoints.errors import URI_FIELD, IncompatibleCheckpointError
from flowlane.kit.checkpoints.manifest import CheckpointRef


def model_identity(model_dir: Path) -> dict[str, Any]:
    """What makes two checkpoints "the same model": put it in ``meta["model"]`` when saving.

    Reads ``config.json`` (a transformers model directory) and hashes it canonically, leaving out
    keys that change with library versions or load settings rather than with the weights' shape
    and meaning (``transformers_version``, ``torch_dtype``/``dtype``, ``_name_or_path``,
    ``use_cache``).
    """
    config_path = Path(model_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{config_path}: cannot read the model config ({exc}); is it a model directory?") from None
    volatile = {"transformers_version", "torch_dtype", "dtype", "_name_or_path", "use_cache"}
    stable = {k: v for k, v in config.items() if k not in volatile}
    return {
        "architectures": list(config.get("architectures") or []),
        "model_type": config.get("model_type"),
        "config_sha256": hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest(),
    }


def check_compatible(ref: CheckpointRef, expected_meta: Mapping[str, Any]) -> None:
    """Raise :class:`IncompatibleCheckpointError` unless every expected key matches the ref's meta."""
    differing = [key for key, want in expected_meta.items() if ref.meta.get(key) != want]
    if differing:
        shown = "; ".join(f"{k}: checkpoint has {ref.meta.get(k)!r}, expected {expected_meta[k]!r}" for k in differing)
        raise IncompatibleCheckpointError(
            f"checkpoint {ref.uri} belongs to another model ({shown}); point {URI_FIELD} at this "
            "model's checkpoints or start without resuming"
        )
