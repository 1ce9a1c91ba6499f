"""Pair rows for the agreement stage (pure functions on Polars frames).

The labels come from :mod:`pipelines._agreement_labels` (integer codes per rater, image and
shared finding). A pair row holds two raters' codes on one (image, finding); its ``key``
(one int64) names the rater pair and finding, so every statistic is a group-by on integers.
"""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl

from medlake.pipelines._agreement_labels import absent_fill, image_key, item_key, own_names

PAIR_KEYS = ["family", "source_a", "annotator_a", "source_b", "annotator_b", "finding",
             "finding_a", "finding_b"]
ROW_COLS = ["key", "img", "ca", "cb", "oa", "ob"]


class _Keys:
    """Integer ids of raters and findings, so pair rows carry one int64 ``key``."""

    def __init__(self, annotators: dict[str, list[str]], findings: set[str]) -> None:
        pairs = sorted((s, a) for s, anns in annotators.items() for a in anns)
        self.raters = {k: i for i, k in enumerate(pairs)}
        self.findings = {f: i for i, f in enumerate(sorted(findings))}
        self.nr, self.nf = len(self.raters) + 1, len(self.findings) + 1

    def side(self, df: pl.DataFrame, s: str, source_id: str) -> pl.DataFrame:
        amap = {ann: i for (src, ann), i in self.raters.items() if src == source_id}
        return df.select(
            pl.col("annotator").replace_strict(amap, return_dtype=pl.Int64).alias(f"r{s}"), "img",
            pl.col("finding").replace_strict(self.findings, return_dtype=pl.Int64).alias("fi"),
            pl.col("c").alias(f"c{s}"), pl.col("o").alias(f"o{s}"))


def _dense(
    rows: pl.DataFrame, covered: pl.DataFrame, source_id: str, own: pl.DataFrame,
    absent: int | None = 0, by_finding: dict[str, int | None] | None = None,
) -> pl.DataFrame:
    """An implicit-negative source's codes on the (img, finding) keys of ``covered``.

    ``own`` maps the source's shared finding names to its own (``finding, finding_own``);
    a covered key without a row gets ``absent`` (the source's ``(absent)`` code: 0, or
    None = excluded; ``by_finding``: per shared finding, from finding-level policies). A
    key with a row keeps its code, even a null one (an answer a policy excludes).
    """
    pos = rows.select("img", "finding", "c", "o", pl.lit(True).alias("_row"))
    return (
        covered.select("img", "finding").unique()
        .join(own, on="finding", how="inner")
        .join(pos, on=["img", "finding"], how="left")
        .with_columns(pl.lit(source_id).alias("source_id"), pl.lit("").alias("annotator"),
                      pl.when(pl.col("_row")).then(pl.col("c"))
                      .otherwise(absent_fill(absent, by_finding)).alias("c"))
        .drop("_row")
    )


def _annotator_pairs(side: pl.DataFrame) -> pl.DataFrame:
    """Every two annotators of one source on the same (image, finding), without a self-join:
    one 64-bit sort (the image hash mixed with the finding) brings each (image, finding)
    together; each row is paired with the rows 1..m-1 below it, the lower rater first."""
    key = item_key(side["img"].to_numpy(), side["fi"].to_numpy())
    order = np.argsort(key)
    key = key[order]
    fi, img, r = side["fi"].to_numpy()[order], side["img"].to_numpy()[order], side["ra"].to_numpy()[order]
    c = side["ca"].fill_null(-1).to_numpy()[order]
    o = side["oa"].fill_null(-1).to_numpy()[order]
    parts = []
    for off in range(1, len(order)):
        same = key[:-off] == key[off:]
        if not same.any():
            break
        i0 = np.nonzero(same)[0]
        swap = r[i0] > r[i0 + off]
        ia, ib = np.where(swap, i0 + off, i0), np.where(swap, i0, i0 + off)
        parts.append(pl.DataFrame({
            "ra": r[ia], "img": img[ia], "fi": fi[ia], "ca": c[ia], "oa": o[ia],
            "rb": r[ib], "cb": c[ib], "ob": o[ib],
        }))
    if not parts:
        return pl.DataFrame(schema={"ra": pl.Int64, "img": pl.UInt64, "fi": pl.Int64,
                                    "ca": pl.Int32, "oa": pl.Int32, "rb": pl.Int64,
                                    "cb": pl.Int32, "ob": pl.Int32})
    out = pl.concat(parts)
    return out.with_columns(pl.when(pl.col(x) >= 0).then(pl.col(x)).cast(pl.Int32)
                            for x in ("ca", "cb", "oa", "ob"))


