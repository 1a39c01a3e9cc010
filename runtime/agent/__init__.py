"""The AgentFlow agent: planner, executor, verifier, solution generator and memory.

``Agent`` (in ``agent.py``) wires the modules; ``parsing`` and ``prompts`` are pure functions
used by the modules. Names are re-exported lazily so that ``flowlane solve --help`` does not pay
for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Agent": "flowlane.runtime.agent.agent",
    "AgentConfig": "flowlane.runtime.agent.agent",
    "AgentRequest": "flowlane.runtime.agent.agent",
    "AgentEventKind": "flowlane.runtime.agent.agent",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
