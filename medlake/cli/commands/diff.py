"""``medlake diff A B``: images added, removed, moved and relabelled between two versions."""

from __future__ import annotations

from pathlib import Path

import click

from medlake.cli.common import command, open_catalog, workspace_option


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the per-image changes as Parquet to this file.")
@workspace_option
@command
def diff(a, b, out, workspace):
    """Semantic diff of versions A and B (names from 'medlake versions', or version folders).

    \b
    Example:
      medlake diff ham10000@dermamnist ham10000-corrected --out changes.parquet
    """
    from medlake.pipelines import diff as stage

    res = stage.run(open_catalog(workspace), a, b, out=out)
    click.echo(stage.render(res))
    if out:
        click.echo(f"changes written to {out} ({res.changes.height:,} rows)")


COMMANDS = [diff]
