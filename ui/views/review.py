"""Review: a seeded random sample per class; record whether each label is right; PPV, kappa."""

from __future__ import annotations

import altair as alt
import polars as pl
import streamlit as st

from medlake.catalog import Catalog
from medlake.catalog import reviews as rv
from medlake.ui import data
from medlake.ui.views.common import (
    chart,
    last_verdict_note,
    need,
    reviewer,
    show_chart,
    show_image,
    verdict_buttons,
)

TITLE = "Review"
DEFAULT_PER_CLASS = 100  # the ChestX-ray14 critique's visual check: 100 images per class


def sample(cat: Catalog, source_id: str, findings: list[str], per_class: int,
           seed: int) -> pl.DataFrame:
    """A seeded random sample of up to ``per_class`` positive images per finding.

    The order is ``md5(image_id || seed)``: stable across runs, machines and table order.
    """
    if not findings:
        return pl.DataFrame(schema={"image_id": pl.String, "finding": pl.String,
                                    "value": pl.Float64, "raw_value": pl.String})
    fs = ", ".join(data.lit(f) for f in findings)
    return data.q(cat, f"""
        SELECT image_id, finding, max(value) AS value, any_value(raw_value) AS raw_value
        FROM annotations WHERE source_id = ? AND finding IN ({fs}) AND value > 0
        GROUP BY image_id, finding
        QUALIFY row_number() OVER (PARTITION BY finding ORDER BY md5(image_id || ?)) <= ?
        ORDER BY finding, md5(image_id || ?)""", [source_id, str(seed), per_class, str(seed)])


def render(cat: Catalog) -> None:
    st.header("Review")
    if not need(cat, "annotations"):
        return
    last_verdict_note()
    srcs = data.q(cat, "SELECT DISTINCT source_id FROM annotations ORDER BY 1")["source_id"]
    c1, c2, c3 = st.columns(3)
    source = c1.selectbox("label source", srcs.to_list(), key="rev-source")
    per_class = int(c2.number_input("images per class", 1, 10_000, DEFAULT_PER_CLASS,
                                    key="rev-n"))
    seed = int(c3.number_input("seed", 0, 2**31 - 1, 0, key="rev-seed"))
    allf = data.q(cat, "SELECT DISTINCT finding FROM annotations WHERE source_id = ? AND "
                       "value > 0 ORDER BY 1", [source])["finding"].to_list()
    findings = st.multiselect("classes", allf, default=allf[:8], key="rev-classes")
    c4, c5 = st.columns(2)
    shown = c4.toggle("show the label", value=False, key="rev-shown")
    rule = c5.selectbox("rule", ["clinical", "permissive", "strict"], key="rev-rule",
                        help="the reading rule your verdicts follow")
    smp = sample(cat, source, findings, per_class, seed)
    hist = rv.read(cat, where="kind = 'label'")
    mine = rv.latest(cat, kind="label", reviews=hist.filter(pl.col("reviewer") == reviewer()))
    done = set(mine["item"].to_list())
    smp = smp.with_columns((pl.col("image_id") + "|" + pl.lit(source) + "|" + pl.col("finding"))
                           .alias("item"))
    todo = smp.filter(~pl.col("item").is_in(list(done)))
    st.progress(1 - todo.height / max(smp.height, 1),
                text=f"{smp.height - todo.height:,} of {smp.height:,} sampled labels reviewed "
                     f"by {reviewer() or '(enter your name in the sidebar)'}")
    if todo.height:
        r = todo.row(0, named=True)
        st.subheader(f"Is this image {r['finding']}?" if shown else "Is the label right?")
        if shown:
            st.write(f"label: **{r['finding']}** = {r['raw_value'] or r['value']} ({source})")
        else:
            st.caption("label hidden: the source's value is not shown; judge whether the "
                       "image shows the class (blind check)")
            st.write(f"candidate class: **{r['finding']}**")
        show_image(cat, r["image_id"], caption=r["image_id"])
        st.text_input("note (optional)", key="rev-note")
        verdict_buttons(
            cat, lambda v: rv.label_verdict(r["image_id"], source, r["finding"], v, "",
                                            rule=rule, label=str(r["value"]), label_shown=shown),
            rv.VERDICTS["label"], key="rev", note_key="rev-note")
    else:
        st.success("sample done: every sampled label has your verdict")
    _results(cat, hist, source)


def _results(cat: Catalog, hist: pl.DataFrame, source: str) -> None:
    st.subheader("PPV per class (latest verdicts, unsure left out)")
    ppv = rv.ppv_by_class(cat, source_id=source, reviews=hist)
    if ppv.height == 0:
        st.info("no verdicts yet for this source")
        return
    st.dataframe(ppv, hide_index=True, key="rev-ppv")
    rows = tuple(ppv.filter(pl.col("n") > 0).select("finding", "ppv", "ppv_lo", "ppv_hi").rows())
    if rows:
        show_chart(chart(_ppv_chart, rows, key="rev-ppv-chart"), "rev-ppv-chart")
    st.subheader("Reviewer vs reviewer")
    kap = rv.reviewer_kappa(cat, reviews=hist.filter(pl.col("source_id") == source))
    if kap.height == 0:
        st.info("kappa needs two reviewers who judged the same images")
    else:
        st.dataframe(kap, hide_index=True, key="rev-kappa")


def _ppv_chart(rows: tuple) -> alt.LayerChart:
    """PPV per class with its 95% Wilson interval."""
    import pandas as pd

    base = alt.Chart(pd.DataFrame(list(rows), columns=["finding", "ppv", "ppv_lo", "ppv_hi"])
                     ).encode(y=alt.Y("finding:N", title=None))
    return (base.mark_rule().encode(x=alt.X("ppv_lo:Q", title="PPV (95% Wilson)",
                                            scale=alt.Scale(domain=[0, 1])), x2="ppv_hi:Q")
            + base.mark_point(filled=True).encode(x="ppv:Q"))
