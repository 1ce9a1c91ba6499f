"""``medlake materialize``: build a corrected dataset version from a recipe."""

from __future__ import annotations

import click

from medlake.cli.common import command, open_catalog, workspace_option


@click.command("materialize")
@click.argument("recipe", required=False)
@click.option("--all", "all_", is_flag=True, help="Materialise every recipes/*.yaml.")
@click.option("--processes", "-j", type=int, default=1, show_default=True,
              help="Worker processes for resizing images.")
@workspace_option
@command
def materialize(recipe, all_, processes, workspace):
    """Write lake/versions/NAME/ from recipes/RECIPE.yaml (or a YAML path), atomically.

    The folder holds manifest.parquet, lineage.parquet, annotations.parquet, DATASHEET.md
    and the images; the lineage and versions tables get the version's rows.
    """
    from medlake.pipelines import materialize as stage

    if all_ and recipe:
        raise click.UsageError("Use either RECIPE or --all, not both")
    if not all_ and not recipe:
        raise click.UsageError("Give RECIPE (a name under recipes/ or a YAML path) or --all")
    if processes < 1:
        raise click.UsageError("--processes must be at least 1")
    cat = open_catalog(workspace)
    results = stage.run_all(cat, processes=processes) if all_ else [
        stage.run(cat, recipe, processes=processes)]
    for r in results:
        click.echo(r.summary())
        click.echo(f"  -> {cat.ws.relpath(r.path)}")


COMMANDS = [materialize]
