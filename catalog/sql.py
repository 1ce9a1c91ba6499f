"""SQL over the lake with DuckDB: one view per table, plus derived views.

User queries (:func:`run_query`: ``Catalog.sql``, ``medlake sql``, the UI's SQL page) run in
a sandbox: a fresh in-memory DuckDB connection whose table views read Arrow datasets over the
table files pinned in memory (no file access needed), after which file access is disabled,
the configuration locked, memory limited (no spilling) and settings hold no machine paths.
Only one SELECT-like statement (or EXPLAIN of one) is accepted, every query has a time
limit (the connection is interrupted) and a row cap (at most cap + 1 rows are fetched from a
streaming result; a capped result says so in its schema metadata, see :func:`row_cap`).

A table file that is not valid Parquet makes only the queries that read its table fail, with
one line naming the file (:class:`~medlake.catalog.tables.BrokenFileError`).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import duckdb
import pyarrow as pa

from medlake.catalog.errors import SQLError
from medlake.catalog.schema import TABLES
from medlake.catalog.tables import (
    READ_ATTEMPTS,
    BrokenFileError,
    TableStore,
    file_state,
    find_broken,
    first_line,
    pin_files,
    pinned_dataset,
    read_stable,
    scan_sql,
    sql_mistake,
)

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
        -- an anti-join (a correlated NOT EXISTS took 108 s on the demo's PadChest, this ~1 s)
        ANTI JOIN annotations a
               ON a.image_id = c.image_id AND a.source_id = c.source_id AND a.finding = f.finding
        WHERE s.negatives = 'implicit'
    """,
    # one row per image and shared finding where raters (source or source/annotator) give
    # different usable values; implicit-negative sources count as their code_map "(absent)"
    # value (default negative) on images they cover; excluded values (unknown, invalid,
    # uncertain: value and category null) are left out. Label policies: the ones the
    # agreement stage last applied (agreement.policy, JSON {"sources": {source: {meaning or
    # graded value: exclude|negative|positive|category}}}) recode a rater's answers here too
    # (category: the meaning becomes the label); without an agreement table, none apply
    "discrepancies": """
        WITH pol AS (
            SELECT DISTINCT g.finding, e.key AS source_id, m.key AS code,
                   TRY_CAST(m.key AS DOUBLE) AS v, m.value ->> '$' AS action
            FROM (SELECT x.finding, to_json(x) ->> 'policy' AS policy
                  FROM (SELECT * FROM agreement WHERE subgroup = '') x) g,
                 json_each(g.policy, '$.sources') e, json_each(e.value) m
            WHERE g.policy IS NOT NULL
        ), polv AS (SELECT * FROM pol WHERE v IS NOT NULL
        ), polm AS (SELECT * FROM pol WHERE v IS NULL
        ), raw AS (
            SELECT a.image_id, f.shared_finding AS finding, a.source_id,
                   a.source_id || CASE WHEN a.annotator = '' THEN '' ELSE '/' || a.annotator END
                       AS rater,
                   coalesce(CAST(a.value AS VARCHAR), a.category) AS label, a.value, a.meaning
            FROM annotations a JOIN findings f USING (source_id, finding)
        ), lab AS (
            SELECT r.image_id, r.finding, r.source_id, r.rater,
                   CASE coalesce(pv.action, pm.action)
                       WHEN 'exclude' THEN NULL WHEN 'negative' THEN '0.0'
                       WHEN 'positive' THEN '1.0' WHEN 'category' THEN coalesce(r.meaning, r.label)
                       ELSE r.label END AS label
            FROM raw r
            LEFT JOIN polv pv ON pv.source_id = r.source_id AND pv.finding = r.finding
                             AND pv.v = r.value
            LEFT JOIN polm pm ON pm.source_id = r.source_id AND pm.finding = r.finding
                             AND pm.code = r.meaning
        ), implicit_neg AS (
            SELECT k.image_id, k.finding, s.source_id, s.source_id AS rater,
                   CASE p.action
                       WHEN 'exclude' THEN NULL WHEN 'negative' THEN '0.0'
                       WHEN 'positive' THEN '1.0' WHEN 'category' THEN p.code
                       ELSE CAST(coalesce(
                           TRY_CAST(json_extract_string(s.code_map, '$."(absent)".value') AS DOUBLE),
                           CASE WHEN json_extract(s.code_map, '$."(absent)"') IS NULL THEN 0.0 END)
                           AS VARCHAR) END AS label
            FROM (SELECT DISTINCT image_id, finding FROM lab WHERE label IS NOT NULL) k
            JOIN coverage c ON c.image_id = k.image_id
            JOIN sources s ON s.source_id = c.source_id AND s.negatives = 'implicit'
            JOIN findings f ON f.source_id = s.source_id AND f.shared_finding = k.finding
            LEFT JOIN polm p ON p.source_id = s.source_id AND p.finding = k.finding
                AND p.code = coalesce(json_extract_string(s.code_map, '$."(absent)".meaning'),
                                      'not_mentioned')
            ANTI JOIN raw l ON l.image_id = k.image_id AND l.finding = k.finding
                            AND l.source_id = s.source_id
        ), allrows AS (
            SELECT image_id, finding, source_id, rater, label FROM lab WHERE label IS NOT NULL
            UNION ALL
            SELECT image_id, finding, source_id, rater, label FROM implicit_neg
            WHERE label IS NOT NULL
        )
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

# --- the sandbox for user SQL ---------------------------------------------------------------
DEFAULT_TIMEOUT_S = 60.0
"""Seconds a user query may run (``Catalog.sql(timeout_s=...)``, ``medlake sql --timeout``)."""
DEFAULT_MEMORY_LIMIT = "4GB"
"""DuckDB memory a user query may use (``memory_limit=...``, ``medlake sql --memory-limit``)."""
DEFAULT_ROW_CAP = 1_000_000
"""Rows a user query returns at most (``limit=...``, ``medlake sql --limit``)."""
ROW_CAP_KEY = b"medlake.row_cap"
"""Schema-metadata key set on a capped result (value: the cap); see :func:`row_cap`."""

# set before the lockdown: no spill folder (in-memory DuckDB would create ``.tmp/`` in the
# current folder), no settings holding machine paths, no Python-variable lookups, no
# extension loading
_SANDBOX_SETTINGS = (
    "SET python_enable_replacements = false",
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false",
    "SET enable_progress_bar = false",
    "SET temp_directory = ''",
    "SET secret_directory = ''",
    "SET extension_directory = ''",
    "SET home_directory = ''",
)
_MEMORY = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)
_EXPLAIN = re.compile(
    r"^\s*EXPLAIN\s+(?:ANALY[SZ]E\s+)?(?:\((?:[^()]|\([^()]*\))*\)\s*)?", re.IGNORECASE
)
_STREAM = re.compile(r"registered as '(\w+)'")
_BROKEN = re.compile(
    r"(\S+ is not a valid Parquet file \(.*\); delete it or re-run the stage that writes .*)"
)
_ABS_PATH = re.compile(r"""(["'])(?:/|[A-Za-z]:\\)[^"']*\1""")


@dataclass
class _Lake:
    """A DuckDB connection with a view per table, and what it needs to explain errors."""

    con: duckdb.DuckDBPyConnection
    tables_dir: Path
    broken: dict[str, BrokenFileError] = field(default_factory=dict)
    pinned: dict[str, list[tuple[Path, pa.Buffer]]] = field(default_factory=dict)
    files: dict[str, list[Path]] = field(default_factory=dict)

    def explain(self, e: BaseException, query: str | None = None) -> BrokenFileError | None:
        """The broken table file behind error ``e`` (raised by ``query``), if one is."""
        msg = str(e)
        for err in self.broken.values():
            if str(err) in msg:
                return err
        m = _STREAM.search(msg)
        if m and m[1] in self.pinned:
            return find_broken(self.tables_dir, self.pinned[m[1]], deep=True)
        for files in self.files.values():
            for p in files:
                if str(p) in msg:
                    return find_broken(self.tables_dir, [p], data=True) or BrokenFileError(
                        self.tables_dir, p, f"unreadable: {first_line(msg)}"
                    )
        if query is None or sql_mistake(e):
            return None
        for name in _tables_of(query):  # no file named: check the tables the query reads
            broken = find_broken(self.tables_dir, self.files.get(name, []), data=True)
            if broken is not None:
                return broken
        return None


def _tables_of(query: str) -> list[str]:
    """The tables ``query`` reads, derived views expanded (all tables when unsure)."""
    con = duckdb.connect(":memory:")  # parses only
    try:
        todo = set(con.get_table_names(query))
        seen: set[str] = set()
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                if name in VIEWS:
                    todo |= set(con.get_table_names(VIEWS[name]))
    except duckdb.Error:
        return list(TABLES)
    finally:
        con.close()
    return [t for t in TABLES if t in seen]


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


def _null_columns(schema: pa.Schema) -> str:
    return ", ".join(f'CAST(NULL AS {_duck_type(f.type)}) AS "{f.name}"' for f in schema)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _lake_files(store: TableStore) -> list[Path]:
    return [p for name in TABLES for p in store.files(name)]


def _open(tables_dir: Path, *, pinned: bool) -> _Lake:
    """A connection with one view per table (and the derived views), nothing locked yet.

    ``pinned`` views read Arrow datasets over files held in memory or mapped (no file-system
    access when queried, immune to concurrent renames); otherwise views scan the Parquet
    files with DuckDB's reader. A table with a broken file gets a view that raises the
    :class:`BrokenFileError` message when queried, so only queries touching it fail.
    """
    store = TableStore(tables_dir)
    lake = _Lake(duckdb.connect(":memory:"), Path(tables_dir))
    con = lake.con
    try:
        for name, ts in TABLES.items():
            try:
                if pinned:
                    held = pin_files(store, name)
                    if held:
                        lake.pinned[name] = held
                        con.register(name, pinned_dataset(store.dir, name, held))
                        continue
                else:
                    files = _native_view(con, store, name)
                    if files:
                        lake.files[name] = files
                        continue
            except BrokenFileError as err:
                lake.broken[name] = err
                con.execute(f'CREATE VIEW "{name}" AS SELECT {_null_columns(ts.schema)} '
                            f"FROM (SELECT 1) WHERE error({_quote(str(err))})")
                continue
            con.execute(f'CREATE VIEW "{name}" AS SELECT {_null_columns(ts.schema)} WHERE false')
        for name, body in VIEWS.items():
            try:
                con.execute(f'CREATE VIEW "{name}" AS {body}')
            except duckdb.Error as e:  # a view over a table that lacks a column yet
                log.debug("view %s not created: %s", name, e)
    except BaseException:
        con.close()
        raise
    return lake


def _native_view(con: duckdb.DuckDBPyConnection, store: TableStore, name: str) -> list[Path]:
    """``CREATE VIEW name AS read_parquet(files)``; the files (empty: no view made)."""
    for attempt in range(READ_ATTEMPTS):
        files = store.files(name)
        if not files:
            return []
        broken = find_broken(store.dir, files, deep=False)
        if broken is not None:
            raise broken
        state = file_state(files)
        try:  # binding reads every file's schema
            con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM {scan_sql(files)}')
            return files
        except duckdb.Error:
            if attempt < READ_ATTEMPTS - 1 and file_state(store.files(name)) != state:
                continue  # a stage replaced a file meanwhile
            broken = find_broken(store.dir, files, deep=True)
            if broken is not None:
                raise broken from None
            raise
    return []  # pragma: no cover - the loop returns or raises


def _check_memory_limit(memory_limit: str) -> str:
    if not _MEMORY.match(memory_limit):
        raise SQLError(
            f"memory limit '{memory_limit}' is not a size; give a number and a unit, "
            "e.g. '4GB' or '512MB'"
        )
    return memory_limit.strip()


def _lock(con: duckdb.DuckDBPyConnection, memory_limit: str) -> None:
    """Limit memory, drop every path-holding setting, then disable file access and lock."""
    memory_limit = _check_memory_limit(memory_limit)
    for stmt in _SANDBOX_SETTINGS:
        con.execute(stmt)
    con.execute(f"SET memory_limit = {_quote(memory_limit)}")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def connect(
    tables_dir: Path, *, sandbox: bool = True, memory_limit: str = DEFAULT_MEMORY_LIMIT,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with a view for every table and derived view.

    Parameters
    ----------
    tables_dir
        The lake's ``lake/tables`` folder.
    sandbox
        True (the default): the views read Arrow datasets over the table files pinned in
        memory (so they need no file access), then memory is limited to ``memory_limit``,
        spilling is off, settings hold no paths, file access (read and write) is disabled
        and the configuration is locked: the connection is safe for user-written SQL.
        False: a trusted connection whose views scan the Parquet files (library code).
    memory_limit
        DuckDB memory limit of a sandboxed connection, e.g. ``"4GB"``.
    """
    lake = _open(tables_dir, pinned=sandbox)
    if sandbox:
        try:
            _lock(lake.con, memory_limit)
        except BaseException:
            lake.con.close()
            raise
    return lake.con


def broken_file_message(e: BaseException) -> str | None:
    """The one-line broken-file message inside a DuckDB error from a table view, or None."""
    m = _BROKEN.search(str(e))
    return m[1] if m else None


def check_read_only(query: str) -> str:
    """The one read-only statement of ``query``; :class:`SQLError` for anything else.

    Accepted: SELECT-like statements (``SELECT``, ``WITH``, ``FROM``, ``VALUES``,
    ``DESCRIBE``, ``SHOW``, ``SUMMARIZE``) and ``EXPLAIN [ANALYZE]`` of one of them. This is
    a first line only: the sandbox itself (see :func:`connect`) cannot touch files.
    """
    try:
        stmts = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise SQLError(f"SQL does not parse: {e}") from e
    if not stmts:
        raise SQLError("empty query: give one SELECT statement")
    for st in stmts:
        _check_statement(st)
    if len(stmts) > 1:
        raise SQLError(
            f"give one statement at a time (got {len(stmts)}); use WITH or subqueries to "
            "combine steps"
        )
    return stmts[0].query


def _kind(st: Any) -> str:
    return str(st.type).split(".")[-1]


def _check_statement(st: Any) -> None:
    kind = _kind(st)
    if kind == "SELECT":
        return
    if kind == "EXPLAIN":
        inner_text = _EXPLAIN.sub("", st.query, count=1)
        try:
            inner = duckdb.extract_statements(inner_text)
        except duckdb.Error:
            inner = []
        if len(inner) == 1 and _kind(inner[0]) == "SELECT":
            return
        what = _kind(inner[0]) if len(inner) == 1 else "non-SELECT"
        raise SQLError(
            f"only read queries are allowed here (got EXPLAIN of a {what} statement); "
            "EXPLAIN [ANALYZE] works on SELECT queries only"
        )
    raise SQLError(
        f"only read queries are allowed here (got a {kind} statement); "
        "medlake sql cannot write or change the lake — use the medlake commands for that"
    )


def _clean(msg: str, tables_dir: Path) -> str:
    """``msg`` without machine paths: lake files relative to the workspace, others masked."""
    for base in {str(Path(tables_dir).resolve().parent.parent),
                 str(Path(tables_dir).parent.parent)}:
        if base not in ("", "."):
            msg = msg.replace(base + os.sep, "")
    return _ABS_PATH.sub(r"\1<path outside the lake>\1", msg)


def row_cap(at: pa.Table) -> int | None:
    """The row cap that cut result ``at`` short (it had more rows), or None when complete."""
    meta = at.schema.metadata or {}
    raw = meta.get(ROW_CAP_KEY)
    return int(raw) if raw is not None else None


def run_query(
    tables_dir: Path, query: str, *, limit: int | None = None,
    timeout_s: float | None = None, memory_limit: str | None = None,
) -> pa.Table:
    """Run a user's read-only query over the lake in the sandbox; an Arrow table.

    Parameters
    ----------
    tables_dir
        The lake's ``lake/tables`` folder.
    query
        One SELECT-like statement (see :func:`check_read_only`).
    limit
        Most rows returned (default :data:`DEFAULT_ROW_CAP`). At most ``limit + 1`` rows are
        fetched from the streaming result, so the engine stops early; when there were more,
        the schema metadata says so (:func:`row_cap`).
    timeout_s
        Seconds before the query is interrupted (default :data:`DEFAULT_TIMEOUT_S`).
    memory_limit
        DuckDB memory limit (default :data:`DEFAULT_MEMORY_LIMIT`); nothing spills to disk.

    Raises
    ------
    SQLError
        When the query writes, touches files, runs past a limit, meets a broken table file
        or fails.
    """
    stmt = check_read_only(query)
    cap = DEFAULT_ROW_CAP if limit is None else int(limit)
    if cap < 0:
        raise SQLError(f"row limit {cap} is negative; give 0 or more rows")
    timeout = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
    if timeout <= 0:
        raise SQLError(f"time limit {timeout_s} s is not positive; give seconds > 0")
    memory_limit = _check_memory_limit(memory_limit or DEFAULT_MEMORY_LIMIT)
    lake = _open(tables_dir, pinned=True)
    con = lake.con
    stopped = threading.Event()

    def stop() -> None:
        stopped.set()
        try:
            con.interrupt()
        except duckdb.Error:  # the query ended (and the connection closed) meanwhile
            pass

    timer = threading.Timer(timeout, stop)
    timer.daemon = True
    try:
        _lock(con, memory_limit)
        timer.start()
        reader = con.sql(stmt).to_arrow_reader(max(1, min(cap + 1, 1 << 16)))
        batches: list[pa.RecordBatch] = []
        n = 0
        for batch in reader:
            batches.append(batch)
            n += batch.num_rows
            if n > cap:
                break
        at = pa.Table.from_batches(batches, schema=reader.schema)
    except (duckdb.Error, pa.ArrowException, OSError) as e:  # OSError: from the reader
        raise _user_error(e, lake, timeout, memory_limit, stopped.is_set()) from None
    finally:
        timer.cancel()
        con.close()
    if at.num_rows > cap:
        at = at.slice(0, cap)
        meta = dict(at.schema.metadata or {})
        meta[ROW_CAP_KEY] = str(cap).encode()
        at = at.replace_schema_metadata(meta)
    return at


def _user_error(
    e: BaseException, lake: _Lake, timeout: float, memory_limit: str | None, timed_out: bool,
) -> SQLError:
    if timed_out or isinstance(e, duckdb.InterruptException):
        return SQLError(
            f"query stopped: it ran longer than the time limit of {timeout:g} s; raise it with "
            "`medlake sql --timeout SECONDS` or Catalog.sql(..., timeout_s=SECONDS)"
        )
    if isinstance(e, duckdb.OutOfMemoryException):
        return SQLError(
            f"query stopped: it needs more memory than the limit of "
            f"{memory_limit or DEFAULT_MEMORY_LIMIT} (nothing spills to disk); filter or "
            "aggregate more, or raise the limit with `medlake sql --memory-limit 8GB` or "
            "Catalog.sql(..., memory_limit='8GB')"
        )
    broken = lake.explain(e)
    if broken is not None:
        return broken
    msg = _clean(str(e), lake.tables_dir)
    if isinstance(e, duckdb.PermissionException):
        return SQLError(
            f"{msg}. medlake sql can only read the lake's tables; reading or writing "
            "files is disabled"
        )
    return SQLError(f"query failed: {msg}")


def trusted_query(
    tables_dir: Path, query: str, params: list[Any] | dict[str, Any] | None = None,
) -> pa.Table:
    """Run trusted SQL (library code) over the table views; an Arrow table.

    The files are listed, read and listed again; when a stage replaced or removed a file
    meanwhile the query runs again (the last time over pinned files), so a reader sees one
    state of each file, never an error from a concurrent write.

    Raises
    ------
    BrokenFileError
        When a table the query reads has a broken file.
    duckdb.Error
        When the SQL itself fails.
    """
    store = TableStore(tables_dir)
    lakes: list[_Lake] = []

    def read(attempt: int) -> pa.Table:
        lake = _open(tables_dir, pinned=attempt == READ_ATTEMPTS - 1)
        lakes.append(lake)
        try:
            return lake.con.sql(query, params=params or None).to_arrow_table()
        finally:
            lake.con.close()

    def on_error(e: BaseException) -> None:
        broken = lakes[-1].explain(e, query) if lakes else None
        if broken is not None:
            raise broken from None

    return read_stable(lambda: _lake_files(store), read, on_error=on_error)


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
