"""Label discrepancies: kappa per finding and source pair of one dataset; the images two
sources disagree on.

A dataset is picked first; its findings are filtered (a minimum number of shared images)
and paged (:data:`FINDINGS_PER_PAGE` by default), so the heatmap stays legible at
PadChest's ~190 findings: one row per finding (its name written horizontally), one column
per source pair (names without the dataset prefix), the number of shared images in each
cell.
"""

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
    select,
    verdict_buttons,
)

TITLE = "Label discrepancies"
PER_PAGE = 8  # images per page (each with three verdict buttons)
FINDINGS_PER_PAGE = 25  # heatmap rows per page (default of the page-size choice)
PAGE_SIZES = (10, 25, 50)
ORDERS = {  # findings order -> ORDER BY over the per-finding summary (worst, n, finding)
    "lowest kappa first": "worst ASC NULLS LAST, finding",
    "name": "finding",
    "most shared images first": "n DESC, finding",
}
ROW_PX = 26  # heatmap row height: one line of label text plus spacing
WIDE_COL_PX, NARROW_COL_PX = 150, 40  # pair column width with horizontal / vertical labels
MAX_WIDTH_PX = 900  # wider than this, pair labels turn vertical in narrow columns

# every row of the chosen dataset and subgroup that has a kappa; pair = the raters compared
_CELLS = """
    SELECT source_a, coalesce(annotator_a, '') AS annotator_a, source_b,
           coalesce(annotator_b, '') AS annotator_b, finding, kappa, n_shared,
           source_a || CASE WHEN coalesce(annotator_a, '') IN ('', '*') THEN ''
                       ELSE '/' || annotator_a END || ' vs ' ||
           source_b || CASE WHEN coalesce(annotator_b, '') IN ('', '*') THEN ''
                       ELSE '/' || annotator_b END AS pair
    FROM agreement
    WHERE dataset_id = ? AND coalesce(subgroup, '') = ? AND coalesce(subgroup_value, '') = ?
      AND kappa IS NOT NULL"""


def render(cat: Catalog) -> None:
    st.header("Label discrepancies")
    last_verdict_note()
    if not need(cat, "agreement"):
        return
    dsets = data.q(cat, """
        SELECT dataset_id, count(DISTINCT finding) AS findings FROM agreement
        WHERE kappa IS NOT NULL AND dataset_id IS NOT NULL GROUP BY 1 ORDER BY 1""")
    if dsets.height == 0:
        st.info("The agreement table has no kappa yet (no dataset has two label sources "
                f"sharing images). Run `{data.HINTS.get('agreement', 'medlake agreement')}`.")
        return
    n_find = dict(dsets.iter_rows())
    c1, c2 = st.columns(2)
    ds = select(c1, "dataset", list(n_find), key="disc-dataset",
                default=st.query_params.get("dataset"),  # ?dataset= opens one directly
                format_func=lambda d: f"{d} ({n_find[d]:,} findings)")
    subs = [tuple(r) for r in data.q(cat, """
        SELECT DISTINCT coalesce(subgroup, '') AS s, coalesce(subgroup_value, '') AS v
        FROM agreement WHERE dataset_id = ? AND kappa IS NOT NULL ORDER BY 1, 2""",
                                     [ds]).iter_rows()]
    sub = select(c2, "subgroup", subs, key="disc-subgroup", default=("", ""),
                 format_func=lambda s: "all images" if s == ("", "") else f"{s[0]} = {s[1]}")
    args = [ds, sub[0], sub[1]]
    c3, c4, c5, c6 = st.columns(4)
    min_n = int(c3.number_input("minimum shared images", min_value=0, value=1, step=1,
                                key="disc-min-n",
                                help="findings whose best-covered pair shares fewer images "
                                     "are left out"))
    order = c4.selectbox("order findings", list(ORDERS), key="disc-order")
    per = c5.selectbox("findings per page", PAGE_SIZES, key="disc-per",
                       index=PAGE_SIZES.index(FINDINGS_PER_PAGE))
    summary = f"""
        SELECT finding, min(kappa) AS worst, max(n_shared) AS n FROM ({_CELLS})
        GROUP BY finding HAVING max(n_shared) >= {min_n}"""
    total = int(data.q(cat, f"SELECT count(*) AS n FROM ({summary})", args)["n"][0])
    st.caption(f"{total:,} of {n_find[ds]:,} findings of {ds} with at least {min_n:,} shared "
               "images; the number in a cell is n shared; click a cell to see the images the "
               "two sources disagree on")
    if not total:
        return
    with c6:
        offset = pager("disc-f", total, per)
    shown = data.q(cat, f"{summary} ORDER BY {ORDERS[order]} LIMIT {int(per)} "
                        f"OFFSET {offset}", args)["finding"].to_list()
    cells = data.q(cat, f"SELECT * FROM ({_CELLS}) WHERE finding IN "
                        f"({', '.join(data.lit(f) for f in shown)}) ORDER BY pair, finding", args)
    prefix = f"{ds}:"
    heat_rows = tuple(cells.select(
        "pair", pl.col("pair").str.replace_all(prefix, "", literal=True).alias("short"),
        "finding", "kappa", "n_shared").rows())
    clicked = chart_pick(chart(_heatmap, heat_rows, tuple(shown), key="disc-heat"),
                         "disc-heat", "cell", ("pair", "finding"), width="content")
    if clicked:  # a click on a cell shows its images below
        st.session_state["disc-pair"], st.session_state["disc-finding"] = clicked
    _cell(cat, sub, args, shown)


