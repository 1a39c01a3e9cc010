"""Compatibility names: the user-facing errors live in ``flowlane.api.errors``, below every layer."""

from flowlane.api.errors import ConfigError, EngineUnavailableError, FlowlaneError, ModelNotFoundError

__all__ = ["ConfigError", "EngineUnavailableError", "FlowlaneError", "ModelNotFoundError"]
