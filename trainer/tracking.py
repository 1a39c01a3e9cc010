"""Compatibility name: experiment tracking moved to ``flowlane.kit.tracking``, below runtime and trainer.

The learner logs its training runs and ``flowlane eval`` (the rollout side) its evaluation runs to
the same MLflow, so neither side owns the tracker. Imports from here keep working (this name *is*
that module, so patching either patches both); new code imports ``flowlane.kit.tracking``.
"""

import sys

from flowlane.kit import tracking as _moved
from flowlane.kit.tracking import *  # noqa: F403  (the names, for static tools)

sys.modules[__name__] = _moved
