"""The checkpoint store: atomic, verifiable checkpoints on ``file://`` or any S3 endpoint.

A learner that resumes from a half-written checkpoint silently trains a different model, so the
store's one promise is that a checkpoint is either complete or invisible:

- Every file of a checkpoint directory goes under ``<root>/step-<08d>/`` first; the **manifest**
  (each file's size and sha256, the step, the caller's meta, the metric, the time) is written
  **last**. A step without a valid manifest does not exist as far as :meth:`latest`, :meth:`list`
  and :meth:`best` are concerned. On ``file://`` the whole step is written into a hidden temp
  directory and renamed into place, so even the partial files are never visible.
- After the manifest, a small ``latest`` pointer names the step. :meth:`latest` trusts the
  pointer only when the step it names has a valid manifest; otherwise it falls back to the
  newest complete step.
- :meth:`download` checks every byte against the manifest's sha256 and can refuse a checkpoint
  of another model (the caller puts the model identity in ``meta``; see :func:`model_identity`).
- Retention keeps the last ``keep_last`` complete checkpoints and the best one by metric.
  Deleting removes the manifest first, so a half-deleted checkpoint is invisible too.
- Network trouble is expected: each S3 operation is retried with exponential backoff
  (:class:`RetryPolicy`); when retries run out, :class:`StoreUnavailableError` (a
  :class:`CheckpointError`) is raised. The training loop catches ``CheckpointError``, reports it
  and keeps training; the previous complete checkpoint stays the latest.
- Bad input is reported, never "repaired": a missing bucket, rejected credentials, a corrupt
  manifest or a checkpoint of another model raise a :class:`CheckpointError` subclass whose
  message says what to fix, and no existing checkpoint is modified.

The store moves files and manifests only; it knows nothing about torch, so the learner decides
what a checkpoint directory holds (safetensors weights, optimizer and RNG state, task cursor...).
One writer per root is assumed (the learner); readers may be many.

Where each part lives: :mod:`.layout` (step directories, manifest and pointer names),
:mod:`.manifest` (what a manifest holds and its strict parser), :mod:`.errors`, :mod:`.retention`
(which steps to keep), :mod:`.identity` (which model a checkpoint belongs to), :mod:`.backend` with
:mod:`.local_backend` and :mod:`.s3_backend` (where the bytes go), and :mod:`.store` (the
:class:`CheckpointStore` that composes them). Import the names from this package.
"""

from __future__ import annotations

from flowlane.kit.checkpoints.errors import (
    URI_FIELD,
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    StoreConfigError,
    StoreUnavailableError,
)
from flowlane.kit.checkpoints.identity import check_compatible, model_identity
from flowlane.kit.checkpoints.layout import (
    CHECKPOINT_POINTER,
    DEEPSPEED_DIR,
    MANIFEST_NAME,
    POINTER_NAME,
    RNG_FILE,
    is_training_state,
    step_dir_name,
)
from flowlane.kit.checkpoints.manifest import (
    MANIFEST_FORMAT,
    CheckpointRef,
    ManifestFile,
    build_manifest,
    parse_manifest,
)
from flowlane.kit.checkpoints.retention import BestMode, pick_best, select_retained
from flowlane.kit.checkpoints.s3_backend import (
    ACCESS_KEY_ENV,
    ENDPOINT_ENV,
    SECRET_KEY_ENV,
    RetryPolicy,
    is_transient_s3_error,
)
from flowlane.kit.checkpoints.store import CheckpointStore, open_checkpoint

__all__ = [
    "ACCESS_KEY_ENV",
    "CHECKPOINT_POINTER",
    "DEEPSPEED_DIR",
    "ENDPOINT_ENV",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "POINTER_NAME",
    "RNG_FILE",
    "SECRET_KEY_ENV",
    "URI_FIELD",
    "BestMode",
    "CheckpointError",
    "CheckpointRef",
    "CheckpointStore",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
    "ManifestFile",
    "RetryPolicy",
    "StoreConfigError",
    "StoreUnavailableError",
    "build_manifest",
    "check_compatible",
    "is_training_state",
    "is_transient_s3_error",
    "model_identity",
    "open_checkpoint",
    "parse_manifest",
    "pick_best",
    "select_retained",
    "step_dir_name",
]
