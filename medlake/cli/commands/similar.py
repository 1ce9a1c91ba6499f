"""``medlake similar IMAGE_ID``: nearest images from the vector store."""

from __future__ import annotations

import click

from medlake.cli.common import command, open_catalog, workspace_option


@click.command("similar")
@click.argument("image_id")
@click.option("-k", "k", type=int, default=10, show_default=True, help="How many neighbours.")
@click.option("--model", default=None, help="Vectors of this model (default: params.yaml embed.model).")
@workspace_option
@command
def similar(image_id, k, model, workspace):
    """The K images most similar to IMAGE_ID (dataset:native_id), by cosine similarity.

    \b
    Example:
      medlake similar synth-derm:d0001 -k 5
    """
    from medlake.pipelines.embed import similar as run

    cat = open_catalog(workspace)
    hits = run(cat, image_id, k=k, model=model)
    for n, (other, sim) in enumerate(hits, 1):
        click.echo(f"{n:>3}  {other:30s}  {sim:.4f}")
    if not hits:
        click.echo("no other image has a vector yet")


COMMANDS = [similar]
