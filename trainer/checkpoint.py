"""Compatibility name: the checkpoint store moved to ``flowlane.kit.checkpoints``, below runtime and trainer.

Imports from here keep working (this name *is* that module, so patching either patches both);
new code imports ``flowlane.kit.checkpoints``.
"""

import sys

from flowlane.kit import checkpoints as _moved
from flowlane.kit.checkpoints import *  # noqa: F403  (the names, for static tools)

sys.modules[__name__] = _moved
