"""``medlake outliers``: images least like their nearest neighbours."""

from __future__ import annotations

import click

from medlake.cli.common import command, open_catalog, workspace_option


@click.command("outliers")
@click.option("--k", "k", type=int, default=None, help="Neighbours per image "
              "(default: params.yaml outliers.k, else 10).")
@click.option("--show", type=int, default=10, show_default=True, help="Print the top N.")
@workspace_option
@command
def outliers(k, show, workspace):
    """Rank images by mean cosine similarity to their k nearest neighbours (lowest first)."""
    from medlake.pipelines import outliers as stage

    cat = open_catalog(workspace)
    res = stage.run(cat, k=k)
    click.echo(f"outliers ({res['model']}, k={res['k']}): {res['images']:,} images ranked")
    for r in res["top"][:show]:
        click.echo(f"{r['rank']:>5}  {r['image_id']:30s}  mean_sim={r['mean_sim']:.3f}")


COMMANDS = [outliers]
