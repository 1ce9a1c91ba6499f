"""``medlake attach-images``: give an ingested (metadata-only) dataset its image files."""

from __future__ import annotations

from pathlib import Path

import click

from medlake.cli.common import command, open_catalog, workspace_option


@click.command("attach-images")
@click.argument("dataset")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--strict", is_flag=True,
              help="Stop (writing nothing) at the first file that would be quarantined.")
@click.option("--dry-run", is_flag=True, help="Match and read the files, report, write nothing.")
@workspace_option
@command
def attach_images(dataset, folder, strict, dry_run, workspace):
    """Attach the image files under FOLDER to the ingested DATASET.

    Files are matched to image ids recursively (by relative path or file name, with or
    without the extension) and read for size, mode and sha256. Files that match no id, or
    cannot be read, go to the quarantine table (stage attach-images); ids without a file are
    counted. The dataset's images_root becomes FOLDER.

    \b
    Example:
      medlake attach-images ham10000 data/HAM10000_images --dry-run
    """
    from medlake.pipelines import attach_images as stage

    res = stage.run(open_catalog(workspace), dataset, folder, strict=strict, dry_run=dry_run)
    click.echo(res.summary())


COMMANDS = [attach_images]
