"""Label codes and pair rows for the agreement stage (pure functions on Polars frames).

Every rater is a (source, annotator). Its labels become integer codes per (image, shared
finding): ``c`` (nominal code for kappa: 0/1, 2 = uncertain, the ordinal step or the category
index; null = excluded) and ``o`` (ordinal step for weighted kappa; null when the scale is
not ordered). Families keep apples with apples: ``binary`` (binary, graded, derived),
``ordinal`` and ``category`` sources are only compared within their family.
"""

from __future__ import annotations

import polars as pl

from catalog.consensus import BinariseRule

FAMILY = {"binary": "binary", "graded": "binary", "ordinal": "ordinal", "category": "category"}
LABEL_COLS = ["source_id", "annotator", "image_id", "finding", "finding_own", "c", "o"]
PAIR_KEYS = ["family", "source_a", "annotator_a", "source_b", "annotator_b", "finding",
             "finding_a", "finding_b"]


def rater_labels(
    ann: pl.DataFrame, sources: pl.DataFrame, findings: pl.DataFrame, binarise: BinariseRule
) -> pl.DataFrame:
    """Codes of every annotation row of one dataset (see the module docstring).

    Rows of sources whose findings are not in the ``findings`` table keep their own name,
    normalised the way the vocabulary does it.
    """
    s = sources.select("source_id", "negatives", "value_type")
    df = (
        ann.join(s, on="source_id", how="inner")
        .join(findings.select("source_id", "finding", "shared_finding"),
              on=["source_id", "finding"], how="left")
        .with_columns(
            pl.col("finding").alias("finding_own"),
            pl.coalesce("shared_finding", pl.col("finding").str.to_lowercase()
                        .str.replace_all(r"[^a-z0-9]+", "_").str.strip_chars("_")).alias("finding"),
            pl.col("value_type").replace_strict(FAMILY, default="category").alias("family"),
        )
    )
    graded = df.filter(pl.col("value_type") == "graded")["value"].drop_nulls().unique().sort()
    ordv = df.filter(pl.col("value_type") == "ordinal")["value"].drop_nulls()
    ord_min = float(ordv.min()) if ordv.len() else 0.0  # type: ignore[arg-type]
    cats = df.filter(pl.col("family") == "category")["category"].drop_nulls().unique().sort()
    cat_idx = pl.DataFrame({"category": cats, "_ci": pl.int_range(cats.len(), eager=True)})
    df = df.join(cat_idx, on="category", how="left")
    v, vt = pl.col("value"), pl.col("value_type")
    grade_idx = v.replace_strict(graded.to_list(), list(range(graded.len())), default=None)
    o = (
        pl.when(vt == "ordinal").then((v - ord_min).round(0))
        .when(vt == "graded").then(grade_idx).otherwise(None).cast(pl.Int32)
    )
    c = (
        pl.when(vt == "graded").then(binarise.expr(v).cast(pl.Int32))
        .when(vt == "binary").then((v >= 0.5).cast(pl.Int32))
        .when(vt == "ordinal").then(o)
        .otherwise(pl.col("_ci").cast(pl.Int32))
    )
    return df.with_columns(c.alias("c"), o.alias("o")).select(
        [*LABEL_COLS, "negatives", "family", "value"]
    )


def _side(df: pl.DataFrame, side: str) -> pl.DataFrame:
    return df.rename({"source_id": f"source_{side}", "annotator": f"annotator_{side}",
                      "finding_own": f"finding_{side}", "c": f"c{side}", "o": f"o{side}"})


def _dense(
    rows: pl.DataFrame, covered: pl.DataFrame, source_id: str, own: pl.DataFrame
) -> pl.DataFrame:
    """An implicit-negative source's codes on the (image, finding) keys of ``covered``.

    ``own`` maps the source's shared finding names to its own (``finding, finding_own``).
    """
    pos = rows.select("image_id", "finding", "annotator", "finding_own", "c", "o")
    out = (
        covered.select("image_id", "finding").unique()
        .join(own, on="finding", how="inner")
        .join(pos.drop("finding_own"), on=["image_id", "finding"], how="left")
        .with_columns(
            pl.lit(source_id).alias("source_id"), pl.col("annotator").fill_null(""),
            pl.col("c").fill_null(0),  # covered and no row: negative
        )
    )
    return out.select(LABEL_COLS)


