"""``medlake profile``: what a dataset holds."""

from __future__ import annotations

import click

from medlake.cli.common import command, open_catalog, workspace_option


@click.command("profile")
@click.argument("dataset", required=False)
@click.option("--max-findings", type=int, default=25, show_default=True,
              help="Most prevalent findings listed per source.")
@workspace_option
@command
def profile(dataset, max_findings, workspace):
    """Profile DATASET: images, patients/groups, studies, images per group, finding
    prevalence per source, source coverage and overlap, splits, quarantine.
    Without DATASET, profile every ingested dataset.

    \b
    Example:
      medlake profile padchest --max-findings 10
    """
    from medlake.catalog.profile import profile as run

    cat = open_catalog(workspace)
    ids = [dataset] if dataset else cat.dataset_ids()
    if not ids:
        raise click.ClickException("no dataset ingested yet; run 'medlake ingest --list'")
    for i, ds in enumerate(ids):
        if i:
            click.echo("\n" + "=" * 80 + "\n")
        click.echo(run(cat, ds, max_findings=max_findings).render())


COMMANDS = [profile]
