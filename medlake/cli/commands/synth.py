"""``medlake synth``: write the demo's synthetic datasets with their ground truth."""

from __future__ import annotations

from pathlib import Path

import click

from medlake.cli.common import command, open_catalog, workspace_option


@click.command("synth")
@click.argument("out_dir", type=click.Path(path_type=Path), required=False)
@click.option("--captures", "n_captures", type=click.IntRange(min=4), default=300,
              show_default=True, help="Original captures in all (about 1.5 images each).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--modality", "modalities", multiple=True, type=click.Choice(["derm", "cxr"]),
              help="Only these modalities (repeatable; default: both).")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR when it already has files.")
@workspace_option
@command
def synth(out_dir, n_captures, seed, modalities, overwrite, workspace):
    """Write deterministic synthetic dermoscopy and chest-X-ray datasets to OUT_DIR
    (default: data/synthetic in the workspace).

    Each has a manifest CSV, a generic-adapter YAML (medlake ingest generic OUT_DIR/derm.yaml)
    and ground truth: truth_files.csv (which capture each file derives from, and how) and
    truth_pairs.csv (every true duplicate pair). The same arguments give byte-identical files.

    \b
    Example:
      medlake synth data/synthetic --captures 100 --modality derm
    """
    from medlake.demo.synthetic import MODALITIES, generate

    if out_dir is None:  # the workspace's raw-data folder, as the demo uses it
        out_dir = open_catalog(workspace).ws.data_dir / "synthetic"

    summary = generate(out_dir, n_captures=n_captures, seed=seed,
                       modalities=tuple(modalities) or MODALITIES, overwrite=overwrite)
    click.echo(summary.text())
    for m in summary.images:
        click.echo(f"next: medlake ingest generic {out_dir / f'{m}.yaml'}")


COMMANDS = [synth]
