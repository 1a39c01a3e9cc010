"""flowlane: train and serve AgentFlow agents with Flow-GRPO, on Kubernetes or on one machine.

The code folders of the repository import as subpackages of this package:
``flowlane.api`` (spec models, protos), ``flowlane.runtime`` (the agent, engines, tools),
``flowlane.trainer`` (Flow-GRPO, learner, checkpoints, tracking) and ``flowlane.operator``.
"""

__version__ = "0.1.0"
