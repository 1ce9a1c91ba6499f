"""``medlake agreement``: agreement statistics, derived consensus sources and plots."""

from __future__ import annotations

from pathlib import Path

import click

from medlake.cli.common import command, open_catalog, workspace_option


@click.command("agreement")
@click.argument("dataset", required=False)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG: kappa heatmap per finding (n shared in each cell) and a "
                   "forest plot of PPV with Wilson intervals.")
@click.option("--no-subgroups", is_flag=True,
              help="Skip the per-subgroup rows (params.yaml agreement.subgroups).")
@click.option("--show", "show", type=int, default=20, show_default=True,
              help="Print this many overall rows of the result (0: none).")
@workspace_option
@command
def agreement(dataset, plot, no_subgroups, show, workspace):
    """Compare label sources and annotators of DATASET (default: every dataset).

    Writes the agreement table (kappa with 95% CI, weighted kappas, off-by-one, Fleiss'
    kappa, Krippendorff's alpha, PPV/NPV/sensitivity/specificity against the reference set
    in params.yaml, prevalence where sources share no image) and the derived consensus
    sources listed under params.yaml agreement.consensus. Query it with
    'medlake sql "SELECT * FROM agreement"' and the discrepancies view.
    """
    import polars as pl

    from medlake.catalog import render
    from medlake.pipelines import agreement as stage

    cat = open_catalog(workspace)
    extra = {"subgroups": [], "annotation_subgroups": []} if no_subgroups else {}
    res = stage.run(cat, dataset, plot=plot, echo=click.echo, **extra)
    if show:
        df = cat.read("agreement").filter(pl.col("subgroup") == "")
        if dataset:
            df = df.filter(pl.col("dataset_id") == dataset)
        df = df.filter(pl.col("kind") != "prevalence").sort("n_shared", descending=True)
        cols = ["finding", "source_a", "annotator_a", "source_b", "annotator_b", "n_shared",
                "kappa", "kappa_lo", "kappa_hi", "ppv", "pos_confirmed", "fleiss", "alpha"]
        click.echo(render(df.select(cols).head(show).to_arrow(), "table", max_rows=show))
    click.echo(res.summary())


COMMANDS = [agreement]
