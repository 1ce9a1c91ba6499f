"""Duplicates: candidate pairs side by side at full resolution, verdicts, cluster galleries."""

from __future__ import annotations

import io
from typing import Any

import streamlit as st
from PIL import Image

from medlake.catalog import Catalog, CatalogError
from medlake.catalog import reviews as rv
from medlake.ui import cache, data
from medlake.ui.views.common import (
    GALLERY_MAX,
    blend_file,
    gallery,
    last_verdict_note,
    latest_verdicts,
    need,
    pager,
    select,
    show_image,
    verdict_buttons,
)

TITLE = "Duplicates"
PER_PAGE = 4  # pairs per page: at most this many pairs of full-size images are loaded
ALL = "all datasets"
PER_DATASET = "each dataset's own"  # split scheme: every image's dataset's default scheme


def render(cat: Catalog) -> None:
    st.header("Duplicates")
    if not need(cat, "pairs"):
        return
    last_verdict_note()
    methods = data.q(cat, "SELECT DISTINCT method FROM pairs ORDER BY 1")["method"].to_list()
    c0, c4 = st.columns(2)
    dataset = select(c0, "dataset", [ALL, *data.pair_datasets(cat)], key="dup-dataset",
                     default=st.query_params.get("dataset"),  # ?dataset= opens one directly
                     help="pairs with an image of this dataset")
    scheme = _scheme_choice(cat, c4, None if dataset == ALL else dataset)
    c1, c2, c3 = st.columns(3)
    method = c1.selectbox("method", ["all", *methods], key="dup-method")
    ver = c2.selectbox("verified", ["all", "verified", "not verified"], key="dup-verified")
    min_score = c3.number_input("minimum score", value=0.0, step=0.01, key="dup-min")
    cross = st.checkbox("only pairs that cross splits", key="dup-cross")
    view = st.radio("third panel", ["blend", "difference"], horizontal=True, key="dup-view")
    filters = {"method": None if method == "all" else method,
               "verified": None if ver == "all" else ver == "verified", "min_score": min_score,
               "cross_only": cross, "scheme": scheme,
               "dataset": None if dataset == ALL else dataset}
    _, total = data.pairs_page(cat, offset=0, limit=0, **filters)
    st.metric("pairs", f"{total:,}")
    offset = pager("dup", total, PER_PAGE)
    page, _ = data.pairs_page(cat, offset=offset, limit=PER_PAGE, **filters)
    ids = sorted(set(page["image_a"].to_list()) | set(page["image_b"].to_list()))
    info = data.image_info(cat, ids, scheme)
    verdict_of = latest_verdicts(cat, "pair")
    for i, r in enumerate(page.iter_rows(named=True)):
        _pair(cat, r, info, verdict_of, view, offset + i)
    _histogram(cat)
    _clusters(cat)


def _scheme_choice(cat: Catalog, container: Any, dataset: str | None) -> data.Schemes:
    """The split-scheme selectbox; its default follows the pairs' datasets.

    With one dataset chosen: that dataset's schemes (in the splits table), its default
    scheme first (:func:`ui.data.default_schemes`). With all datasets: each image's split
    comes from its own dataset's default scheme, or from one scheme picked for every dataset.
    """
    defaults = data.default_schemes(cat)
    if dataset is not None:
        schemes = data.schemes_of(cat, dataset)
        if not schemes:
            container.selectbox("split scheme", ["—"], key=f"dup-scheme:{dataset}",
                                disabled=True, help=f"{dataset} has no splits")
            return {}
        return select(container, "split scheme", schemes, key=f"dup-scheme:{dataset}",
                      default=defaults.get(dataset),
                      help=f"the split schemes of {dataset} (splits table)")
    in_pairs = set(data.pair_datasets(cat))
    own = ", ".join(f"{d}: {s}" for d, s in defaults.items() if d in in_pairs)
    choice = select(container, "split scheme", [PER_DATASET, *data.schemes_of(cat)],
                    key="dup-scheme", help=f"{PER_DATASET}: {own or 'no splits'}",
                    format_func=lambda s: f"{s} ({own})" if s == PER_DATASET and own else s)
    return defaults if choice == PER_DATASET else choice


def _caption(info: dict, iid: str) -> str:
    d = info.get(iid, {})
    return (f"{iid} · group {d.get('group_id') or '—'} · split {d.get('split') or '—'} · "
            f"labels: {d.get('labels') or 'none'}")


