"""``medlake ingest``: one format and file, or everything params.yaml lists (``--all``)."""

from __future__ import annotations

from pathlib import Path

import click

from medlake.cli.common import command, open_catalog, workspace_option


@click.command("ingest")
@click.argument("fmt", metavar="FORMAT", required=False)
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option("--dataset", "dataset_id", help="Dataset id to use instead of the format's default.")
@click.option("--strict", is_flag=True, help="Stop at the first bad row instead of quarantining it.")
@click.option("--all", "all_", is_flag=True, help="Ingest every entry under 'ingest:' in params.yaml.")
@click.option("--list", "list_", is_flag=True, help="List the known formats and exit.")
@click.option("--option", "-o", "opts", multiple=True, metavar="KEY=VALUE",
              help="Adapter option, repeatable (e.g. -o mapping=ids.csv).")
@workspace_option
@command
def ingest(fmt, path, dataset_id, strict, all_, list_, opts, workspace):
    """Ingest PATH in FORMAT into the workspace's tables.

    Rows that cannot be ingested go to the quarantine table with a reason (or, with
    --strict, stop the command at the first one). Re-ingesting the same file replaces its
    rows, so the tables come out identical.
    """
    from medlake.pipelines import adapters
    from medlake.pipelines import ingest as stage

    if list_:
        for name, ad in adapters.registry().items():
            link = f" (labels images of '{ad.links_to}')" if ad.links_to else ""
            click.echo(f"{name:22s} {ad.description}{link}")
        return
    if all_ and (fmt or path):
        raise click.UsageError("Use either --all or FORMAT PATH, not both")
    cat = open_catalog(workspace)
    if all_:
        stage.run_all(cat, strict=strict, echo=click.echo)
        return
    if not fmt or not path:
        raise click.UsageError("Give FORMAT and PATH (or --all); 'medlake ingest --list' shows formats")
    options = {}
    for o in opts:
        if "=" not in o:
            raise click.UsageError(f"--option '{o}' must look like KEY=VALUE")
        k, v = o.split("=", 1)
        k = k.strip()
        # a repeated key (e.g. -o label=a:... -o label=b:...) collects its values in a list
        options[k] = [*(options[k] if isinstance(options[k], list) else [options[k]]), v] if k in options else v
    res = stage.run(cat, fmt, path, dataset_id=dataset_id, strict=strict, **options)
    click.echo(res.summary())


COMMANDS = [ingest]
