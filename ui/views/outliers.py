"""Outliers and quality flags: ranked galleries; images per quality flag of the fingerprint
stage (``fingerprints.flags``)."""

from __future__ import annotations

import polars as pl
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
    _flags(cat)


def flag_counts(cat: Catalog) -> pl.DataFrame:
    """``flag, images`` and one column per dataset: how many fingerprinted images raised each
    quality flag (``fingerprints.flags``: comma-separated, '' when none), most frequent first."""
    long = data.q(cat, """
        SELECT trim(f) AS flag, dataset_id, count(*) AS n
        FROM (SELECT dataset_id, unnest(string_split(flags, ',')) AS f FROM fingerprints
              WHERE coalesce(flags, '') <> '')
        WHERE trim(f) <> '' GROUP BY ALL""")
    if long.height == 0:
        return pl.DataFrame(schema={"flag": pl.String, "images": pl.Int64})
    long = long.with_columns(pl.col("dataset_id").fill_null("(no dataset)"))
    wide = long.pivot(on="dataset_id", index="flag", values="n", sort_columns=True).fill_null(0)
    tot = long.group_by("flag").agg(pl.col("n").sum().alias("images"))
    return tot.join(wide, on="flag").sort(["images", "flag"], descending=[True, False])


def _flags(cat: Catalog) -> None:
    """Counts per quality flag and a paged gallery of the images raising the chosen one."""
    st.subheader("Quality flags")
    if not need(cat, "fingerprints"):
        return
    counts = flag_counts(cat)
    total = data.count(cat, "fingerprints")
    flagged = data.count(cat, "fingerprints", "coalesce(flags, '') <> ''")
    st.caption(f"{flagged:,} of {total:,} fingerprinted images raise at least one flag (the "
               "thresholds are params.yaml: fingerprint; an image can raise several)")
    if counts.height == 0:
        st.success("No fingerprinted image raises a quality flag.")
        return
    st.dataframe(counts, hide_index=True, key="flag-counts")
    n_of = dict(zip(counts["flag"].to_list(), counts["images"].to_list()))
    flag = st.selectbox("flag", list(n_of), key="flag",
                        format_func=lambda f: f"{f} ({n_of[f]:,} images)")
    offset = pager("flag", n_of[flag], PER_PAGE)
    page = data.q(cat, f"""
        SELECT image_id, flags, brightness, contrast FROM fingerprints
        WHERE list_contains(string_split(replace(flags, ' ', ''), ','), ?)
        ORDER BY image_id LIMIT {PER_PAGE} OFFSET {offset}""", [flag])
    gallery(cat, page["image_id"].to_list(),
            [f"{r['image_id']} · {r['flags']} · brightness {r['brightness'] or 0:.2f}"
             for r in page.iter_rows(named=True)], per_row=6)
