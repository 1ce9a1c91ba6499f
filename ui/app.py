"""The medlake Streamlit app: ``medlake ui [WORKSPACE]`` or ``streamlit run ui/app.py``.

The workspace comes from ``MEDLAKE_WORKSPACE`` (set by ``medlake ui``), else from
``-- --workspace DIR`` after the script name, else the current folder. The page is in the
URL (``?page=duplicates``), so a page can be bookmarked and a browser test can open it.
``?warm=1`` (sent once by ``medlake ui``) renders every page in the background and waits
(:mod:`ui.warm`); ``MEDLAKE_UI_TIMING=1`` logs each page run's seconds (bench/ui.py).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import streamlit as st

if __package__ in (None, ""):  # `streamlit run ui/app.py` runs this file as a script
    try:
        import medlake  # noqa: F401  (installed: nothing to add)
    except ImportError:  # a source checkout without the package installed
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medlake.catalog import Catalog, CatalogError
from medlake.ui import warm
from medlake.ui.views import pages
from medlake.ui.views.common import begin_run, proxy_header, reviewer

PAGES = pages()


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
    if st.query_params.get("warm") == "1":  # `medlake ui` asks for this once (ui.warm.prime)
        done = warm.warm_now(cat, PAGES)
        st.write("warm" if done else "warm-up still running")
        return
    warm.refresh(cat, PAGES)  # a stage changed the lake: warm every page again, in the background
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
        header = proxy_header()
        if header is None:
            st.text_input("reviewer", key="reviewer", help="your name, stored with each verdict")
        else:  # the authenticating proxy names the reviewer: shown, not editable
            st.text_input("reviewer", value=reviewer(), disabled=True,
                          help=f"set by the proxy's {header} header; stored with each verdict")
            if not reviewer():
                st.warning(f"No {header} header reached the app: verdicts cannot be recorded. "
                           "Open the UI through the authenticating proxy.")
    if choice != st.query_params.get("page"):
        st.query_params["page"] = choice
    t = time.perf_counter()
    begin_run()  # once-per-run notices (e.g. a dataset without image files) are due again
    PAGES[choice].render(cat)
    if os.environ.get("MEDLAKE_UI_TIMING"):  # bench/ui.py: server-side time per page run
        warm.log.info("page %s ran in %.3f s", choice, time.perf_counter() - t)


main()
