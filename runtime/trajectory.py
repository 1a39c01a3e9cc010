"""Compatibility name: the trajectory record moved to ``flowlane.api.trajectory``, below every layer.

The learner, the rollout side and the operator all read it, so it sits with the other shared
contracts. Imports from here keep working (this name *is* that module, so patching either patches
both); new code imports ``flowlane.api.trajectory``.
"""

import sys

from flowlane.api import trajectory as _moved
from flowlane.api.trajectory import *  # noqa: F403  (the names, for static tools)

sys.modules[__name__] = _moved