def source_pairs(
    labels: pl.DataFrame, sources: pl.DataFrame, coverage: pl.DataFrame, findings: pl.DataFrame
) -> tuple[pl.DataFrame, list[tuple[str, str, list[str]]]]:
    """Pair rows (one per image, finding and rater pair) for every two sources of a dataset.

    An implicit-negative source's vocabulary comes from ``findings`` (a finding it never
    marks positive is still one it judged); the others' from their annotation rows.

    Returns
    -------
    (pairs, no_overlap)
        ``pairs`` has :data:`PAIR_KEYS`, ``negatives_a/_b``, ``image_id, ca, cb, oa, ob``;
        ``no_overlap`` lists (source_a, source_b, findings) that share findings but no
        image (they are compared by prevalence instead).
    """
    neg = dict(zip(sources["source_id"].to_list(), sources["negatives"].to_list()))
    ids = sorted(set(labels["source_id"].unique().to_list()))
    by_src = {s: labels.filter(pl.col("source_id") == s) for s in ids}
    fam = {s: by_src[s]["family"][0] for s in ids}
    vocab = {s: set(by_src[s]["finding"].unique().to_list()) for s in ids}
    own = {}
    for s in ids:
        f = findings.filter(pl.col("source_id") == s).select(
            pl.col("shared_finding").alias("finding"), pl.col("finding").alias("finding_own"))
        own[s] = pl.concat([f, by_src[s].select("finding", "finding_own")]).unique(
            subset="finding", keep="first")
        if neg[s] == "implicit":
            vocab[s] |= set(own[s]["finding"].to_list())
    cov = {s: coverage.filter(pl.col("source_id") == s).select("image_id") for s in ids}
    out: list[pl.DataFrame] = []
    no_overlap: list[tuple[str, str, list[str]]] = []
    for i, a in enumerate(ids):
        for b in ids[i:]:
            common = sorted(vocab[a] & vocab[b])
            if not common or fam[a] != fam[b]:
                continue
            la = by_src[a].filter(pl.col("finding").is_in(common)).select(LABEL_COLS)
            lb = by_src[b].filter(pl.col("finding").is_in(common)).select(LABEL_COLS)
            if a == b:
                if la["annotator"].n_unique() < 2 or neg[a] != "explicit":
                    continue
                j = _side(la, "a").join(_side(lb, "b"), on=["image_id", "finding"])
                j = j.filter(pl.col("annotator_a") < pl.col("annotator_b"))
            else:
                if neg[a] == "implicit" and neg[b] == "implicit":
                    both = cov[a].join(cov[b], on="image_id", how="semi")
                    if both.height == 0:
                        no_overlap.append((a, b, common))
                        continue
                    keys = both.join(pl.DataFrame({"finding": common}), how="cross")
                    la, lb = _dense(la, keys, a, own[a]), _dense(lb, keys, b, own[b])
                elif neg[a] == "implicit":
                    la = _dense(la, lb.join(cov[a], on="image_id", how="semi"), a, own[a])
                elif neg[b] == "implicit":
                    lb = _dense(lb, la.join(cov[b], on="image_id", how="semi"), b, own[b])
                if neg[a] == "none" and neg[b] == "none":
                    continue  # two positive-only sources: nothing valid to compare
                if neg[b] == "none":  # the positive-only side always goes first
                    a, b, la, lb = b, a, lb, la
                j = _side(la, "a").join(_side(lb, "b"), on=["image_id", "finding"])
                if j.height == 0 and neg[a] != "none":
                    no_overlap.append((a, b, common))
                    continue
            out.append(j.with_columns(
                pl.lit(fam[a]).alias("family"), pl.lit(neg[a]).alias("negatives_a"),
                pl.lit(neg[b]).alias("negatives_b"),
            ))
    cols = [*PAIR_KEYS, "negatives_a", "negatives_b", "image_id", "ca", "cb", "oa", "ob"]
    if not out:
        return pl.DataFrame(schema={c: (pl.Int32 if c in ("ca", "cb", "oa", "ob") else pl.String)
                                    for c in cols}), no_overlap
    return pl.concat([o.select(cols) for o in out], how="vertical_relaxed"), no_overlap


def multi_rater_items(labels: pl.DataFrame, sources: pl.DataFrame) -> pl.DataFrame:
    """Per (source with 2+ annotators, finding, image): the annotators' codes as a list."""
    explicit = sources.filter(pl.col("negatives") == "explicit")["source_id"]
    multi = (labels.filter(pl.col("source_id").is_in(explicit.implode()))
             .group_by("source_id").agg(pl.col("annotator").n_unique().alias("n"))
             .filter(pl.col("n") >= 2))
    return (
        labels.join(multi, on="source_id", how="semi")
        .group_by(["source_id", "finding", "image_id"])
        .agg(pl.col("family").first(), pl.col("finding_own").first(), pl.col("c"),
             pl.col("annotator").n_unique().alias("n_raters"))
    )


def subgroup_values(
    images: pl.DataFrame, ann_codes: pl.DataFrame, *, columns: list[str], bands: list[float],
    annotation_specs: list[dict[str, str]],
) -> pl.DataFrame:
    """``image_id, subgroup, subgroup_value`` for every subgroup definition that applies.

    ``columns`` are images columns (``age_band`` bins ``age`` by ``bands``); each annotation
    spec ``{source, finding}`` splits images by that source's label (``yes``/``no``/meaning).
    Images without a value are in no subgroup of that definition.
    """
    parts = []
    for col in columns:
        if col == "age_band" and "age" in images.columns:
            labels = [f"{lo:g}-{hi:g}" for lo, hi in zip(bands[:-1], bands[1:])]
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
        return pl.DataFrame(schema={"image_id": pl.String, "subgroup_value": pl.String,
                                    "subgroup": pl.String})
    return pl.concat([p.select("image_id", "subgroup_value", "subgroup") for p in parts])