def _pair(cat: Catalog, r: dict, info: dict, verdict_of: dict, view: str, n: int) -> None:
    a, b = r["image_a"], r["image_b"]
    item = rv.pair_item(a, b)
    st.divider()
    cross = " · **crosses splits**" if r.get("crosses_splits") else ""
    st.markdown(f"**#{n + 1}** score {r['score']:.4f} · method {r['method']} · verified "
                f"{r.get('verified')}{cross} · verdict so far: {verdict_of.get(item, '—')}")
    ca, cb, cc = st.columns(3)
    with ca:
        show_image(cat, a, caption=_caption(info, a))
    with cb:
        show_image(cat, b, caption=_caption(info, b))
    with cc:
        try:
            st.image(str(blend_file(cat, a, b, view)), caption=view)
        except CatalogError as e:
            st.caption(str(e))
    verdict_buttons(cat, lambda v: rv.pair_verdict(a, b, v, "", rule="visual"),
                    rv.VERDICTS["pair"], key=f"pair-{n}")


def _histogram(cat: Catalog) -> None:
    """Pair scores per method with the threshold marked: a PNG drawn once per lake state.

    A picture, not a Vega chart: nothing here is clicked, and without a chart the page's
    browser work is images and widgets only (the Vega library costs each page load most).
    """
    st.subheader("Similarity scores")
    h = data.score_histogram(cat)
    if h.height == 0:
        return
    thr = duplicates_threshold(cat)
    rows = tuple(h.select("method", "score", "n").rows())
    png = cache.cached_file(cat, cache.file_key("score-histogram", rows, thr),
                            lambda: _histogram_png(rows, thr))
    st.image(str(png), caption="pairs per score bin and method" + (
        f"; red line: duplicates.ncc = {thr:g} (params.yaml), the verification threshold"
        if thr is not None else ""))


def duplicates_threshold(cat: Any) -> float | None:
    """The verification threshold pairs are scored against (``params.yaml: duplicates.ncc``,
    validated by the stage's own params class); None when params.yaml is invalid."""
    from medlake.catalog import CatalogError
    from medlake.pipelines.registry import stages

    try:
        return float(stages()["duplicates"].load_params(cat).ncc)
    except CatalogError:
        return None


def _histogram_png(rows: tuple, thr: float | None) -> Image.Image:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 2.6), dpi=100)
    ax = fig.add_subplot()
    methods = sorted({r[0] for r in rows})
    scores = sorted({r[1] for r in rows})
    width = (scores[-1] - scores[0]) / max(len(scores) - 1, 1) * 0.9 if len(scores) > 1 else 0.01
    bottom = dict.fromkeys(scores, 0)
    for m in methods:
        xs = [r[1] for r in rows if r[0] == m]
        ns = [r[2] for r in rows if r[0] == m]
        ax.bar(xs, ns, width=width, bottom=[bottom[x] for x in xs], label=m)
        for x, n in zip(xs, ns):
            bottom[x] += n
    if thr is not None:
        ax.axvline(thr, color="red")
    ax.set_xlabel("score")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    buf.seek(0)
    return Image.open(buf)


def _clusters(cat: Catalog) -> None:
    st.subheader("Clusters")
    if not need(cat, "clusters"):
        return
    sizes = data.q(cat, "SELECT cluster_id, count(*) AS images FROM clusters GROUP BY 1 "
                        "ORDER BY images DESC, cluster_id LIMIT 200")
    st.caption(f"{data.count(cat, 'clusters'):,} images in clusters (largest 200 listed)")
    cid = st.selectbox("cluster", sizes["cluster_id"].to_list(), key="dup-cluster",
                       format_func=lambda c: f"{c} ({sizes.filter(sizes['cluster_id'] == c)['images'][0]} images)")
    if cid:
        ids = data.q(cat, "SELECT image_id FROM clusters WHERE cluster_id = ? ORDER BY 1 "
                          f"LIMIT {GALLERY_MAX}", [cid])["image_id"].to_list()
        n = int(sizes.filter(sizes["cluster_id"] == cid)["images"][0])
        if n > len(ids):
            st.caption(f"first {len(ids)} of {n:,} images")
        gallery(cat, ids)
