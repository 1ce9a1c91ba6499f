"""SQL: a read-only query box with the same sandbox as ``medlake sql``."""

from __future__ import annotations

import polars as pl
import streamlit as st

from medlake.catalog import Catalog, CatalogError

TITLE = "SQL"
MAX_ROWS = 10_000


def render(cat: Catalog) -> None:
    st.header("SQL")
    st.caption("Read-only DuckDB SQL over every table (the sandbox of `medlake sql`: files "
               "outside the lake cannot be read, nothing can be written).")
    query = st.text_area("query", value="SELECT dataset_id, count(*) AS images FROM images "
                         "GROUP BY 1 ORDER BY 1", key="sql-query", height=120)
    if st.button("Run", key="sql-run"):
        st.session_state["sql-ran"] = True
    if not st.session_state.get("sql-ran"):
        return
    try:
        at = cat.sql(query)
    except CatalogError as e:
        st.error(str(e))
        return
    df = pl.from_arrow(at)
    assert isinstance(df, pl.DataFrame)
    st.caption(f"{df.height:,} rows" + (f" ({MAX_ROWS:,} shown)" if df.height > MAX_ROWS else ""))
    st.dataframe(df.head(MAX_ROWS), hide_index=True, key="sql-table")
    st.download_button("Download CSV", df.write_csv(), file_name="medlake-query.csv",
                       mime="text/csv", key="sql-csv")
