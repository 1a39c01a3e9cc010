"""``flowlane models``: import and list planner models.

A thin shell over ``flowlane.kit.models``; only typer and the standard library are imported
at module level so that ``flowlane models list`` answers at once. Importing a model (which needs
transformers) happens inside the command.
"""

from __future__ import annotations

from pathlib import Path

import typer

models_app = typer.Typer(
    name="models",
    help="Import and list planner models.",
    no_args_is_help=True,
    add_completion=False,
)


@models_app.command("import")
def import_command(
    name: str = typer.Argument(..., help="Known model name, e.g. smollm2-135m-instruct."),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Directory that holds imported models (default $FLOWLANE_HOME/models)."
    ),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the model is already imported."),
) -> None:
    """Import a known model into the model cache (idempotent) and print its directory."""
    from flowlane.kit.models import import_model

    typer.echo(str(import_model(name, cache_dir=cache_dir, force=force)))


@models_app.command("list")
def list_command(
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Directory that holds imported models (default $FLOWLANE_HOME/models)."
    ),
) -> None:
    """List known model names and the models in the cache."""
    from flowlane.kit.models import list_models

    rows = list_models(cache_dir)
    width = max(len(row["name"]) for row in rows) if rows else 0
    for row in rows:
        typer.echo(f"{row['name']:<{width}}  {row['status']:<12}  {row['path']}")


@models_app.command("verify")
def verify_command(
    name: str = typer.Argument(..., help="Known model name or an imported model directory."),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Directory that holds imported models (default $FLOWLANE_HOME/models)."
    ),
) -> None:
    """Check every file of an imported model against its manifest's sha256."""
    from flowlane.kit.models import KNOWN_MODELS, model_dir_for, verify_model_dir

    path = model_dir_for(name, cache_dir) if name in KNOWN_MODELS else Path(name)
    verify_model_dir(path)
    typer.echo(f"ok: {path}")
