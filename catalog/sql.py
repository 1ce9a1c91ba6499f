"""SQL over the lake with DuckDB: one view per table, plus derived views.

User queries run in a sandbox: only read statements (SELECT, WITH, EXPLAIN, DESCRIBE, SHOW,
SUMMARIZE) are accepted, and DuckDB's file-system access is limited to the lake folder and
then locked, so ``read_csv('/etc/passwd')``, ``COPY ... TO`` and ``ATTACH`` fail.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import duckdb
import pyarrow as pa

from medlake.catalog.errors import SQLError
from medlake.catalog.schema import TABLES
from medlake.catalog.tables import TableStore, scan_sql

log = logging.getLogger(__name__)

# Views over tables. Later stages add theirs here (name -> SELECT over table views).
VIEWS: dict[str, str] = {
    # annotations with the rows that implicit-negative sources leave out made explicit:
    # every covered image x every finding of the source's vocabulary; the value and meaning
    # of an absent row come from the source's code_map entry "(absent)" (default 0 / negative)
    "labels_dense": """
        SELECT image_id, source_id, annotator, finding, value, category, raw_value, meaning,
               is_invalid, false AS implicit
        FROM annotations
        UNION ALL
        SELECT c.image_id, c.source_id, '' AS annotator, f.finding,
               coalesce(TRY_CAST(json_extract_string(s.code_map, '$."(absent)".value') AS DOUBLE),
                        CASE WHEN json_extract(s.code_map, '$."(absent)"') IS NULL THEN 0.0 END) AS value,
               NULL AS category, NULL AS raw_value,
               coalesce(json_extract_string(s.code_map, '$."(absent)".meaning'), 'negative') AS meaning,
               false AS is_invalid, true AS implicit
        FROM coverage c JOIN sources s USING (source_id) JOIN findings f USING (source_id)
        WHERE s.negatives = 'implicit'
          AND NOT EXISTS (SELECT 1 FROM annotations a WHERE a.image_id = c.image_id
                          AND a.source_id = c.source_id AND a.finding = f.finding)
    """,
    # one row per image and shared finding where raters (source or source/annotator) give
    # different usable values; implicit-negative sources count as negative on images they
    # cover; excluded values (unknown, invalid, uncertain: value and category null) are left out
    "discrepancies": """
        WITH lab AS (
            SELECT a.image_id, f.shared_finding AS finding, a.source_id,
                   a.source_id || CASE WHEN a.annotator = '' THEN '' ELSE '/' || a.annotator END
                       AS rater,
                   coalesce(CAST(a.value AS VARCHAR), a.category) AS label
            FROM annotations a JOIN findings f USING (source_id, finding)
            WHERE a.value IS NOT NULL OR a.category IS NOT NULL
        ), implicit_neg AS (
            SELECT k.image_id, k.finding, s.source_id, s.source_id AS rater, '0.0' AS label
            FROM (SELECT DISTINCT image_id, finding FROM lab) k
            JOIN coverage c ON c.image_id = k.image_id
            JOIN sources s ON s.source_id = c.source_id AND s.negatives = 'implicit'
            JOIN findings f ON f.source_id = s.source_id AND f.shared_finding = k.finding
            ANTI JOIN lab l ON l.image_id = k.image_id AND l.finding = k.finding
                            AND l.source_id = s.source_id
        ), allrows AS (SELECT * FROM lab UNION ALL SELECT * FROM implicit_neg)
        SELECT split_part(image_id, ':', 1) AS dataset_id, image_id, finding,
               count(DISTINCT source_id) AS n_sources, count(*) AS n_raters,
               string_agg(rater || '=' || label, '; ' ORDER BY rater) AS labels,
               map(list(rater ORDER BY rater), list(label ORDER BY rater)) AS label_map
        FROM allrows GROUP BY image_id, finding
        HAVING count(DISTINCT rater) > 1 AND count(DISTINCT label) > 1
    """,
    "quarantine_summary": """
        SELECT stage, dataset_id, file, reason, count(*) AS n_rows
        FROM quarantine GROUP BY ALL ORDER BY stage, dataset_id, file, n_rows DESC
    """,
}

_READ_ONLY = {"SELECT", "EXPLAIN"}


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "VARCHAR"
    if pa.types.is_int32(t):
        return "INTEGER"
    if pa.types.is_int64(t):
        return "BIGINT"
    if pa.types.is_floating(t):
        return "DOUBLE"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ"
    if pa.types.is_list(t) or pa.types.is_fixed_size_list(t):
        return f"{_duck_type(t.value_type)}[]"
    return "VARCHAR"


def connect(tables_dir: Path, *, sandbox: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with a view for every table and derived view.

    With ``sandbox`` (the default) file access outside ``tables_dir``'s lake is disabled and
    the configuration is locked, so the connection is safe for user-written SQL.
    """
    store = TableStore(tables_dir)
    con = duckdb.connect(":memory:")
    for name, ts in TABLES.items():
        files = store.files(name)
        if files:
            con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM {scan_sql(files)}')
        else:
            cols = ", ".join(
                f'CAST(NULL AS {_duck_type(f.type)}) AS "{f.name}"' for f in ts.schema
            )
            con.execute(f'CREATE VIEW "{name}" AS SELECT {cols} WHERE false')
    for name, body in VIEWS.items():
        try:
            con.execute(f'CREATE VIEW "{name}" AS {body}')
        except duckdb.Error as e:  # a view over a table that lacks a column yet
            log.debug("view %s not created: %s", name, e)
    if sandbox:
        lake = Path(tables_dir).resolve().parent
        lake_sql = str(lake).replace("'", "''")
        con.execute(f"SET allowed_directories=['{lake_sql}/']")
        con.execute("SET enable_external_access=false")
        con.execute("SET lock_configuration=true")
    return con


