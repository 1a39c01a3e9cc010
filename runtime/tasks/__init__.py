"""Compatibility name: the task sets moved to ``flowlane.kit.tasks``, below runtime and trainer.

The learner loads the training split and the rollout side scores against the same tasks, so
neither side owns them. Imports from here keep working, submodules included (each name *is* the
moved module, so patching either patches both); new code imports ``flowlane.kit.tasks``.
"""

import sys

from flowlane.kit import tasks as _moved
from flowlane.kit.tasks import *  # noqa: F403  (the names, for static tools)
from flowlane.kit.tasks import generators, loaders, multihop, task

for _module in (generators, loaders, multihop, task):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module
sys.modules[__name__] = _moved
