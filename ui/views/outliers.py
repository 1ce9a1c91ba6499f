"""Outliers and quality flags: ranked galleries."""

from __future__ import annotations

import streamlit as st

from medlake.catalog import Catalog
from medlake.catalog import reviews as rv
from medlake.ui import data
from medlake.ui.views.common import (
    gallery,
    last_verdict_note,
    latest_verdicts,
    need,
    pager,
    verdict_buttons,
)

TITLE = "Outliers and quality"
PER_PAGE = 12  # images per page, each with three verdict buttons (browser work grows with both)


def render(cat: Catalog) -> None:
    st.header("Outliers and quality flags")
    st.subheader("Outliers, most unusual first")
    last_verdict_note()
    if need(cat, "outliers"):
        total = data.count(cat, "outliers")
        st.metric("images scored", f"{total:,}")
        offset = pager("out", total, PER_PAGE)
        page = data.q(cat, f"SELECT image_id, score, rank FROM outliers ORDER BY score DESC, "
                           f"image_id LIMIT {PER_PAGE} OFFSET {offset}")
        verdict_of = latest_verdicts(cat, "image")
        gallery(cat, page["image_id"].to_list(),
                [f"#{r['rank']} {r['image_id']} · {r['score']:.3f} · verdict: "
                 f"{verdict_of.get(r['image_id'], '—')}" for r in page.iter_rows(named=True)],
                per_row=4, max_side=200, below=lambda iid: verdict_buttons(
                    cat, lambda v: rv.image_verdict(iid, v, "", rule="outlier-review"),
                    rv.VERDICTS["image"], key=f"img-{iid}"))
    st.subheader("Quality flags")
    if not need(cat, "fingerprints"):
        return
    flags = [c for c, t in data.column_types(cat, "fingerprints").items() if t == "BOOLEAN"]
    if not flags:
        st.info("the fingerprints table has no flag columns (boolean columns) yet")
        return
    counts = data.q(cat, "SELECT " + ", ".join(
        f'count(*) FILTER (WHERE "{f}") AS "{f}"' for f in flags) + " FROM fingerprints")
    st.dataframe(counts, hide_index=True, key="flag-counts")
    flag = st.selectbox("flag", flags, key="flag")
    ids = data.q(cat, f'SELECT image_id FROM fingerprints WHERE "{flag}" ORDER BY image_id '
                      f"LIMIT {PER_PAGE}")["image_id"].to_list()
    gallery(cat, ids)
