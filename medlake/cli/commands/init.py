"""``medlake init``: create (or complete) a workspace."""

from __future__ import annotations

from pathlib import Path

import click

from medlake.cli.common import command


@click.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=".")
@click.option("--remote", help="DVC remote URL or folder (default: a folder beside the workspace).")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint of an s3:// remote "
              "(credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, never the config).")
@command
def init(directory, remote, endpoint_url):
    """Create a medlake workspace in DIRECTORY: git + DVC, a DVC remote, params.yaml (every
    stage's defaults), the generated dvc.yaml, findings.yaml, data/, lake/ and recipes/.
    Running it again on an existing workspace only adds what is missing.

    \b
    Example:
      medlake init my-audit --remote /srv/dvc/my-audit
    """
    from medlake.catalog import Workspace
    from medlake.catalog.storage import refuse_credentials
    from medlake.pipelines import workspace_pipeline as wp
    from medlake.pipelines.registry import default_params_yaml

    if endpoint_url and not (remote or "").startswith("s3://"):
        raise click.UsageError("--endpoint-url needs --remote s3://bucket/path")
    if endpoint_url:
        refuse_credentials(endpoint_url, "--endpoint-url")
    ws = Workspace.init(directory, remote=remote, params_text=default_params_yaml())
    wp.refresh(ws)
    if endpoint_url:
        from medlake.catalog.storage import configure_remote_endpoint

        name = configure_remote_endpoint(ws.root, endpoint_url)
        click.echo(f"DVC remote '{name}' uses endpoint {endpoint_url}")
    click.echo(f"workspace ready at {directory}")
    click.echo("next: medlake ingest --list   (formats you can ingest)")
    click.echo("      medlake ingest FORMAT FILE; add recipes/NAME.yaml; dvc repro; medlake publish NAME")


COMMANDS = [init]
