"""``medlake versions``: list dataset versions (roots from ingest, derived from recipes)."""

from __future__ import annotations

import click

from cli.common import command, open_catalog, workspace_option


@click.command("versions")
@click.option("--dataset", "dataset_id", help="Only versions of this dataset.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
@workspace_option
@command
def versions(dataset_id, fmt, workspace):
    """List versions: name, dataset, parent, kind, images, counts per split, creation time."""
    import polars as pl

    from catalog import render

    cat = open_catalog(workspace)
    v = cat.read("versions", required=True, hint="ingest a dataset first")
    if dataset_id:
        v = v.filter(pl.col("dataset_id") == dataset_id)
    v = v.with_columns(pl.col("counts").str.json_path_match("$.split").alias("splits"))
    v = v.select("name", "dataset_id", "parent", "kind", "n_images", "splits", "recipe_hash",
                 "created_at", "path").with_columns(pl.col("recipe_hash").str.slice(0, 12))
    click.echo(render(v.sort("dataset_id", "kind", "name").to_arrow(), fmt, max_rows=200).rstrip("\n"))


COMMANDS = [versions]
