"""User-facing errors, shared by every layer (so they sit in the lowest one).

Anything a user can fix (a bad path, an unknown tool, an unreachable engine) raises a
``FlowlaneError`` whose message says what was wrong and what to do. The CLI prints it on one line
and exits non-zero; it never shows a traceback for these.
"""


class FlowlaneError(Exception):
    """An error with a message meant for the user, one line, naming what to fix."""


class ConfigError(FlowlaneError):
    """Bad configuration or input (unknown tool, empty question, invalid spec field)."""


class ModelNotFoundError(FlowlaneError):
    """A model path or name that cannot be resolved to a model directory."""


class EngineUnavailableError(FlowlaneError):
    """An LLM engine that cannot be reached or started."""