def _pair_keys(key: np.ndarray, keys: _Keys) -> pl.DataFrame:
    """The distinct ``key`` values of pair rows with their ``ra, rb, fi`` (decoded, not
    de-duplicated row by row: a bincount over the key range, or a sort when it is huge)."""
    span = keys.nr * keys.nr * keys.nf
    if span <= 20_000_000:
        u = np.nonzero(np.bincount(key, minlength=1))[0]
    else:
        u = np.unique(key)
    fi = u % keys.nf
    rb = (u // keys.nf) % keys.nr
    return pl.DataFrame({"key": u.astype(np.int64), "ra": u // keys.nf // keys.nr, "rb": rb,
                         "fi": fi})


def source_pairs(
    labels: pl.DataFrame, sources: pl.DataFrame, coverage: pl.DataFrame, findings: pl.DataFrame,
    absent: dict[str, int | None] | None = None, *,
    absent_by_finding: dict[str, dict[str, int | None]] | None = None,
    skip: set[frozenset[str]] | None = None, compare_categories: bool = False,
) -> tuple[pl.DataFrame, pl.DataFrame, list[tuple[str, str, list[str]]]]:
    """Pair rows (one per image, finding and rater pair) for every two sources of a dataset.

    An implicit-negative source's vocabulary comes from ``findings`` (a finding it never
    marks positive is still one it judged); the others' from their annotation rows.
    ``absent_by_finding``: per-finding absent codes (finding-level policies); ``skip``:
    source pairs not to compare (a pooled source and a member with the same policy);
    ``compare_categories``: compare two positive-only category sources on the images both
    labelled (``params.yaml: agreement.positive_only_categories: compare``), as a ``pair``.

    Returns
    -------
    (rows, meta, no_overlap)
        ``rows``: ``key, img, ca, cb, oa, ob``; ``meta``: one row per ``key`` with
        :data:`PAIR_KEYS` and ``negatives_a, negatives_b``; ``no_overlap``: (source_a,
        source_b, findings) that share findings but no image (compared by prevalence).
    """
    neg = dict(zip(sources["source_id"].to_list(), sources["negatives"].to_list()))
    ab = absent or {}
    abf = absent_by_finding or {}
    ids = sorted(set(labels["source_id"].unique().to_list()))
    by_src = {k[0]: v for k, v in labels.partition_by("source_id", as_dict=True).items()}
    fam = {s: by_src[s]["family"][0] for s in ids}
    vocab = {s: set(by_src[s]["finding"].unique().to_list()) for s in ids}
    annotators = {s: by_src[s]["annotator"].unique().to_list() for s in ids}
    cov = {s: coverage.filter(pl.col("source_id") == s).select(image_key()) for s in ids}
    own = {}
    for s in ids:  # shared -> own names: the findings table, then label rows it lacks
        own[s] = own_names(findings, by_src[s], s, vocab[s])
        if neg[s] == "implicit":
            vocab[s] |= set(own[s]["finding"].to_list())
    keys = _Keys(annotators, {f for s in ids for f in vocab[s]})
    out: list[pl.DataFrame] = []
    metas: list[pl.DataFrame] = []
    no_overlap: list[tuple[str, str, list[str]]] = []
    for i, first in enumerate(ids):
        for second in ids[i:]:
            a, b = first, second  # swapped below when b is positive-only (not the loop names)
            common = sorted(vocab[a] & vocab[b])
            both_none = a != b and neg[a] == "none" and neg[b] == "none"
            shared_cats = both_none and compare_categories and fam[a] == "category"
            if (not common or fam[a] != fam[b] or (both_none and not shared_cats)
                    or frozenset((a, b)) in (skip or set())):
                continue
            la, lb = (by_src[x] if vocab[x] <= set(common) else  # no filter pass when all
                      by_src[x].filter(pl.col("finding").is_in(common)) for x in (a, b))
            if a == b and (len(annotators[a]) < 2 or neg[a] != "explicit"):
                continue
            if a != b and neg[a] == "implicit" and neg[b] == "implicit":
                both = cov[a].join(cov[b], on="img", how="semi")
                if both.height == 0:
                    no_overlap.append((a, b, common))
                    continue
                grid = both.join(pl.DataFrame({"finding": common}), how="cross")
                la = _dense(la, grid, a, own[a], ab.get(a, 0), abf.get(a))
                lb = _dense(lb, grid, b, own[b], ab.get(b, 0), abf.get(b))
            elif a != b and neg[a] == "implicit":
                la = _dense(la, lb.join(cov[a], on="img", how="semi"), a, own[a], ab.get(a, 0),
                            abf.get(a))
            elif a != b and neg[b] == "implicit":
                lb = _dense(lb, la.join(cov[b], on="img", how="semi"), b, own[b], ab.get(b, 0),
                            abf.get(b))
            if neg[b] == "none" and not shared_cats:  # the positive-only side always goes first
                a, b, la, lb = b, a, lb, la
            if a == b:
                j = _annotator_pairs(keys.side(la, "a", a))
            else:
                j = keys.side(la, "a", a).join(keys.side(lb, "b", b), on=["img", "fi"])
            if j.height == 0 and a != b and neg[a] != "none":
                no_overlap.append((a, b, common))
                continue
            j = j.with_columns(((pl.col("ra") * keys.nr + pl.col("rb")) * keys.nf + pl.col("fi"))
                               .alias("key"))
            out.append(j.select(ROW_COLS))
            fa = dict(zip(own[a]["finding"], own[a]["finding_own"]))
            fb = dict(zip(own[b]["finding"], own[b]["finding_own"]))
            m = _pair_keys(j["key"].to_numpy(), keys)
            inv_r = {v: k for k, v in keys.raters.items()}
            inv_f = {v: k for k, v in keys.findings.items()}
            ra, rb = [inv_r[x] for x in m["ra"]], [inv_r[x] for x in m["rb"]]
            fi = [inv_f[x] for x in m["fi"]]
            metas.append(pl.DataFrame({
                "key": m["key"], "family": [fam[a]] * m.height,
                "source_a": [r[0] for r in ra], "annotator_a": [r[1] for r in ra],
                "source_b": [r[0] for r in rb], "annotator_b": [r[1] for r in rb],
                "finding": fi, "finding_a": [fa.get(f) for f in fi],
                "finding_b": [fb.get(f) for f in fi],
                # compared on shared images like explicit sources (positive_only_categories)
                "negatives_a": ["explicit" if shared_cats else neg[a]] * m.height,
                "negatives_b": ["explicit" if shared_cats else neg[b]] * m.height,
            }))
    if not out:
        return (pl.DataFrame(schema={c: (pl.UInt64 if c == "img" else pl.Int64) for c in ROW_COLS}),
                pl.DataFrame(), no_overlap)
    return pl.concat(out, how="vertical_relaxed"), pl.concat(metas), no_overlap


def multi_rater_items(
    labels: pl.DataFrame, sources: pl.DataFrame
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Codes of sources with 2+ annotators (explicit negatives only).

    Returns
    -------
    (rows, meta)
        ``rows``: ``mk, img, c`` (one per annotator's answer; ``c`` null when excluded);
        ``meta``: ``mk, source_id, finding, finding_own, family`` per (source, finding).
    """
    explicit = sources.filter(pl.col("negatives") == "explicit")["source_id"]
    lab = labels.filter(pl.col("source_id").is_in(explicit.implode()))
    multi = sorted(s for s, n in lab.group_by("source_id").agg(pl.col("annotator").n_unique())
                   .iter_rows() if n >= 2)
    rows, metas = [], []
    base = 0  # mk = base + finding index: dense over all sources
    for sid in multi:
        r = lab.filter(pl.col("source_id") == sid)
        m = r.select("finding", "finding_own", "family").unique(subset="finding").sort("finding")
        m = m.with_columns(pl.int_range(m.height, dtype=pl.Int64).alias("fi"))
        fmap = dict(zip(m["finding"], m["fi"]))
        rows.append(r.select((base + pl.col("finding").replace_strict(
            fmap, return_dtype=pl.Int64)).alias("mk"), "img", "c"))
        metas.append(m.select((base + pl.col("fi")).alias("mk"),
                              pl.lit(sid).alias("source_id"), "finding", "finding_own", "family"))
        base += m.height
    if not rows:
        return pl.DataFrame(), pl.DataFrame()
    return pl.concat(rows), pl.concat(metas)


def subgroup_values(
    images: pl.DataFrame, ann_codes: pl.DataFrame, *, columns: list[str], bands: list[float],
    annotation_specs: list[dict[str, str]],
) -> pl.DataFrame:
    """``img, subgroup, subgroup_value`` for every subgroup definition that applies.

    ``columns`` are images columns (``age_band`` bins ``age`` by ``bands``); each annotation
    spec ``{source, finding}`` splits images by that source's label (``yes``/``no``/meaning).
    Images without a value are in no subgroup of that definition.
    """
    parts = []
    for col in columns:
        if col == "age_band" and "age" in images.columns:
            labels = [f"{lo:g}-{hi:g}" for lo, hi in itertools.pairwise(bands)]
            expr = pl.col("age").cut(bands[1:-1], labels=labels, left_closed=True).cast(pl.String)
            vals = images.select("image_id", expr.alias("subgroup_value"))
            vals = vals.filter(pl.col("subgroup_value").is_not_null() & pl.col("image_id").is_in(
                images.filter(pl.col("age").is_not_null())["image_id"].implode()))
        elif col in images.columns:
            vals = images.select("image_id", pl.col(col).cast(pl.String).alias("subgroup_value"))
        else:
            continue
        vals = vals.filter(pl.col("subgroup_value").is_not_null() & (pl.col("subgroup_value") != ""))
        if vals.height:
            parts.append(vals.with_columns(pl.lit(col).alias("subgroup")))
    for sp in annotation_specs:
        rows = ann_codes.filter((pl.col("source_id") == sp["source"])
                                & (pl.col("finding_own") == sp["finding"]))
        v = (pl.when(pl.col("value") == 1).then(pl.lit("yes"))
             .when(pl.col("value") == 0).then(pl.lit("no")).otherwise(pl.col("meaning")))
        vals = rows.select("image_id", v.fill_null("unknown").alias("subgroup_value")).unique(
            subset="image_id", keep="first")
        if vals.height:
            parts.append(vals.with_columns(pl.lit(f"{sp['source']}/{sp['finding']}").alias("subgroup")))
    if not parts:
        return pl.DataFrame(schema={"img": pl.UInt64, "subgroup": pl.String,
                                    "subgroup_value": pl.String})
    return pl.concat([p.select(image_key(), "subgroup", "subgroup_value") for p in parts])


def with_subgroups(rows: pl.DataFrame, sub: pl.DataFrame) -> pl.DataFrame:
    """The rows once for the whole set (``sg`` 0) and again for each subgroup they fall in
    (``sub``: ``img, sg``)."""
    base = rows.with_columns(pl.lit(0, pl.Int64).alias("sg"))
    if sub.height == 0 or rows.height == 0:
        return base
    return pl.concat([base, rows.join(sub, on="img", how="inner").select(base.columns)])
