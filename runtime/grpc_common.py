"""Compatibility name: the gRPC wire helpers moved to ``flowlane.kit.grpc_common``, below runtime and trainer.

The learner serves and the rollout workers, sandbox and operator call the same wire, so neither
side owns it. Imports from here keep working (this name *is* that module, so patching either
patches both); new code imports ``flowlane.kit.grpc_common``.
"""

import sys

from flowlane.kit import grpc_common as _moved
from flowlane.kit.grpc_common import *  # noqa: F403  (the names, for static tools)

sys.modules[__name__] = _moved
