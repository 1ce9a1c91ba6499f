"""SQL: a read-only query box with the same sandbox as ``medlake sql``.

Beside the box: a schema browser (every table of :data:`medlake.catalog.TABLES` with its
description, key, declared columns and types, and its row count; the derived views with
their columns) and example queries over the ``discrepancies`` view and the ``leakage`` and
``agreement`` tables. Results download as CSV or Parquet; a result cut at the row cap says
so (``medlake.catalog.sql.row_cap``).
"""

from __future__ import annotations

import io

import duckdb
import polars as pl
import pyarrow as pa
import streamlit as st

from medlake.catalog import TABLES, VIEWS, Catalog, CatalogError, spec
from medlake.catalog.sql import row_cap
from medlake.ui import cache, data

TITLE = "SQL"
MAX_ROWS = 10_000  # rows shown
ROW_CAP = 100_000  # default rows fetched (and downloadable); the engine stops after these
MAX_ROW_CAP = 1_000_000  # the most the page fetches (more: `medlake sql --limit N`)
TIMEOUT_S = 30.0  # a query running longer is stopped (the page must stay responsive)
DEFAULT_QUERY = "SELECT dataset_id, count(*) AS images FROM images GROUP BY 1 ORDER BY 1"

#: title -> (what it answers, SQL); each runs on any lake (tested on the UI sample)
EXAMPLES: dict[str, tuple[str, str]] = {
    "Discrepancies per finding": (
        "images where raters disagree, per dataset and finding (the discrepancies view)",
        """SELECT dataset_id, finding, count(*) AS images, min(labels) AS example
FROM discrepancies
GROUP BY ALL
ORDER BY images DESC, dataset_id, finding"""),
    "Leakage": (
        "groups with images in more than one split, per dataset and scheme (leakage table)",
        """SELECT dataset_id, scheme, split_a, split_b, grouping, n_groups, n_images
FROM leakage
ORDER BY n_groups DESC, dataset_id, scheme"""),
    "PPV against the reference": (
        ("positive predictive value with its 95% interval, per source pair and finding "
         "(agreement table, whole set)"),
        """SELECT dataset_id, source_a, source_b, reference, finding, n_shared,
       round(ppv, 3) AS ppv, round(ppv_lo, 3) AS ppv_lo, round(ppv_hi, 3) AS ppv_hi
FROM agreement
WHERE ppv IS NOT NULL AND subgroup = ''
ORDER BY ppv, dataset_id, finding"""),
    "Lowest kappa": (
        "the findings two sources agree on least (agreement table, whole set)",
        """SELECT dataset_id, source_a, source_b, finding, n_shared, round(kappa, 3) AS kappa
FROM agreement
WHERE kappa IS NOT NULL AND subgroup = ''
ORDER BY kappa, n_shared DESC
LIMIT 25"""),
}


def _use_example(title: str) -> None:
    st.session_state["sql-query"] = EXAMPLES[title][1]
    st.session_state["sql-ran"] = True


def render(cat: Catalog) -> None:
    st.header("SQL")
    st.caption("Read-only DuckDB SQL over every table (the sandbox of `medlake sql`: no "
               "file can be read or written, one SELECT at a time, at most "
               f"{TIMEOUT_S:g} s per query and the row cap below).")
    if "sql-query" not in st.session_state:
        st.session_state["sql-query"] = DEFAULT_QUERY
    left, right = st.columns([3, 2])
    with left:
        query = st.text_area("query", key="sql-query", height=160)
        c1, c2 = st.columns([1, 2])
        cap = int(c2.number_input("row cap", min_value=1, max_value=MAX_ROW_CAP, value=ROW_CAP,
                                  step=10_000, key="sql-cap",
                                  help="rows fetched at most; the result says when it was cut"))
        if c1.button("Run", key="sql-run", type="primary"):
            st.session_state["sql-ran"] = True
        st.markdown("**Examples** (a click runs the query)")
        cols = st.columns(2)
        for i, (title, (what, _)) in enumerate(EXAMPLES.items()):
            cols[i % 2].button(title, key=f"sql-ex-{i}", help=what, on_click=_use_example,
                               args=(title,), width="stretch")
    with right:
        _schema_browser(cat)
    if st.session_state.get("sql-ran"):
        _result(cat, query, cap)


def _result(cat: Catalog, query: str, cap: int) -> None:
    """Run ``query`` in the sandbox and show, note the cap, and offer the result."""
    try:
        df, capped = _run(str(cat.ws.root), cache.signature(cat.ws.tables_dir), query, cap)
    except CatalogError as e:
        st.error(str(e))
        return
    if capped:
        st.warning(f"Capped: the query has more than {cap:,} rows; only the first {cap:,} are "
                   "shown and downloadable. Aggregate or filter in SQL, raise the row cap "
                   f"(at most {MAX_ROW_CAP:,} here), or use `medlake sql --limit N` for more.")
    st.caption(("more than " if capped else "") + f"{df.height:,} rows"
               + (f" ({MAX_ROWS:,} shown)" if df.height > MAX_ROWS else ""))
    st.dataframe(df.head(MAX_ROWS), hide_index=True, key="sql-table")
    c1, c2 = st.columns(2)
    c1.download_button("Download CSV", df.write_csv(), file_name="medlake-query.csv",
                       mime="text/csv", key="sql-csv")
    buf = io.BytesIO()
    df.write_parquet(buf)
    c2.download_button("Download Parquet", buf.getvalue(), file_name="medlake-query.parquet",
                       mime="application/vnd.apache.parquet", key="sql-parquet")


