"""Label discrepancies: kappa per finding and source pair; the images two sources disagree on."""

from __future__ import annotations

import altair as alt
import polars as pl
import streamlit as st

from medlake.catalog import Catalog
from medlake.catalog import reviews as rv
from medlake.ui import data
from medlake.ui.views.common import (
    chart,
    chart_pick,
    gallery,
    last_verdict_note,
    latest_verdicts,
    need,
    pager,
    verdict_buttons,
)

TITLE = "Label discrepancies"
PER_PAGE = 8  # images per page (each with three verdict buttons)


def render(cat: Catalog) -> None:
    st.header("Label discrepancies")
    last_verdict_note()
    if not need(cat, "agreement"):
        return
    ag = data.q(cat, "SELECT * FROM agreement").with_columns(
        pl.col("subgroup").fill_null(""), pl.col("subgroup_value").fill_null(""),
        (pl.col("source_a") + pl.lit(" vs ") + pl.col("source_b")).alias("pair"))
    subs = sorted(set(zip(ag["subgroup"].to_list(), ag["subgroup_value"].to_list())))
    sub = st.selectbox("subgroup", subs, key="disc-subgroup",
                       format_func=lambda s: "all images" if s == ("", "") else f"{s[0]} = {s[1]}")
    cells = ag.filter((pl.col("subgroup") == sub[0]) & (pl.col("subgroup_value") == sub[1]))
    st.caption(f"{cells.height:,} (source pair, finding) cells; the number is n shared; "
               "click a cell to see the images the two sources disagree on")
    if cells.height == 0:
        return
    heat_rows = tuple(cells.select("pair", "finding", "kappa", "n_shared").rows())
    clicked = chart_pick(chart(_heatmap, heat_rows, key="disc-heat"), "disc-heat", "cell",
                         ("pair", "finding"))
    if clicked:  # a click on a cell shows its images below
        st.session_state["disc-pair"], st.session_state["disc-finding"] = clicked
    pairs = sorted(cells["pair"].unique().to_list())
    if not pairs:
        return
    c1, c2 = st.columns(2)
    pair = c1.selectbox("source pair (heatmap row)", pairs, key="disc-pair")
    finds = sorted(cells.filter(pl.col("pair") == pair)["finding"].unique().to_list())
    finding = c2.selectbox("finding (heatmap column)", finds, key="disc-finding")
    cell = cells.filter((pl.col("pair") == pair) & (pl.col("finding") == finding)).row(0, named=True)
    st.write(f"kappa {cell['kappa']:.3f} on {cell['n_shared']:,} shared images")
    _images(cat, cell["source_a"], cell["source_b"], finding, sub)


def _heatmap(rows: tuple) -> alt.LayerChart:
    """Kappa per (source pair, finding), n shared written in each cell; a click picks a cell."""
    cells = pl.DataFrame(list(rows), schema={"pair": pl.String, "finding": pl.String,
                                             "kappa": pl.Float64, "n_shared": pl.Int64},
                         orient="row")
    pick = alt.selection_point(name="cell", fields=["pair", "finding"], on="click", clear=False)
    base = alt.Chart(cells.to_pandas()).encode(
        x=alt.X("finding:N", axis=alt.Axis(labelAngle=0, orient="top")),
        y=alt.Y("pair:N", title=None, axis=alt.Axis(labelLimit=400)))
    heat = base.mark_rect(cursor="pointer").encode(
        color=alt.Color("kappa:Q", scale=alt.Scale(domain=[-1, 1], scheme="redblue")),
        opacity=alt.condition(pick, alt.value(1.0), alt.value(0.6)),
        tooltip=["pair", "finding", "kappa", "n_shared"]).add_params(pick)
    labels = base.mark_text(fontSize=14).encode(text="n_shared:Q")
    return alt.layer(heat, labels).properties(height=alt.Step(60))


def _images(cat: Catalog, sa: str, sb: str, finding: str, sub: tuple[str, str]) -> None:
    if not need(cat, "annotations"):
        return
    img_cols = set(data.columns(cat, "images"))
    cond = "true"
    if sub[0] in img_cols:
        cond = f'CAST(i."{sub[0]}" AS VARCHAR) = {data.lit(sub[1])}'
    elif sub[0]:
        cond = f"json_extract_string(i.meta, {data.lit('$.' + sub[0])}) = {data.lit(sub[1])}"
    body = f"""
        WITH v AS (
          SELECT a.image_id, a.source_id, max(a.value) AS value
          FROM annotations a LEFT JOIN findings f USING (source_id, finding)
          WHERE a.source_id IN ({data.lit(sa)}, {data.lit(sb)}) AND NOT coalesce(a.is_invalid, false)
            AND (a.finding = {data.lit(finding)} OR f.shared_finding = {data.lit(finding)})
          GROUP BY ALL)
        SELECT x.image_id, x.value AS value_a, y.value AS value_b
        FROM v x JOIN v y ON x.image_id = y.image_id AND x.source_id = {data.lit(sa)}
             AND y.source_id = {data.lit(sb)}
        JOIN images i ON i.image_id = x.image_id
        WHERE (x.value > 0) <> (y.value > 0) AND {cond}"""
    total = int(data.q(cat, f"SELECT count(*) AS n FROM ({body})")["n"][0])
    st.subheader(f"{total:,} images where the two sources disagree")
    if not total:
        return
    offset = pager("disc", total, PER_PAGE)
    page = data.q(cat, f"{body} ORDER BY x.image_id LIMIT {PER_PAGE} OFFSET {offset}")
    st.dataframe(page, hide_index=True, key="disc-table")
    c1, c2 = st.columns(2)
    judged = c1.selectbox("judge the label of", [sa, sb], key="disc-judge",
                          help="the verdict buttons under each image are about this source's label")
    rule = c2.selectbox("rule", ["clinical", "permissive", "strict"], key="disc-rule",
                        help="the reading rule your verdicts follow")
    col = "value_a" if judged == sa else "value_b"
    verdict_of = latest_verdicts(cat, "label")
    value_of = {r["image_id"]: r[col] for r in page.iter_rows(named=True)}
    caps = [f"{r['image_id']}\n{sa}: {r['value_a']:g} · {sb}: {r['value_b']:g} · verdict on "
            f"{judged}: {verdict_of.get(rv.label_item(r['image_id'], judged, finding), '—')}"
            for r in page.iter_rows(named=True)]
    gallery(cat, page["image_id"].to_list(), caps, per_row=4, max_side=256,
            below=lambda iid: verdict_buttons(
                cat, lambda v: rv.label_verdict(iid, judged, finding, v, "", rule=rule,
                                                label=f"{value_of[iid]:g}", label_shown=True),
                rv.VERDICTS["label"], key=f"disc-{iid}"))
