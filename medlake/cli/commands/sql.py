"""``medlake sql``: read-only SQL over every table."""

from __future__ import annotations

import click

from medlake.cli.common import command, open_catalog, workspace_option


@click.command("sql")
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True, help="Output format.")
@click.option("--max-rows", type=int, default=50, show_default=True,
              help="Rows shown in table format (csv and json print all).")
@workspace_option
@command
def sql(query, fmt, max_rows, workspace):
    """Run a read-only SQL QUERY (DuckDB dialect) over the lake's tables.

    Tables: datasets, images, sources, annotations, coverage, splits, findings, quarantine,
    versions and those later stages write. Reading or writing files outside the lake is
    disabled.
    """
    from medlake.catalog import render

    at = open_catalog(workspace).sql(query)
    click.echo(render(at, fmt, max_rows=max_rows).rstrip("\n"))


COMMANDS = [sql]
