"""``medlake versions``: list dataset versions; ``medlake unpack``: unpack a packed version."""

from __future__ import annotations

from pathlib import Path

import click

from medlake.cli.common import command, open_catalog, workspace_option


@click.command("versions")
@click.option("--dataset", "dataset_id", help="Only versions of this dataset.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
@workspace_option
@command
def versions(dataset_id, fmt, workspace):
    """List versions: name, dataset, parent, kind, images, counts per split, creation time.

    \b
    Example:
      medlake versions --dataset ham10000
    """
    import polars as pl

    from medlake.catalog import render

    cat = open_catalog(workspace)
    v = cat.read("versions", required=True, hint="ingest a dataset first")
    if dataset_id:
        v = v.filter(pl.col("dataset_id") == dataset_id)
    v = v.with_columns(pl.col("counts").str.json_path_match("$.split").alias("splits"))
    v = v.select("name", "dataset_id", "parent", "kind", "n_images", "splits", "recipe_hash",
                 "created_at", "path").with_columns(pl.col("recipe_hash").str.slice(0, 12))
    click.echo(render(v.sort("dataset_id", "kind", "name").to_arrow(), fmt, max_rows=200).rstrip("\n"))


@click.command("unpack")
@click.argument("version")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the files here (default: into the version folder itself).")
@click.option("--overwrite", is_flag=True, help="Replace existing files whose content differs.")
@workspace_option
@command
def unpack(version, out, overwrite, workspace):
    """Unpack a packed version's image shards (export pack: shards) into plain files.

    VERSION is a version name (lake/versions/NAME of the workspace, e.g. after 'dvc pull') or
    a version folder. Every file is checked against the shard index (size, sha256). Unpacking
    into a DVC-tracked folder changes that output: use --out elsewhere to keep 'dvc status'
    clean.

    \b
    Example:
      medlake unpack lake/versions/synth-derm-packed --out plain-images
    """
    from medlake.catalog import CatalogError
    from medlake.catalog.shards import unpack as run_unpack

    folder = Path(version)
    if not folder.is_dir():
        folder = open_catalog(workspace).ws.versions_dir / version
        if not folder.is_dir():
            raise CatalogError(f"no version folder {version!r} (looked for {folder}); "
                               "run 'medlake versions' for the names, or 'dvc pull' it first")
    n = run_unpack(folder, out, overwrite=overwrite)
    click.echo(f"{n:,} files written under {out or folder}")


COMMANDS = [versions, unpack]
