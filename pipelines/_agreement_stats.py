"""Agreement statistics per group of pair rows, in a few vectorised passes.

A group is (rater pair, finding, subgroup). Pair rows become count tables with one
``group_by`` and :func:`catalog.stats.confusion_tables`; every statistic is then computed for
all groups at once. Undefined figures are null with a ``note`` saying why.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from medlake.catalog import stats
from medlake.pipelines._agreement_labels import image_key, item_key
from medlake.pipelines._agreement_pairs import PAIR_KEYS, with_subgroups

KEYS = [*PAIR_KEYS, "subgroup", "subgroup_value"]
POS_ONLY = ("kappa not computed: {a} is positive-only (negatives 'none'), so a missing label "
            "means 'not judged', not negative; pos_confirmed = share of its positives that "
            "{b} also calls positive")


def _nan_to_null(a: np.ndarray) -> pl.Series:
    return pl.Series(np.where(np.isfinite(a), a, np.nan)).fill_nan(None)


def _weighted(cells: pl.DataFrame, a: str, b: str, n_groups: int, k: int) -> np.ndarray:
    idx = (cells["gid"].to_numpy().astype(np.int64) * k + cells[a].to_numpy()) * k + cells[b].to_numpy()
    return np.bincount(idx, weights=cells["len"].to_numpy().astype(float),
                       minlength=n_groups * k * k).reshape(n_groups, k, k)


def group_stats(
    rows: pl.DataFrame, meta: pl.DataFrame, sgmeta: pl.DataFrame, *,
    references: set[tuple[str, str]], categories: list[str] | None = None, ci: str = "clip",
    code_names: dict[int, str] | None = None,
) -> pl.DataFrame:
    """Kappa (+CI), weighted kappas (+CI), off-by-one, positives, PPV/NPV/sens/spec and, for
    category pairs, the most frequent confusions, per group.

    Parameters
    ----------
    rows
        Pair rows ``key, sg, ca, cb, oa, ob`` (integer keys: one group = ``(key, sg)``).
    meta, sgmeta
        ``key`` -> :data:`PAIR_KEYS` and ``negatives_a/_b``; ``sg`` -> ``subgroup,
        subgroup_value``.
    references
        ``{(test source, reference source)}`` pairs from ``params.yaml``.
    categories
        The category name of each code (category-family rows), for ``confusion``.
    ci
        ``clip``: kappa intervals cut to [-1, 1] (:func:`catalog.stats.bounded_ci`), with a
        note on each row that was cut; ``asymptotic``: statsmodels' interval as it is.
    code_names
        Names of the binary-family codes above 1 (``uncertain`` and the categories that
        ``agreement.policies`` create): a row whose table uses them says so in its note.
    """
    if rows.height == 0:
        return pl.DataFrame()
    cells = rows.group_by(["key", "sg", "ca", "cb"]).len()
    groups = (
        cells.group_by(["key", "sg"]).agg(
            pl.col("len").filter(pl.col("ca").is_null()).sum().alias("n_excluded_a"),
            pl.col("len").filter(pl.col("cb").is_null()).sum().alias("n_excluded_b"))
        .join(meta, on="key").join(sgmeta, on="sg").sort(KEYS)
    )
    ocells = rows.filter(pl.col("oa").is_not_null() & pl.col("ob").is_not_null()).group_by(
        ["key", "sg", "oa", "ob"]).len()
    out = []
    for fam in sorted(groups["family"].unique().to_list()):
        g = groups.filter(pl.col("family") == fam).with_row_index("gid")
        c = cells.filter(pl.col("ca").is_not_null() & pl.col("cb").is_not_null()).join(
            g.select("key", "sg", "gid"), on=["key", "sg"])
        k = max(3, int(max(c["ca"].max() or 0, c["cb"].max() or 0)) + 1)  # type: ignore[arg-type]
        t = _weighted(c, "ca", "cb", g.height, k)
        out.append(_family_frame(g, t, fam, ocells, references, categories or [], ci,
                                 code_names or {}))
    return pl.concat(out, how="diagonal_relaxed")


def _confusions(t: np.ndarray, names: list[str], top: int = 5) -> list[str | None]:
    """The ``top`` most frequent disagreements per table: ``'a -> b: n; ...'``."""
    out: list[str | None] = []
    k = t.shape[1]
    off = ~np.eye(k, dtype=bool)
    for tab in t:
        cells = np.argwhere((tab > 0) & off)
        if not len(cells):
            out.append(None)
            continue
        n = tab[cells[:, 0], cells[:, 1]]
        best = cells[np.lexsort((cells[:, 1], cells[:, 0], -n))[:top]]
        out.append("; ".join(
            f"{names[i] if i < len(names) else i} -> {names[j] if j < len(names) else j}: "
            f"{int(tab[i, j])}" for i, j in best))
    return out


def _bounded(name: str, kappa: np.ndarray, lo: np.ndarray, hi: np.ndarray, ci: str,
             clipped: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """``lo, hi`` cut to [-1, 1] when ``ci == 'clip'``; a note per cut row into ``clipped``."""
    if ci != "clip":
        return lo, hi
    blo, bhi, cut = stats.bounded_ci(lo, hi)
    for i in np.nonzero(cut)[0]:
        clipped[i].append(f"{name} 95% CI clipped to [-1, 1] (asymptotic {lo[i]:.3f} to "
                          f"{hi[i]:.3f}; agreement.kappa_ci: clip)")
    return blo, bhi


def _family_frame(
    g: pl.DataFrame, t: np.ndarray, fam: str, ocells: pl.DataFrame, refs: set[tuple[str, str]],
    categories: list[str], ci: str = "clip", code_names: dict[int, str] | None = None,
) -> pl.DataFrame:
    kap = stats.kappa_from_tables(t)
    notes = stats.kappa_note(kap)
    # a source whose 'negatives' is unset (null) is read as explicit, as the schema's default
    pos_only = (g["negatives_a"].cast(pl.String).fill_null("explicit") == "none").to_numpy()
    clipped: list[list[str]] = [[] for _ in range(g.height)]
    cols: dict[str, object] = {
        "n_shared": kap.n.astype(np.int64), "observed": _nan_to_null(kap.observed),
        "expected": _nan_to_null(kap.expected),
    }
    lo, hi = _bounded("kappa", kap.kappa, np.where(pos_only, np.nan, kap.lo),
                      np.where(pos_only, np.nan, kap.hi), ci, clipped)
    for name, arr in (("kappa", kap.kappa), ("kappa_se", kap.se), ("kappa_lo", lo),
                      ("kappa_hi", hi)):
        cols[name] = _nan_to_null(np.where(pos_only, np.nan, arr))
    src_a, src_b = g["source_a"].to_list(), g["source_b"].to_list()
    ref_side = [("b" if (a, b) in refs else "a" if (b, a) in refs else None)
                for a, b in zip(src_a, src_b)]
    if fam == "binary":
        t2 = t[:, :2, :2]
        cols["pos_a"] = t[:, 1, :].sum(1).astype(np.int64)
        cols["pos_b"] = t[:, :, 1].sum(1).astype(np.int64)
        cols["both_pos"] = t[:, 1, 1].astype(np.int64)
        p, lo, hi = stats.wilson(t[:, 1, 1], t[:, 1, 0] + t[:, 1, 1])
        for name, arr in (("pos_confirmed", p), ("pos_confirmed_lo", lo), ("pos_confirmed_hi", hi)):
            cols[name] = _nan_to_null(np.where(pos_only, arr, np.nan))
        d_b, d_a = stats.diagnostic(t2, reference="b"), stats.diagnostic(t2, reference="a")
        use_b = np.array([r == "b" for r in ref_side])
        use_a = np.array([r == "a" for r in ref_side]) & ~pos_only
        for name in d_b:
            cols[name] = _nan_to_null(np.where(use_b & ~pos_only, d_b[name],
                                               np.where(use_a, d_a[name], np.nan)))
        cols["reference"] = [(b if r == "b" else a if r == "a" else None) if not po else None
                             for r, a, b, po in zip(ref_side, src_a, src_b, pos_only)]
    oc = ocells.join(g.select("key", "sg", "gid"), on=["key", "sg"])
    if oc.height:
        ko = int(max(oc["oa"].max(), oc["ob"].max())) + 1  # type: ignore[arg-type]
        to = _weighted(oc, "oa", "ob", g.height, ko)
        for w in ("linear", "quadratic"):
            kw = stats.kappa_from_tables(to, weights=w)
            cols[f"kappa_{w}"] = _nan_to_null(kw.kappa)
            wlo, whi = _bounded(f"kappa_{w}", kw.kappa, kw.lo, kw.hi, ci, clipped)
            cols[f"kappa_{w}_lo"], cols[f"kappa_{w}_hi"] = _nan_to_null(wlo), _nan_to_null(whi)
        cols["off_by_one"] = _nan_to_null(stats.off_by_one(to))
    if fam == "category":
        cols["confusion"] = pl.Series(_confusions(t, categories), dtype=pl.String)
    kind = np.where(pos_only, "positive_only",
                    np.where(g["source_a"] == g["source_b"], "annotators", "pair"))
    full = []
    for i, n in enumerate(notes):
        parts = [POS_ONLY.format(a=src_a[i], b=src_b[i])] if pos_only[i] else ([n] if n else [])
        if fam == "binary" and ref_side[i] and not pos_only[i]:
            for name, why in (("ppv", "no test positives"), ("sens", "no reference positives"),
                              ("npv", "no test negatives"), ("spec", "no reference negatives")):
                if cols[name][i] is None:  # type: ignore[index]
                    parts.append(f"{name} undefined: {why}")
        if fam == "binary" and t.shape[1] > 2 and t[i, 2:, :].sum() + t[i, :, 2:].sum() > 0:
            used = np.nonzero(t[i].sum(0) + t[i].sum(1))[0]
            names = [{0: "negative", 1: "positive"}.get(int(c)) or (code_names or {}).get(
                int(c), f"code {int(c)}") for c in used]
            parts.append(f"kappa over {len(used)} categories ({', '.join(names)}); ppv, npv, "
                         "sens and spec use the negative/positive answers only")
        parts += clipped[i]
        full.append("; ".join(parts) or None)
    return g.drop("gid", "key", "sg", "negatives_a", "negatives_b", "family").with_columns(
        pl.Series("kind", kind), pl.lit(fam).alias("value_type"),
        *[pl.Series(k, v) for k, v in cols.items()], pl.Series("note", full, dtype=pl.String),
    )


def multi_stats(rows: pl.DataFrame, meta: pl.DataFrame, sgmeta: pl.DataFrame) -> pl.DataFrame:
    """Fleiss' kappa and Krippendorff's alpha over all annotators of a source, per group.

    ``rows``: ``mk, sg, img, c`` (one per annotator answer); ``meta``: ``mk`` -> source_id,
    finding, finding_own, family; ``sgmeta``: ``sg`` -> subgroup, subgroup_value.
    """
    if rows.height == 0:
        return pl.DataFrame()
    mk0, sg0 = rows["mk"].to_numpy().astype(np.int64), rows["sg"].to_numpy().astype(np.int64)
    n_sg = int(sg0.max()) + 1
    gfull = mk0 * n_sg + sg0  # mk is dense (0..M-1), so this stays small
    present = np.bincount(gfull) > 0
    ug = np.nonzero(present)[0]
    # one 64-bit sort brings each (group, image) together: the image hash mixed with the group
    ikey = item_key(rows["img"].to_numpy(), gfull)
    order = np.argsort(ikey)
    ikey = ikey[order]
    row_gid = (np.cumsum(present) - 1)[gfull[order]]
    c = rows["c"].fill_null(-1).to_numpy()[order]
    new_i = np.ones(len(ikey), bool)
    new_i[1:] = ikey[1:] != ikey[:-1]
    row_item = np.cumsum(new_i) - 1
    n_it = int(row_item[-1]) + 1
    g = pl.DataFrame({"mk": ug // n_sg, "sg": ug % n_sg})
    fam_of = dict(zip(meta["mk"], meta["family"]))
    m_item = np.bincount(row_item, minlength=n_it)
    item_gid = row_gid[new_i]
    raters = pl.DataFrame({"gid": item_gid, "m": m_item}).group_by("gid").agg(
        pl.col("m").max().alias("n_raters"), pl.col("m").min().alias("_min")).sort("gid")
    ok = c >= 0
    k = max(2, int(c.max()) + 1)
    counts = np.bincount(row_item[ok] * k + c[ok], minlength=n_it * k).reshape(n_it, k)
    gid = item_gid
    fl = stats.fleiss_kappa(gid, counts, g.height)
    fams = np.array([fam_of[m] for m in g["mk"]])
    al = stats.krippendorff_alpha(gid, counts, g.height, metric="nominal")
    if (fams == "ordinal").any():
        al = np.where(fams == "ordinal",
                      stats.krippendorff_alpha(gid, counts, g.height, metric="ordinal"), al)
    n_items = np.bincount(gid[counts.sum(1) >= 2], minlength=g.height)
    notes = []
    for i, (lo, hi) in enumerate(zip(raters["_min"], raters["n_raters"])):
        parts = []
        if np.isnan(fl[i]):
            parts.append("fleiss/alpha undefined: no item with two usable ratings or a single "
                         "value throughout")
        if lo != hi:
            parts.append(f"raters per item vary ({lo}-{hi}); Fleiss' kappa uses each item's "
                         "own count")
        notes.append("; ".join(parts) or None)
    return g.with_columns(
        pl.Series("n_raters", raters["n_raters"].cast(pl.Int64)),
        pl.Series("n_shared", n_items.astype(np.int64)), pl.Series("fleiss", _nan_to_null(fl)),
        pl.Series("alpha", _nan_to_null(al)), pl.Series("note", notes, dtype=pl.String),
    ).join(meta, on="mk").join(sgmeta, on="sg").select(
        pl.lit("raters").alias("kind"), pl.col("family").alias("value_type"),
        pl.col("source_id").alias("source_a"), pl.lit("*").alias("annotator_a"),
        pl.col("source_id").alias("source_b"), pl.lit("*").alias("annotator_b"),
        "finding", pl.col("finding_own").alias("finding_a"),
        pl.col("finding_own").alias("finding_b"), "subgroup", "subgroup_value",
        "n_raters", "n_shared", "fleiss", "alpha", "note",
    )


def prevalence_rows(
    labels: pl.DataFrame, coverage: pl.DataFrame, no_overlap: list[tuple[str, str, list[str]]],
    sub: pl.DataFrame, sgmeta: pl.DataFrame,
) -> pl.DataFrame:
    """Prevalence with Wilson intervals for source pairs that share findings but no image.

    One row per (pair, finding, subgroup): each side's images judged (``n_a``, ``n_b``; an
    implicit-negative source's covered images) and positives in the subgroup.
    ``sub``: ``img, sg``; ``sgmeta``: ``sg`` -> subgroup, subgroup_value.
    """
    frames = []
    for a, b, common in no_overlap:
        side, own = [], []  # per side: counts; shared -> own finding name
        for s in (a, b):
            lab = labels.filter((pl.col("source_id") == s) & pl.col("finding").is_in(common))
            implicit = lab.height > 0 and lab["negatives"][0] == "implicit"
            fidx = {f: i for i, f in enumerate(common)}  # integer keys for the group-by
            coded = lab.select("img", pl.col("finding").replace_strict(
                fidx, return_dtype=pl.Int32).alias("fi"), (pl.col("c") == 1).alias("p"),
                pl.col("c").is_not_null().alias("ok"))
            agg = with_subgroups(coded, sub).group_by("fi", "sg").agg(
                pl.col("p").sum().cast(pl.Int64).alias("pos"),
                pl.col("ok").sum().cast(pl.Int64).alias("n"),
            ).select(pl.col("fi").replace_strict(dict(enumerate(common))).alias("finding"),
                     "sg", "pos", "n")
            if implicit:  # every covered image was judged: n = covered images in the subgroup
                cov = with_subgroups(coverage.filter(pl.col("source_id") == s).select(
                    image_key()), sub).group_by("sg").agg(pl.len().alias("n_cov"))
                agg = cov.join(pl.DataFrame({"finding": common}), how="cross").join(
                    agg.drop("n"), on=["finding", "sg"], how="left").select(
                    "finding", "sg", pl.col("pos").fill_null(0), pl.col("n_cov").alias("n"))
            side.append(agg)
            own.append({} if agg.height == 0 else dict(  # none: an implicit side without coverage
                lab.unique(subset="finding", keep="first", maintain_order=True)
                .select("finding", "finding_own").drop_nulls().iter_rows()))
        m = side[0].join(side[1], on=["finding", "sg"], how="full", coalesce=True, suffix="_b")
        m = m.with_columns(pl.col(x).fill_null(0) for x in ("pos", "n", "pos_b", "n_b"))
        m = m.join(sgmeta, on="sg")
        wa = stats.wilson(m["pos"].to_numpy(), m["n"].to_numpy())
        wb = stats.wilson(m["pos_b"].to_numpy(), m["n_b"].to_numpy())
        frames.append(m.select(
            pl.lit("prevalence").alias("kind"), pl.lit("binary").alias("value_type"),
            pl.lit(a).alias("source_a"), pl.lit("").alias("annotator_a"),
            pl.lit(b).alias("source_b"), pl.lit("").alias("annotator_b"), "finding",
            pl.col("finding").replace_strict(own[0], default=None).alias("finding_a"),
            pl.col("finding").replace_strict(own[1], default=None).alias("finding_b"),
            "subgroup", "subgroup_value", pl.lit(0, pl.Int64).alias("n_shared"),
            pl.col("n").cast(pl.Int64).alias("n_a"), pl.col("pos").cast(pl.Int64).alias("pos_a"),
            _nan_to_null(wa[0]).alias("prev_a"), _nan_to_null(wa[1]).alias("prev_a_lo"),
            _nan_to_null(wa[2]).alias("prev_a_hi"),
            pl.col("n_b").cast(pl.Int64), pl.col("pos_b").cast(pl.Int64).alias("pos_b"),
            _nan_to_null(wb[0]).alias("prev_b"), _nan_to_null(wb[1]).alias("prev_b_lo"),
            _nan_to_null(wb[2]).alias("prev_b_hi"),
            pl.lit("no shared images: compared by prevalence (Wilson 95% intervals), kappa "
                   "needs images both sources judged").alias("note"),
        ))
    return pl.concat(frames) if frames else pl.DataFrame()
