"""The medlake Streamlit app: ``medlake ui [WORKSPACE]`` or ``streamlit run ui/app.py``.

The workspace comes from ``MEDLAKE_WORKSPACE`` (set by ``medlake ui``), else from
``-- --workspace DIR`` after the script name, else the current folder. The page is in the
URL (``?page=duplicates``), so a page can be bookmarked and a browser test can open it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import streamlit as st

if __package__ in (None, ""):  # `streamlit run ui/app.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catalog import Catalog, CatalogError
from ui.views import (
    catalog_page,
    discrepancies,
    duplicates,
    leakage,
    outliers,
    review,
    sql_page,
)
from ui.views.common import reviewer

PAGES = {
    "catalog": catalog_page, "duplicates": duplicates, "discrepancies": discrepancies,
    "leakage": leakage, "outliers": outliers, "review": review, "sql": sql_page,
}


def workspace_arg(argv: list[str]) -> str | None:
    """``--workspace DIR`` from the script arguments, else ``MEDLAKE_WORKSPACE``."""
    if "--workspace" in argv[:-1]:
        return argv[argv.index("--workspace") + 1]
    return os.environ.get("MEDLAKE_WORKSPACE") or None


def main() -> None:
    st.set_page_config(page_title="medlake", layout="wide")
    try:
        cat = Catalog.open(workspace_arg(sys.argv[1:]))
    except CatalogError as e:
        st.error(str(e))
        return
    names = list(PAGES)
    current = st.query_params.get("page", "catalog")
    if current not in PAGES:
        st.warning(f"no page '{current}'; pages are {', '.join(names)}")
        current = "catalog"
    reviewer()  # the default name, before the sidebar field takes the key
    with st.sidebar:
        st.title("medlake")
        st.caption(cat.ws.root.name)
        choice = st.radio("page", names, index=names.index(current),
                          format_func=lambda n: PAGES[n].TITLE, key="nav")
        st.text_input("reviewer", key="reviewer", help="your name, stored with each verdict")
    if choice != st.query_params.get("page"):
        st.query_params["page"] = choice
    PAGES[choice].render(cat)


main()
