"""``medlake init``: create (or complete) a workspace."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import command


@click.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=".")
@click.option("--remote", help="DVC remote URL or folder (default: a folder beside the workspace).")
@command
def init(directory, remote):
    """Create a medlake workspace in DIRECTORY: git + DVC, a local DVC remote, dvc.yaml,
    params.yaml, findings.yaml, data/, lake/ and recipes/. Running it again on an existing
    workspace only adds what is missing."""
    from catalog import Workspace

    ws = Workspace.init(directory, remote=remote)
    click.echo(f"workspace ready at {ws.root}")
    click.echo("next: medlake ingest --list   (formats you can ingest)")


COMMANDS = [init]
