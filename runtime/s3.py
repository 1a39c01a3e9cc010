"""Compatibility name: S3 access moved to ``flowlane.kit.s3``, below runtime and trainer.

Imports from here keep working (this name *is* that module, so patching either patches both);
new code imports ``flowlane.kit.s3``.
"""

import sys

from flowlane.kit import s3 as _moved
from flowlane.kit.s3 import *  # noqa: F403  (the names, for static tools)

sys.modules[__name__] = _moved
