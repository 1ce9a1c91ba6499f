"""``medlake sql``: read-only SQL over every table."""

from __future__ import annotations

import click

from medlake.catalog.sql import DEFAULT_MEMORY_LIMIT, DEFAULT_ROW_CAP, DEFAULT_TIMEOUT_S
from medlake.cli.common import command, open_catalog, workspace_option


@click.command("sql")
@click.argument("query", required=False)
@click.option("--show-view", "show_view", default=None, metavar="NAME",
              help="Print the SQL of a derived view (labels_dense, discrepancies, ...) and exit.")
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
def sql(query, show_view, fmt, max_rows, row_cap, timeout_s, memory_limit, workspace):
    """Run one read-only SQL QUERY (DuckDB dialect) over the lake's tables.

    Tables: datasets, images, sources, annotations, coverage, splits, findings, quarantine,
    versions and those later stages write. The query runs in a sandbox: SELECT-like
    statements only, no file access (reading or writing), and limits on time, memory and
    rows; a result cut at --limit says so on stderr.

    \b
    Example:
      medlake sql "SELECT dataset_id, count(*) FROM images GROUP BY 1" --format csv
      medlake sql --show-view labels_dense
    """
    from medlake.catalog import VIEWS, render
    from medlake.catalog.sql import row_cap as cap_of

    if show_view:
        if show_view not in VIEWS:
            raise click.UsageError(f"no view '{show_view}'; views: {', '.join(sorted(VIEWS))}")
        click.echo(f"CREATE VIEW {show_view} AS\n" + _dedent(VIEWS[show_view]))
        return
    if not query:
        raise click.UsageError("Give a QUERY (or --show-view NAME)")
    at = open_catalog(workspace).sql(query, limit=row_cap, timeout_s=timeout_s,
                                     memory_limit=memory_limit)
    click.echo(render(at, fmt, max_rows=max_rows).rstrip("\n"))
    cap = cap_of(at)
    if cap is not None:
        click.echo(f"note: result capped at {cap:,} rows (the query returns more); raise the "
                   "cap with --limit N or aggregate in SQL", err=True)


def _dedent(text: str) -> str:
    import textwrap

    return textwrap.dedent(text).strip() + ";"


COMMANDS = [sql]
