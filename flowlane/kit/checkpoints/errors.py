"""What can go wrong with a checkpoint, as exception types a training loop can tell apart.

Every failure is a :class:`CheckpointError`, so the learner catches one type, reports it and keeps
training; the subclasses say whether the endpoint was down, the store is misconfigured, or a
checkpoint is corrupt or belongs to another model.
"""

from __future__ import annotations

from flowlane.api.errors import ConfigError, FlowlaneError

# The FlowRun field a message names when the store's location is what must change.
URI_FIELD = "spec.storage.checkpointUri"


class CheckpointError(FlowlaneError):
    """A checkpoint operation failed. Training loops catch this, report it and keep going."""


class StoreUnavailableError(CheckpointError):
    """The storage endpoint did not answer (or kept failing) through every retry."""


class StoreConfigError(CheckpointError, ConfigError):
    """The store itself is misconfigured: bad URI, missing bucket, rejected credentials."""


class CorruptCheckpointError(CheckpointError):
    """A manifest that does not parse, or files that do not match their manifest."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint written for a different model than the one being trained or served."""
