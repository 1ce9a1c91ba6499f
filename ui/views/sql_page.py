"""SQL: a read-only query box with the same sandbox as ``medlake sql``."""

from __future__ import annotations

import polars as pl
import streamlit as st

from medlake.catalog import Catalog, CatalogError
from medlake.catalog.sql import row_cap

TITLE = "SQL"
MAX_ROWS = 10_000  # rows shown
ROW_CAP = 100_000  # rows fetched (and downloadable); the engine stops after these
TIMEOUT_S = 30.0  # a query running longer is stopped (the page must stay responsive)


def render(cat: Catalog) -> None:
    st.header("SQL")
    st.caption("Read-only DuckDB SQL over every table (the sandbox of `medlake sql`: no "
               "file can be read or written, one SELECT at a time, at most "
               f"{ROW_CAP:,} rows and {TIMEOUT_S:g} s per query).")
    query = st.text_area("query", value="SELECT dataset_id, count(*) AS images FROM images "
                         "GROUP BY 1 ORDER BY 1", key="sql-query", height=120)
    if st.button("Run", key="sql-run"):
        st.session_state["sql-ran"] = True
    if not st.session_state.get("sql-ran"):
        return
    try:
        at = cat.sql(query, limit=ROW_CAP, timeout_s=TIMEOUT_S)
    except CatalogError as e:
        st.error(str(e))
        return
    capped = row_cap(at) is not None
    df = pl.from_arrow(at)
    assert isinstance(df, pl.DataFrame)
    st.caption(
        ("more than " if capped else "") + f"{df.height:,} rows"
        + (f" ({MAX_ROWS:,} shown)" if df.height > MAX_ROWS else "")
        + (f"; the result was cut at {ROW_CAP:,} rows: aggregate or filter in SQL, or use "
           "`medlake sql --limit N` for more" if capped else "")
    )
    st.dataframe(df.head(MAX_ROWS), hide_index=True, key="sql-table")
    st.download_button("Download CSV", df.write_csv(), file_name="medlake-query.csv",
                       mime="text/csv", key="sql-csv")
