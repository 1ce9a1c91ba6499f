"""``medlake leakage``: groups (patients, lesions, duplicate clusters) spanning splits."""

from __future__ import annotations

from pathlib import Path

import click

from medlake.cli.common import command, open_catalog, workspace_option


@click.command("leakage")
@click.argument("dataset", required=False)
@click.option("--split-scheme", "scheme", help="Split scheme (default: every scheme of the dataset).")
@click.option("--pairs", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Duplicate-pairs CSV (similarity,from_img,to_img), repeatable; default: "
                   "params.yaml leakage.pairs.<dataset>.")
@click.option("--no-clusters", is_flag=True, help="Ignore the clusters table.")
@workspace_option
@command
def leakage(dataset, scheme, pairs, no_clusters, workspace):
    """Count groups that span train/val/test and write the leakage table.

    Without DATASET, every (dataset, split scheme) in the splits table is checked.
    """
    from medlake.pipelines import leakage as stage

    if pairs and not dataset:
        raise click.UsageError("--pairs needs DATASET (the pairs name images of one dataset)")
    cat = open_catalog(workspace)
    df = stage.run(cat, dataset, scheme=scheme, pairs=pairs, use_clusters=not no_clusters)
    click.echo(stage.summary(df))


COMMANDS = [leakage]
