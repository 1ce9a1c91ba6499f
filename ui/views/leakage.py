"""Leakage: patient/lesion groups whose images sit in more than one split, per dataset."""

from __future__ import annotations

import streamlit as st

from medlake.catalog import Catalog
from medlake.ui import data
from medlake.ui.views.common import (
    GALLERY_MAX,
    gallery,
    need,
    no_file_notice,
    pager,
    select,
)

TITLE = "Leakage"
PER_PAGE = 50


def render(cat: Catalog) -> None:
    st.header("Leakage")
    if not (need(cat, "splits") and need(cat, "images")):
        if not data.has(cat, "leakage"):
            need(cat, "leakage")
        return
    dsets = data.q(cat, "SELECT DISTINCT dataset_id FROM splits WHERE dataset_id IS NOT NULL "
                        "ORDER BY 1")["dataset_id"].to_list()
    if not dsets:
        st.info("The splits table has no rows yet.")
        return
    defaults = data.default_schemes(cat)
    c1, c2 = st.columns(2)
    ds = select(c1, "dataset", dsets, key="leak-dataset",
                default=st.query_params.get("dataset"))  # ?dataset= opens one directly
    scheme = select(c2, "split scheme", data.schemes_of(cat, ds), key="leak-scheme",
                    default=defaults.get(ds), help=f"the split schemes of {ds} (splits table)")
    if not data.count(cat, "images", f"dataset_id = {data.lit(ds)} AND path IS NOT NULL"):
        no_file_notice(ds)  # once, here: its galleries below show captions only
    if data.has(cat, "leakage"):
        st.subheader("Leakage table")
        st.dataframe(data.q(cat, "SELECT * FROM leakage WHERE dataset_id = ? ORDER BY ALL", [ds]),
                     hide_index=True, key="leak-table")
    else:
        need(cat, "leakage")
    body = f"""
        SELECT i.group_id, count(DISTINCT s.split) AS n_splits,
               string_agg(DISTINCT s.split, ', ' ORDER BY s.split) AS splits,
               count(*) AS images
        FROM splits s JOIN images i USING (image_id)
        WHERE s.dataset_id = {data.lit(ds)} AND s.scheme = {data.lit(scheme)}
          AND i.group_id IS NOT NULL
        GROUP BY i.group_id HAVING count(DISTINCT s.split) > 1"""
    total = int(data.q(cat, f"SELECT count(*) AS n FROM ({body})")["n"][0])
    st.metric("groups spanning splits", f"{total:,}")
    if not total:
        return
    offset = pager("leak", total, PER_PAGE)
    groups = data.q(cat, f"{body} ORDER BY images DESC, group_id LIMIT {PER_PAGE} OFFSET {offset}")
    st.dataframe(groups, hide_index=True, key="leak-groups")
    gid = select(st, "group", groups["group_id"].to_list(), key="leak-group")
    imgs = data.q(cat, f"""SELECT s.image_id, s.split FROM splits s JOIN images i USING (image_id)
                          WHERE i.group_id = ? AND s.scheme = ? AND s.dataset_id = ?
                          ORDER BY s.split, s.image_id LIMIT {GALLERY_MAX}""", [gid, scheme, ds])
    n = int(groups.filter(groups["group_id"] == gid)["images"][0])
    if n > imgs.height:
        st.caption(f"first {imgs.height} of {n:,} images")
    gallery(cat, imgs["image_id"].to_list(),
            [f"{r['image_id']} · {r['split']}" for r in imgs.iter_rows(named=True)])
