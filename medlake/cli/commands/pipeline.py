"""``medlake pipeline`` and ``medlake publish``: the workspace as a DVC data registry."""

from __future__ import annotations

import click

from medlake.cli.common import command, open_catalog, workspace_option


@click.command("pipeline")
@click.option("--check", is_flag=True, help="Only say whether dvc.yaml is current (exit 1 if not).")
@workspace_option
@command
def pipeline(check, workspace):
    """Regenerate dvc.yaml from the stage declarations, params.yaml and recipes.

    Stages you wrote yourself (without 'meta: {medlake: generated}') are kept as they are.

    \b
    Example:
      medlake pipeline && dvc repro
    """
    from medlake.pipelines import workspace_pipeline as wp
    from medlake.pipelines.registry import validate

    cat = open_catalog(workspace)
    validate(cat.ws)
    if check:
        path = cat.ws.root / "dvc.yaml"
        current = path.exists() and path.read_text() == wp.render(cat.ws)
        click.echo("dvc.yaml is current" if current else "dvc.yaml differs from the generated "
                   "pipeline; run 'medlake pipeline'")
        raise SystemExit(0 if current else 1)
    changed = wp.refresh(cat.ws)
    click.echo("dvc.yaml regenerated" if changed else "dvc.yaml already current")


@click.command("publish")
@click.argument("name")
@click.option("--no-push", is_flag=True, help="Commit and tag, but do not 'dvc push'.")
@click.option("--no-repro", is_flag=True, help="Do not run 'dvc repro materialize@NAME' first.")
@workspace_option
@command
def publish(name, no_push, no_repro, workspace):
    """Publish version NAME: reproduce it, check privacy, commit dvc.lock, push, tag NAME@vN.

    Refuses a version whose images carry identifying DICOM tags or lack the
    de-identification markers, unless recipes/NAME.yaml says why it may
    (privacy: {acknowledged: "..."}), which the datasheet records.

    \b
    Example:
      medlake publish ham10000-corrected
      # a consumer, without medlake:
      dvc import REPO_URL lake/versions/ham10000-corrected --rev ham10000-corrected@v1
    """
    from medlake.pipelines import publish as stage

    cat = open_catalog(workspace)
    res = stage.run(cat, name, push=not no_push, repro=not no_repro, echo=click.echo)
    click.echo(res.summary())


COMMANDS = [pipeline, publish]
