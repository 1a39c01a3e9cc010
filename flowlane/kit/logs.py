"""One logging setup for every flowlane process, readable by people and by cluster log stacks.

The learner, the rollout workers, the sandbox server and the operator all log through
:func:`configure`. In a pod the default is one JSON object per line, which log collectors (Loki,
Elasticsearch, Cloud Logging) parse without a pattern; on a terminal it is one plain line. Every
record carries the process's context as fields of its own: ``component`` (learner, rollout,
sandbox, operator), ``run`` (the FlowRun), and once known ``step`` and ``policy_version``, so
"every warning of run X at step 40" is a query, not a grep. Components update the step and policy
version with :func:`set_context` as they advance; a record's own ``extra={"step": ...}`` wins.

The format comes from ``--log-format``, else ``FLOWLANE_LOG_FORMAT``, else JSON inside Kubernetes
(``KUBERNETES_SERVICE_HOST`` is set in every pod) and text elsewhere. JSON keys match kopf's
formatter (``timestamp``, ``severity``, ``message``, ``object``), so the operator's lines and the
components' lines share one shape. Standard library only: every image can import it.
"""

from __future__ import annotations

import datetime
import enum
import json
import logging
import os
import sys
from typing import Any, TextIO

LOG_FORMAT_ENV = "FLOWLANE_LOG_FORMAT"
LOG_LEVEL_ENV = "FLOWLANE_LOG_LEVEL"
IN_POD_ENV = "KUBERNETES_SERVICE_HOST"
#: The ``--log-format`` option's help, the same for every component.
LOG_FORMAT_HELP = f"json or text (default: ${LOG_FORMAT_ENV}, else json in a pod, text elsewhere)."

#: The context fields, in the order they are printed.
CONTEXT_FIELDS = ("component", "run", "step", "policy_version")


class LogFormat(enum.StrEnum):
    JSON = "json"  # one JSON object per line, for log collectors
    TEXT = "text"  # one plain line per record, for terminals and files read by people


_context: dict[str, Any] = {}

# Attributes every LogRecord has; anything else on a record came from ``extra=`` (or kopf's refs).
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "flowlane_context"}
# kopf's per-object loggers attach these; ``k8s_ref`` becomes ``object``, the others are internal.
_KOPF_REF, _KOPF_INTERNAL = "k8s_ref", frozenset({"k8s_skip", "settings"})


def resolve_format(value: str | LogFormat | None = None) -> LogFormat:
    """The format to use: ``value``, else ``$FLOWLANE_LOG_FORMAT``, else JSON in a pod, text elsewhere."""
    chosen = value or os.environ.get(LOG_FORMAT_ENV) or (LogFormat.JSON if os.environ.get(IN_POD_ENV) else "text")
    try:
        return LogFormat(str(chosen).strip().lower())
    except ValueError:
        # A plain ValueError: typer and pydantic turn it into a usage error naming the option.
        raise ValueError(f"log format {chosen!r}: use json or text ({LOG_FORMAT_ENV})") from None


def set_context(**fields: Any) -> None:
    """Set (or, with None, clear) context fields that every later record carries."""
    for name, value in fields.items():
        if value is None:
            _context.pop(name, None)
        else:
            _context[name] = value


def context() -> dict[str, Any]:
    return dict(_context)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """Context, then the record's own extras (which win), with JSON-friendly values only."""
    fields = dict(_context)
    for name, value in vars(record).items():
        if name in _RECORD_ATTRS or name in _KOPF_INTERNAL or name.startswith("_"):
            continue
        if name == _KOPF_REF:
            fields["object"] = value
        elif value is None or isinstance(value, str | int | float | bool | dict | list):
            fields[name] = value
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per record: timestamp, severity, logger, message, the context, any extras."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, Any] = {
            "timestamp": created.isoformat(timespec="milliseconds"),
            "severity": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [component run step=N policy_version=M]: message``, the context only where set."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(flowlane_context)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        parts = [str(fields[name]) for name in ("component", "run") if name in fields]
        parts += [f"{name}={fields[name]}" for name in CONTEXT_FIELDS[2:] if name in fields]
        record.flowlane_context = f" [{' '.join(parts)}]" if parts else ""
        return super().format(record)


def configure(component: str, *, run: str | None = None, log_format: str | LogFormat | None = None,
              level: str | int | None = None, stream: TextIO | None = None) -> LogFormat:
    """Route the root logger to stderr in the chosen format, with ``component`` and ``run`` as context.

    Replaces whatever handlers the root logger had (``basicConfig``'s, kopf's), so each process has
    exactly one format. ``level`` defaults to ``$FLOWLANE_LOG_LEVEL``, else INFO. Returns the format.
    """
    chosen = resolve_format(log_format)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if chosen is LogFormat.JSON else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    chosen_level = level or os.environ.get(LOG_LEVEL_ENV) or logging.INFO
    root.setLevel(chosen_level.upper() if isinstance(chosen_level, str) else chosen_level)
    _context.clear()
    set_context(component=component, run=run)
    return chosen
