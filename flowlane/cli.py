"""The ``flowlane`` command line.

Each command's implementation lives next to the code it drives (``runtime/``, ``trainer/``,
``operator/``); this module only wires them into one CLI. Commands are imported lazily so that
``flowlane --help`` and light commands start fast; the heavy imports (torch, vLLM) happen inside
the command that needs them. A ``FlowlaneError`` escaping any command is printed as one line and
exits with code 2: users see what to fix, never a traceback from deep inside.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

import typer

app = typer.Typer(
    name="flowlane",
    help="Train and serve AgentFlow agents with Flow-GRPO, on Kubernetes or on one machine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# command name -> (module, attribute, help). Sub-apps are typer.Typer objects; commands are functions.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "solve": ("flowlane.runtime.agent.commands", "solve", "Answer one question with the agent, step by step."),
    "run": ("flowlane.operator.run_command", "run", "Run a FlowRun on this machine (local processes)."),
    "eval": ("flowlane.runtime.evaluate", "eval_command", "Score a planner on a held-out task split."),
    "serve": ("flowlane.runtime.serving.gateway", "serve", "Serve an agent behind an OpenAI-compatible API."),
    "learner": ("flowlane.trainer.learner_service", "learner", "Run the learner service (a FlowRun component)."),
    "rollout": ("flowlane.runtime.rollout.worker", "rollout", "Run a rollout worker (a FlowRun component)."),
    "sandbox": ("flowlane.runtime.sandbox.server", "sandbox", "Run the tool sandbox gRPC service."),
    "generate": ("flowlane.operator.commands", "generate", "Regenerate CRDs and protobuf stubs."),
}
SUB_APPS: dict[str, tuple[str, str, str]] = {
    "models": ("flowlane.runtime.provisioning.commands", "models_app", "Import and list planner models."),
    "operator": ("flowlane.operator.commands", "operator_app", "Run the Kubernetes operator."),
}


def _load(module: str, attr: str) -> Any:
    """Import one command's implementation; a missing module means the feature is not installed."""
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as err:
        if err.name and module.startswith(err.name):
            return None
        raise


def _placeholder(name: str, module: str) -> Callable[[], None]:
    def command() -> None:
        raise typer.BadParameter(f"'flowlane {name}' is not available in this build ({module} missing)")

    return command


def _register(wanted: str | None) -> None:
    """Register every command by name and summary; import only the one being run."""
    loose = {"allow_extra_args": True, "ignore_unknown_options": True}
    for name, (module, attr, help_text) in COMMANDS.items():
        func = _load(module, attr) if wanted == name else None
        if func is not None:
            app.command(name, help=help_text)(func)
        else:
            app.command(name, help=help_text, context_settings=loose)(_placeholder(name, module))
    for name, (module, attr, help_text) in SUB_APPS.items():
        sub = _load(module, attr) if wanted == name else None
        if isinstance(sub, typer.Typer):
            app.add_typer(sub, name=name, help=help_text)
        else:
            app.command(name, help=help_text, context_settings=loose)(_placeholder(name, module))


def main() -> None:
    from flowlane.api.errors import FlowlaneError

    _register(sys.argv[1] if len(sys.argv) > 1 else None)
    try:
        app()
    except FlowlaneError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
