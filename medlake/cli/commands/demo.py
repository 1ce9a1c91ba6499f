"""``medlake demo``: fill the reference workspace offline and show the results."""

from __future__ import annotations

import os

import click

from medlake.cli.common import command, open_catalog, workspace_option


@click.command("demo")
@click.option("--no-repro", is_flag=True, help="Only generate the synthetic data; skip dvc repro.")
@click.option("--no-ui", is_flag=True, envvar="MEDLAKE_NO_UI",
              help="Do not start the UI at the end (also: MEDLAKE_NO_UI=1).")
@click.option("--verbose", "verbose", is_flag=True,
              help="Also print the pipeline's log, every dataset's profile and a sample query.")
@workspace_option
@command
def demo(no_repro, no_ui, verbose, workspace):
    """Generate the synthetic demo dataset, run the pipeline (dvc repro), write the report and
    print, on one screen, what medlake found per dataset and what to run next.

    \b
    Example:
      MEDLAKE_NO_UI=1 medlake demo
    """
    from medlake.demo import runner as stage

    cat = open_catalog(workspace)
    stage.run(cat, repro=not no_repro, verbose=verbose, echo=click.echo)
    if not no_ui and os.environ.get("MEDLAKE_NO_UI", "") in ("", "0"):
        stage.launch_ui(cat)  # prints the URL once the UI answers; Ctrl+C stops it


COMMANDS = [demo]
