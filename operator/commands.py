"""CLI commands of the operator area: ``flowlane generate`` and ``flowlane operator ...``.

Imports stay light at module level (typer only) so the CLI starts fast; kopf, pydantic models and
protoc are imported inside the command that needs them.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from typing import Annotated

import typer

from flowlane.api.errors import ConfigError


def generate(
    out_dir: Annotated[
        list[Path] | None,
        typer.Option("--crd-dir", help="Write CRDs here instead of crds/ and charts/flowlane/crds/ (repeatable)."),
    ] = None,
) -> None:
    """Regenerate the CRDs from the pydantic models (and the gRPC stubs from api/*.proto)."""
    from flowlane.api import crdgen

    written = crdgen.generate(out_dir or None)
    if importlib.util.find_spec("flowlane.api.codegen") is not None:
        from flowlane.api import codegen

        written += codegen.generate_protos()
    for path in written:
        typer.echo(f"wrote {path}")


operator_app = typer.Typer(help="Run the Kubernetes operator for FlowRuns and FlowServices.",
                           no_args_is_help=True, add_completion=False)


@operator_app.command("run")
def run(
    namespace: Annotated[list[str] | None, typer.Option(
        "--namespace", "-n", help="Serve FlowRuns/FlowServices in this namespace (repeatable).")] = None,
    all_namespaces: Annotated[bool, typer.Option(
        "--all-namespaces", "-A", help="Serve every namespace (needs a ClusterRole).")] = False,
    health_port: Annotated[int, typer.Option(help="Port of the /healthz liveness endpoint (0: off).")] = 8080,
    metrics_port: Annotated[int, typer.Option(help="Port of the Prometheus /metrics endpoint (0: off).")] = 9090,
    log_format: Annotated[str | None, typer.Option(help="json or text (default: $FLOWLANE_LOG_FORMAT or json).")]
    = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error.")] = None,
    reconcile_interval: Annotated[float, typer.Option(help="Seconds between periodic re-checks.")] = 10.0,
    server: Annotated[str | None, typer.Option(hidden=True, help="API server URL (testing).")] = None,
) -> None:
    """Run the operator until interrupted."""
    from flowlane.operator.handlers import run_operator
    from flowlane.operator.settings import OperatorConfig, OperatorMetrics, configure_logging

    if bool(namespace) == all_namespaces:
        raise ConfigError("pass --namespace NAME (repeatable) or --all-namespaces, exactly one of them")
    config = OperatorConfig.from_env(
        namespaces=list(namespace or []), health_port=health_port or None, metrics_port=metrics_port or None,
        log_format=log_format, log_level=log_level, reconcile_interval_s=reconcile_interval, server=server,
    )
    configure_logging(config)
    metrics = OperatorMetrics()
    if config.metrics_port:
        metrics.serve(config.metrics_port)
    try:
        asyncio.run(run_operator(config, metrics=metrics))
    except KeyboardInterrupt:
        sys.exit(130)


@operator_app.command("crds")
def crds() -> None:
    """Print the CRDs as YAML (e.g. `flowlane operator crds | kubectl apply -f -`)."""
    from flowlane.api import crdgen

    typer.echo("---\n".join(crdgen.render_yaml(crd) for crd in crdgen.all_crds()), nl=False)
