"""Compatibility name: model provisioning moved to ``flowlane.kit.models``, below runtime and trainer.

Imports from here keep working (this name *is* that module, so patching either patches both);
new code imports ``flowlane.kit.models``.
"""

import sys

from flowlane.kit import models as _moved
from flowlane.kit.models import *  # noqa: F403  (the names, for static tools)

sys.modules[__name__] = _moved
