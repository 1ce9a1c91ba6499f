"""Catalog: datasets, sources, versions as a graph; a version's datasheet, lineage and diff."""

from __future__ import annotations

import altair as alt
import polars as pl
import streamlit as st

from medlake.catalog import Catalog
from medlake.ui import data
from medlake.ui.views.common import chart, chart_pick, need, show_chart

TITLE = "Catalog"


def render(cat: Catalog) -> None:
    st.header("Catalog")
    if not need(cat, "datasets"):
        return
    ds = data.q(cat, """
        SELECT d.dataset_id, d.name, d.modality, d.license,
               (SELECT count(*) FROM images i WHERE i.dataset_id = d.dataset_id) AS images
        FROM datasets d ORDER BY d.dataset_id""")
    st.subheader(f"Datasets ({ds.height:,})")
    st.table(ds, hide_index=True)  # a few rows: plain HTML, no data-grid bundle to load
    if need(cat, "sources"):
        src = data.q(cat, """
            SELECT source_id, kind, CASE WHEN exhaustive THEN 'exhaustive' ELSE 'positive-only'
                   END AS coverage, negatives, value_type, rule, description FROM sources
            ORDER BY source_id""")
        st.subheader(f"Sources ({src.height:,})")
        st.table(src, hide_index=True)
    st.subheader("Versions")
    if not need(cat, "versions"):
        return
    vs = data.versions(cat)
    st.caption(f"{vs.height:,} versions")
    names = vs["name"].to_list()
    graph_rows = tuple(vs.select("name", "parent", "n_images", "kind").rows())
    picked = chart_pick(chart(_graph, graph_rows, key="version-graph"), "version-graph",
                        "version", ("name",))
    if picked and picked[0] in names:  # a click on a node opens that version below
        st.session_state["version"] = picked[0]
    sc = data.split_counts(vs)
    if sc.height:
        show_chart(chart(_split_bars, tuple(sc.rows()), key="split-bars"), "split-bars")
    name = st.selectbox("version", names, key="version",
                        help="or click a version in the graph above")
    if not name:
        return
    row = vs.filter(vs["name"] == name).row(0, named=True)
    # only the open tab runs and is sent (a tab switch reruns); outside a session (the
    # warm-up) ``open`` is None and every tab runs, so each tab's queries are cached
    tab_sheet, tab_lin, tab_diff = st.tabs(["Datasheet", "Lineage", "Diff"], key="version-tab",
                                           on_change="rerun")
    if tab_sheet.open is not False:
        with tab_sheet:
            _datasheet(cat, name)
    if tab_lin.open is not False:
        with tab_lin:
            _lineage(cat, name)
    if tab_diff.open is not False:
        with tab_diff:
            _diff(cat, name, names, row.get("parent"))


def _datasheet(cat: Catalog, name: str) -> None:
    sheet = data.datasheet(cat, name)
    if sheet:
        st.markdown(sheet)
    else:
        st.info(f"no DATASHEET.md for {name} (roots have none; `medlake materialize "
                "RECIPE` writes one per corrected version)")


def _diff(cat: Catalog, name: str, names: list[str], parent: str | None) -> None:
    others = [n for n in names if n != name]
    if not others:
        st.info("only one version: nothing to compare with")
        return
    idx = others.index(parent) if parent in others else 0
    other = st.selectbox("compare with", others, index=idx, key="diff-other")
    counts, changes = data.diff(cat, other, name)
    st.write(f"from **{other}** to **{name}**: " + ", ".join(
        f"{v:,} {k}" for k, v in counts.items()))
    st.dataframe(changes.head(1000), hide_index=True, key="diff-table")


def _lineage(cat: Catalog, name: str) -> None:
    if not need(cat, "lineage"):
        return
    lv = data.lit(name)
    opts = data.q(cat, f"SELECT DISTINCT action, rule FROM lineage WHERE version = {lv}")
    actions = st.multiselect("action", sorted(set(opts["action"].drop_nulls())), key="lin-action")
    rules = st.multiselect("rule", sorted(set(opts["rule"].drop_nulls())), key="lin-rule")
    cond = f"version = {lv}"
    if actions:
        cond += f" AND action IN ({', '.join(data.lit(a) for a in actions)})"
    if rules:
        cond += f" AND rule IN ({', '.join(data.lit(r) for r in rules)})"
    n = data.count(cat, "lineage", cond)
    st.caption(f"{n:,} lineage rows (first 1,000 shown)")
    st.dataframe(data.q(cat, f"SELECT * FROM lineage WHERE {cond} ORDER BY image_id LIMIT 1000"),
                 hide_index=True, key="lineage-table")


def _split_bars(rows: tuple) -> alt.Chart:
    sc = pl.DataFrame(list(rows), schema=["version", "split", "n"], orient="row")
    return alt.Chart(sc.to_pandas()).mark_bar().encode(
        x=alt.X("n:Q", title="images"), y=alt.Y("version:N", title=None),
        color="split:N", tooltip=["version", "split", "n"])


def _graph(rows: tuple) -> alt.LayerChart:
    """The parent -> child graph: a node per version (click to open it), labelled with counts."""
    vs = pl.DataFrame(list(rows), schema={"name": pl.String, "parent": pl.String,
                                          "n_images": pl.Int64, "kind": pl.String}, orient="row")
    nodes, edges = data.version_graph(vs)
    pick = alt.selection_point(name="version", fields=["name"], on="click", clear=False)
    x = alt.X("x:Q", axis=None, scale=alt.Scale(domain=[-0.3, int(nodes["x"].max()) + 0.7]))
    y = alt.Y("y:Q", axis=None, scale=alt.Scale(domain=[int(nodes["y"].max()) + 0.6, -0.6]))
    dots = alt.Chart(nodes.to_pandas()).mark_square(size=900, cursor="pointer").encode(
        x=x, y=y, color=alt.Color("kind:N", title="kind"),
        opacity=alt.condition(pick, alt.value(1.0), alt.value(0.5)),
        tooltip=["name", "kind", "n_images"]).add_params(pick)
    text = alt.Chart(nodes.to_pandas()).mark_text(dy=-26, fontSize=13).encode(
        x=x, y=y, text="label:N")
    layers = [dots, text]
    if edges.height:
        layers.insert(0, alt.Chart(edges.to_pandas()).mark_rule(strokeWidth=2, color="gray")
                      .encode(x=x, y=y, x2="x2:Q", y2="y2:Q"))
    return alt.layer(*layers).properties(height=100 + 70 * int(nodes["y"].max()))
