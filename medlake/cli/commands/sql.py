"""``medlake sql``: read-only SQL over every table."""

from __future__ import annotations

import click

from medlake.catalog.sql import DEFAULT_MEMORY_LIMIT, DEFAULT_ROW_CAP, DEFAULT_TIMEOUT_S
from medlake.cli.common import command, open_catalog, workspace_option


@click.command("sql")
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True, help="Output format.")
@click.option("--max-rows", type=int, default=50, show_default=True,
              help="Rows shown in table format (csv and json print all).")
@click.option("--limit", "row_cap", type=click.IntRange(min=0), default=DEFAULT_ROW_CAP,
              show_default=True, help="Most rows the query returns (the engine stops there).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True),
              default=DEFAULT_TIMEOUT_S, show_default=True,
              help="Seconds before the query is stopped.")
@click.option("--memory-limit", default=DEFAULT_MEMORY_LIMIT, show_default=True,
              help="Memory the query may use (nothing spills to disk), e.g. 8GB.")
@workspace_option
@command
def sql(query, fmt, max_rows, row_cap, timeout_s, memory_limit, workspace):
    """Run one read-only SQL QUERY (DuckDB dialect) over the lake's tables.

    Tables: datasets, images, sources, annotations, coverage, splits, findings, quarantine,
    versions and those later stages write. The query runs in a sandbox: SELECT-like
    statements only, no file access (reading or writing), and limits on time, memory and
    rows; a result cut at --limit says so on stderr.
    """
    from medlake.catalog import render
    from medlake.catalog.sql import row_cap as cap_of

    at = open_catalog(workspace).sql(query, limit=row_cap, timeout_s=timeout_s,
                                     memory_limit=memory_limit)
    click.echo(render(at, fmt, max_rows=max_rows).rstrip("\n"))
    cap = cap_of(at)
    if cap is not None:
        click.echo(f"note: result capped at {cap:,} rows (the query returns more); raise the "
                   "cap with --limit N or aggregate in SQL", err=True)


COMMANDS = [sql]
