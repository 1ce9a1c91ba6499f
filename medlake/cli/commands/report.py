"""``medlake report``: the workspace's audit as a self-contained HTML page and Markdown."""

from __future__ import annotations

from pathlib import Path

import click

from medlake.cli.common import command, open_catalog, workspace_option


@click.command("report")
@click.argument("datasets", nargs=-1)
@click.option("--out", "out", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder for report.html, report.md and assets/ (created).")
@click.option("--top", type=click.IntRange(min=1), default=12, show_default=True,
              help="Duplicate clusters and outliers shown as contact sheets per dataset.")
@click.option("--min-shared", type=click.IntRange(min=1), default=20, show_default=True,
              help="Findings enter the kappa heatmap with at least this many shared images.")
@click.option("--min-subgroup", type=click.IntRange(min=1), default=10, show_default=True,
              help="Subgroups enter the hidden-stratification table with at least this many "
                   "shared images.")
@workspace_option
@command
def report(datasets, out, top, min_shared, min_subgroup, workspace):
    """Write an audit report of DATASET ... (default: every ingested dataset) to --out.

    report.html is one self-contained file (charts and thumbnails embedded, no network:
    it opens offline); report.md has the same sections, its images under assets/. Per
    dataset: profile, sources and coverage, label agreement (kappa heatmap, PPV and
    sensitivity, hidden stratification), leakage, duplicate clusters, outliers and quality
    flags, versions with their datasheets, review progress. A table not computed yet is
    named with the command that makes it. The page records the medlake version, the git
    commit and params.yaml.

    \b
    Example:
      medlake report synth-derm synth-cxr --out audit
      (then open audit/report.html in any browser)
    """
    from medlake.pipelines.report import run

    cat = open_catalog(workspace)
    res = run(cat, list(datasets) or None, out=out, top=top, min_shared=min_shared,
              min_subgroup=min_subgroup)
    click.echo(res.summary())


COMMANDS = [report]