@st.cache_data(max_entries=16, show_spinner=False)
def _run(root: str, sig: tuple, query: str, cap: int) -> tuple[pl.DataFrame, bool]:
    """The sandboxed result of ``query`` (at most ``cap`` rows) and whether it was cut, per
    lake state (downloads and reruns do not run the query again; errors are not cached)."""
    at = Catalog.open(root).sql(query, limit=cap, timeout_s=TIMEOUT_S)
    df = pl.from_arrow(at)
    assert isinstance(df, pl.DataFrame)
    return df, row_cap(at) is not None


# --- schema browser ---------------------------------------------------------------------------
def duck_type(t: pa.DataType) -> str:
    """The DuckDB name of an Arrow type (what a query sees)."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return duck_type(t.value_type) + "[]"
    names = {pa.string(): "VARCHAR", pa.large_string(): "VARCHAR", pa.int64(): "BIGINT",
             pa.int32(): "INTEGER", pa.int16(): "SMALLINT", pa.int8(): "TINYINT",
             pa.float64(): "DOUBLE", pa.float32(): "FLOAT", pa.bool_(): "BOOLEAN",
             pa.date32(): "DATE", pa.binary(): "BLOB"}
    if pa.types.is_timestamp(t):
        return "TIMESTAMP WITH TIME ZONE" if t.tz else "TIMESTAMP"
    return names.get(t, str(t).upper())


def row_counts(cat: Catalog) -> dict[str, int] | str:
    """Rows per table (one sandboxed ``count(*)`` query over all of them, cached per lake
    state), or the error text when a table cannot be read."""
    try:
        return _row_counts(str(cat.ws.root), cache.signature(cat.ws.tables_dir),
                           _uncached_state(cat))
    except CatalogError as e:
        return str(e)


def _uncached_state(cat: Catalog) -> tuple:
    """Modification times of the folders of the tables the lake signature leaves out
    (``reviews``: a new verdict file changes its stage folder's time)."""
    out = []
    for t in cache.UNCACHED_TABLES:
        d = cat.ws.tables_dir / t
        try:
            out += [(f.name, f.stat().st_mtime_ns) for f in (d, *sorted(d.iterdir()))]
        except FileNotFoundError:  # not written yet, or a folder removed meanwhile
            out.append((t, -1))
    return tuple(out)


@st.cache_data(max_entries=4, show_spinner=False)
def _row_counts(root: str, sig: tuple, fresh: tuple) -> dict[str, int]:
    sql = " UNION ALL ".join(f"SELECT '{t}' AS t, count(*) AS n FROM \"{t}\"" for t in TABLES)
    df = pl.from_arrow(Catalog.open(root).sql(sql, limit=len(TABLES), timeout_s=TIMEOUT_S))
    assert isinstance(df, pl.DataFrame)
    return dict(zip(df["t"].to_list(), df["n"].to_list()))


def _schema_browser(cat: Catalog) -> None:
    st.markdown("**Tables and views**")
    counts = row_counts(cat)
    if isinstance(counts, str):
        st.caption(f"row counts unavailable: {counts}")
        counts = {}
    tables = pl.DataFrame({
        "table": list(TABLES),
        "rows": [counts.get(t) for t in TABLES],
        "key": [", ".join(spec(t).key) for t in TABLES],
        "description": [spec(t).description for t in TABLES],
    }, schema={"table": pl.String, "rows": pl.Int64, "key": pl.String, "description": pl.String})
    views = pl.DataFrame({"table": list(VIEWS), "rows": None, "key": "",
                          "description": "view (derived when queried)"},
                         schema=tables.schema)
    both = pl.concat([tables, views])
    st.dataframe(both, hide_index=True, key="sql-tables", height=240)
    name = st.selectbox("columns of", both["table"].to_list(), key="sql-schema-table")
    if name in TABLES:
        s = spec(name)
        cols = pl.DataFrame({"column": s.schema.names,
                             "type": [duck_type(f.type) for f in s.schema],
                             "key": [n in s.key for n in s.schema.names]})
    else:
        try:
            d = data.q(cat, f'DESCRIBE "{name}"')
        except (duckdb.Error, CatalogError) as e:  # a view over a table lacking a column
            st.caption(f"view {name} is not available on this lake: {str(e).splitlines()[0]}")
            return
        cols = pl.DataFrame({"column": d["column_name"], "type": d["column_type"],
                             "key": False})
    st.dataframe(cols, hide_index=True, key="sql-columns", height=240)
