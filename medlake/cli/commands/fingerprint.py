"""``medlake fingerprint``: hashes, size, mode and quality flags per image."""

from __future__ import annotations

import click

from medlake.cli.common import command, open_catalog, workspace_option


@click.command("fingerprint")
@click.option("--dataset", "dataset_id", help="Only this dataset (default: every dataset).")
@click.option("--workers", type=int, default=2, show_default=True,
              help="Threads decoding images in parallel.")
@workspace_option
@command
def fingerprint(dataset_id, workers, workspace):
    """Fingerprint every image: sha256, perceptual hashes, size, mode and quality flags.

    Unreadable images go to the quarantine table (stage 'fingerprint') with the decoder's
    error. Thresholds come from params.yaml 'fingerprint:'.
    """
    from medlake.pipelines import fingerprint as stage

    cat = open_catalog(workspace)
    res = stage.run(cat, dataset_id=dataset_id, workers=workers, echo=click.echo)
    click.echo(f"fingerprint: {res['images']:,} images, {res['fingerprinted']:,} fingerprinted, "
               f"{res['quarantined']:,} quarantined")


COMMANDS = [fingerprint]
