"""``medlake duplicates``: candidate pairs, verification, clusters."""

from __future__ import annotations

from pathlib import Path

import click

from medlake.cli.common import command, open_catalog, workspace_option


@click.command("duplicates")
@click.option("--external", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="CSV of known pairs (image_a, image_b[, score]) to import.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: vector search and verification as Ray tasks (medlake[scale]).")
@click.option("--address", default=None, help="Ray head HOST:PORT (default: RAY_ADDRESS).")
@workspace_option
@command
def duplicates(external, engine, address, workspace):
    """Find near-duplicate pairs across every dataset, verify them and cluster them.

    Candidates come from sha256, perceptual hashes and vector neighbours; each is checked by
    local-feature matching with geometric verification. Writes the 'pairs' and 'clusters'
    tables. Thresholds come from params.yaml 'duplicates:'.
    """
    from medlake.pipelines import duplicates as stage

    cat = open_catalog(workspace)
    res = stage.run(cat, external=external, echo=click.echo, engine=engine, address=address)
    click.echo(f"duplicates: {res['candidates']:,} candidate pairs, {res['verified']:,} verified, "
               f"{res['external']:,} external, {res['clusters']:,} clusters")


COMMANDS = [duplicates]