def check_read_only(query: str) -> None:
    """Raise :class:`SQLError` unless every statement in ``query`` only reads."""
    try:
        stmts = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise SQLError(f"SQL does not parse: {e}") from e
    if not stmts:
        raise SQLError("empty query: give one SELECT statement")
    for st in stmts:
        kind = str(st.type).split(".")[-1]
        if kind not in _READ_ONLY:
            raise SQLError(
                f"only read queries are allowed here (got a {kind} statement); "
                "medlake sql cannot write or change the lake — use the medlake commands for that"
            )


def run_query(tables_dir: Path, query: str, *, limit: int | None = None) -> pa.Table:
    """Run a user's read-only query over the lake and return an Arrow table.

    Raises
    ------
    SQLError
        When the query writes, touches files outside the lake, or fails.
    """
    check_read_only(query)
    con = connect(tables_dir, sandbox=True)
    try:
        stmts = duckdb.extract_statements(query)
        for st in stmts[:-1]:
            con.execute(st).fetchall()
        at = con.sql(stmts[-1].query).to_arrow_table()
    except duckdb.PermissionException as e:
        raise SQLError(
            f"{e}. medlake sql can only read the lake's tables (and files inside lake/); "
            "reading or writing other files is disabled"
        ) from e
    except duckdb.Error as e:
        raise SQLError(f"query failed: {e}") from e
    finally:
        con.close()
    if limit is not None:
        at = at.slice(0, limit)
    return at


Format = Literal["table", "csv", "json"]


def render(
    at: pa.Table | Any, fmt: Format = "table", *, max_rows: int = 50,
    more: str = "use --format csv for all",
) -> str:
    """Text for an Arrow table or Polars frame: an aligned table, CSV or JSON lines.

    ``more`` is the hint shown when a table has more than ``max_rows`` rows.
    """
    import polars as pl

    df = at if isinstance(at, pl.DataFrame) else pl.from_arrow(at)
    assert isinstance(df, pl.DataFrame)
    if fmt == "csv":
        return df.write_csv()
    if fmt == "json":
        return df.write_ndjson()
    with pl.Config(
        tbl_rows=max_rows, tbl_cols=-1, fmt_str_lengths=60, tbl_hide_dataframe_shape=True,
        tbl_formatting="ASCII_MARKDOWN", tbl_hide_column_data_types=True, tbl_width_chars=200,
    ):
        out = str(df)
    if df.height > max_rows:
        out += f"\n({df.height:,} rows, {max_rows} shown; {more})"
    return out