def _cell(cat: Catalog, sub: tuple[str, str], args: list, shown: list[str]) -> None:
    """Pair and finding selectboxes (set by a click too; the finding starts at the heatmap's
    top row), the cell's kappa and its images."""
    pairs = data.q(cat, f"SELECT DISTINCT pair FROM ({_CELLS}) ORDER BY 1", args)["pair"].to_list()
    if not pairs:
        return
    c1, c2 = st.columns(2)
    pair = select(c1, "source pair (heatmap column)", pairs, key="disc-pair")
    finds = data.q(cat, f"SELECT DISTINCT finding FROM ({_CELLS}) WHERE pair = ? "
                        "ORDER BY 1", [*args, pair])["finding"].to_list()
    finding = select(c2, "finding (heatmap row)", finds, key="disc-finding",
                     default=shown[0] if shown else None)
    if finding is None:
        return
    cell = data.q(cat, f"SELECT * FROM ({_CELLS}) WHERE pair = ? AND finding = ?",
                  [*args, pair, finding]).row(0, named=True)
    st.write(f"kappa {cell['kappa']:.3f} on {cell['n_shared']:,} shared images")
    _images(cat, (cell["source_a"], cell["annotator_a"]), (cell["source_b"], cell["annotator_b"]),
            finding, sub)


def _heatmap(rows: tuple, findings: tuple) -> alt.LayerChart:
    """Kappa per (finding, source pair), n shared written in each cell; a click picks a cell.

    Rows are findings in ``findings`` order (names horizontal, never overlapping: one row
    each); columns are pairs, labelled without the dataset prefix, vertical when many.
    """
    cells = pl.DataFrame(list(rows), schema={"pair": pl.String, "short": pl.String,
                                             "finding": pl.String, "kappa": pl.Float64,
                                             "n_shared": pl.Int64}, orient="row")
    shorts = sorted(set(cells["short"].to_list()))
    wide = len(shorts) * WIDE_COL_PX <= MAX_WIDTH_PX
    col = WIDE_COL_PX if wide else NARROW_COL_PX
    pick = alt.selection_point(name="cell", fields=["pair", "finding"], on="click", clear=False)
    base = alt.Chart(cells.to_pandas()).encode(
        x=alt.X("short:N", title=None, sort=shorts, axis=alt.Axis(
            orient="top", labelAngle=0 if wide else -90, labelLimit=col - 10 if wide else 220,
            labelFontSize=12, labelOverlap=False)),
        y=alt.Y("finding:N", title=None, sort=list(findings), axis=alt.Axis(
            labelLimit=280, labelFontSize=12, labelOverlap=False)))
    heat = base.mark_rect(cursor="pointer").encode(
        color=alt.Color("kappa:Q", scale=alt.Scale(domain=[-1, 1], scheme="redblue")),
        opacity=alt.condition(pick, alt.value(1.0), alt.value(0.6)),
        tooltip=["pair", "finding", alt.Tooltip("kappa:Q", format=".3f"), "n_shared"],
    ).add_params(pick)
    labels = base.mark_text(fontSize=11).encode(
        text=alt.Text("n_shared:Q", format=".3~s"),
        color=alt.condition("abs(datum.kappa) > 0.6", alt.value("white"), alt.value("black")))
    return alt.layer(heat, labels).properties(width=alt.Step(col), height=alt.Step(ROW_PX))


def _images(cat: Catalog, a: tuple[str, str], b: tuple[str, str], finding: str,
            sub: tuple[str, str]) -> None:
    """The images where raters ``a`` and ``b`` ((source, annotator); annotator '' = the
    source as a whole) disagree on ``finding``, paged, with label verdict buttons."""
    if not need(cat, "annotations"):
        return
    (sa, aa), (sb, ab) = a, b
    img_cols = set(data.columns(cat, "images"))
    cond = "true"
    if sub[0] in img_cols:
        cond = f'CAST(i."{sub[0]}" AS VARCHAR) = {data.lit(sub[1])}'
    elif sub[0]:
        cond = f"json_extract_string(i.meta, {data.lit('$.' + sub[0])}) = {data.lit(sub[1])}"

    def side(name: str, source: str, annotator: str) -> str:
        ann = f"AND a.annotator = {data.lit(annotator)}" if annotator not in ("", "*") else ""
        return f"""
          SELECT '{name}' AS side, a.image_id, max(a.value) AS value
          FROM annotations a LEFT JOIN findings f USING (source_id, finding)
          WHERE a.source_id = {data.lit(source)} {ann} AND NOT coalesce(a.is_invalid, false)
            AND (a.finding = {data.lit(finding)} OR f.shared_finding = {data.lit(finding)})
          GROUP BY ALL"""

    body = f"""
        WITH v AS ({side('a', sa, aa)} UNION ALL {side('b', sb, ab)})
        SELECT x.image_id, x.value AS value_a, y.value AS value_b
        FROM v x JOIN v y ON x.image_id = y.image_id AND x.side = 'a' AND y.side = 'b'
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
    judged = c1.selectbox("judge the label of", sorted({sa, sb}, key=[sa, sb].index),
                          key="disc-judge",
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
