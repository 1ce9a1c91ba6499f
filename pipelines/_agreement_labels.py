"""Label codes for the agreement stage: one integer-coded row per rater, image and finding.

Every rater is a (source, annotator). Its labels become integer codes per (image, shared
finding): ``c`` (nominal code for kappa: 0/1, 2 = uncertain, the ordinal step or the category
index; null = excluded) and ``o`` (ordinal step for weighted kappa; null when the scale is
not ordered). Families keep apples with apples: ``binary`` (binary, graded, derived),
``ordinal`` and ``category`` sources are only compared within their family.

Combined findings (``params.yaml: agreement.combined``) add, for a source that labels every
part but not the combination itself, the OR of the parts (e.g. NIH's Nodule OR Mass as
``nodule_or_mass``, Google's single "Nodule or mass" label).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import polars as pl

from medlake.catalog import CatalogError
from medlake.catalog.consensus import BinariseRule

FAMILY = {"binary": "binary", "graded": "binary", "ordinal": "ordinal", "category": "category"}
LABEL_COLS = ["source_id", "annotator", "img", "finding", "finding_own", "c", "o", "family",
              "negatives", "value", "category"]


def image_key(col: str = "image_id") -> pl.Expr:
    """A 64-bit integer per image id: joins and group-bys on it are far cheaper than on text
    (a collision among a million ids has a chance of about 3e-8)."""
    return pl.col(col).hash(seed=0x6D65646C616B65).alias("img")


_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: spreads a small id over 64 bits


def item_key(img: np.ndarray, group: np.ndarray) -> np.ndarray:
    """One uint64 per (image, small integer group): the image hash mixed with the group, so
    one 64-bit sort brings each (image, group) together."""
    return img ^ (group.astype(np.uint64) * _MIX)


def normalised(col: str) -> pl.Expr:
    """``'Pleural Effusion'`` -> ``'pleural_effusion'`` (as :func:`catalog.vocab.normalise`)."""
    return (pl.col(col).str.to_lowercase().str.replace_all(r"[^a-z0-9]+", "_")
            .str.strip_chars("_"))


def absent_codes(sources: pl.DataFrame) -> dict[str, int | None]:
    """The binary code an implicit-negative source's missing row stands for.

    From the ``code_map`` entry ``(absent)`` (as the ``labels_dense`` view reads it): its
    value >= 0.5 -> 1, < 0.5 -> 0, null -> None (excluded, e.g. CheXpert's not mentioned);
    no entry -> 0 (negative).
    """
    out: dict[str, int | None] = {}
    maps = sources["code_map"] if "code_map" in sources.columns else [None] * sources.height
    for sid, cm in zip(sources["source_id"], maps):
        code: int | None = 0
        try:
            entry = json.loads(cm).get("(absent)") if cm else None
        except (ValueError, AttributeError):
            entry = None
        if isinstance(entry, dict):
            v = entry.get("value")
            code = None if v is None else int(float(v) >= 0.5)
        out[sid] = code
    return out


def own_names(findings: pl.DataFrame, rows: pl.DataFrame, source_id: str,
              vocab: set[str] | None = None) -> pl.DataFrame:
    """``finding, finding_own`` of one source: its shared finding names mapped to its own, from
    the ``findings`` table, then from its label ``rows`` for shared names the table lacks
    (the first row wins). ``vocab``: the shared names of ``rows``, when known already."""
    f = findings.filter(pl.col("source_id") == source_id).select(
        pl.col("shared_finding").alias("finding"), pl.col("finding").alias("finding_own"))
    have = set(rows["finding"].unique().to_list()) if vocab is None else vocab
    lacking = sorted(have - set(f["finding"].to_list()))
    if lacking:
        f = pl.concat([f, rows.filter(pl.col("finding").is_in(lacking)).select(
            "finding", "finding_own")])
    return f.unique(subset="finding", keep="first", maintain_order=True)


def rater_labels(
    ann: pl.DataFrame, sources: pl.DataFrame, findings: pl.DataFrame, binarise: BinariseRule,
    policy: Any = None,
) -> pl.DataFrame:
    """Codes of every annotation row of one dataset (see the module docstring), in one pass.

    ``policy`` (a :class:`pipelines._agreement_policy.Resolved`, optional) applies the code
    policies of ``params.yaml: agreement.policies`` on top (by meaning or graded value; it
    needs ``ann.meaning`` for meaning rules).

    Returns :data:`LABEL_COLS`. Findings missing from the ``findings`` table keep their own
    name, normalised.
    """
    meta = sources.select("source_id", "value_type", "negatives")
    fmap = findings.select("source_id", pl.col("finding").alias("finding_own"),
                           pl.col("shared_finding").alias("finding")).unique(
        subset=["source_id", "finding_own"], keep="first")
    extra = ["meaning"] if policy is not None and "meaning" in ann.columns else []
    df = ann.select(
        "source_id", "annotator", image_key(), "value", "category",
        pl.col("finding").alias("finding_own"), *extra,
    ).join(fmap, on=["source_id", "finding_own"], how="left")
    if df["finding"].null_count():  # findings missing from the table: own name, normalised
        df = df.with_columns(pl.coalesce("finding", normalised("finding_own")).alias("finding"))
    df = df.join(meta, on="source_id", how="inner")
    if df.height == 0:
        return pl.DataFrame()
    if policy is not None:  # answers a policy makes a category of a category-valued source
        df = df.with_columns(policy.category_text(df).alias("category"))
    vt = pl.col("value_type")
    graded = df.filter(vt == "graded")["value"].drop_nulls().unique().sort()
    ordv = df.filter(vt == "ordinal")["value"].drop_nulls()
    ord_min = float(ordv.min()) if ordv.len() else 0.0  # type: ignore[arg-type]
    family = vt.replace_strict(FAMILY, default="category")
    cats = df.filter(family == "category")["category"].drop_nulls().unique().sort()
    v = pl.col("value")
    grade_idx = (v.replace_strict(graded.to_list(), list(range(graded.len())), default=None)
                 if graded.len() else pl.lit(None, pl.Int64))  # skip a per-row lookup when unused
    o = (
        pl.when(vt == "ordinal").then((v - ord_min).round(0))
        .when(vt == "graded").then(grade_idx).otherwise(None).cast(pl.Int32)
    )
    cat_idx = (pl.col("category").replace_strict(cats.to_list(), list(range(cats.len())),
                                                 default=None)
               if cats.len() else pl.lit(None, pl.Int64))
    c = (
        pl.when(vt == "graded").then(binarise.expr(v).cast(pl.Int32))
        .when(vt == "binary").then((v >= 0.5).cast(pl.Int32))
        .when(vt == "ordinal").then(o)
        .otherwise(cat_idx.cast(pl.Int32))
    )
    if policy is not None:
        c = policy.codes(df, c)
    return df.with_columns(c.alias("c"), o.alias("o"), family.alias("family")).select(LABEL_COLS)


def category_names(labels: pl.DataFrame) -> list[str]:
    """The category behind each code ``c`` of category-family rows (index = code)."""
    if labels.height == 0:
        return []
    cat = labels.filter(pl.col("family") == "category")["category"]
    return cat.drop_nulls().unique().sort().to_list()


def parse_combined(spec: Any) -> list[tuple[str, list[str]]]:
    """``params.yaml: agreement.combined`` -> ``[(shared name, [part, ...]), ...]``.

    Accepts ``[{finding: nodule_or_mass, of: [nodule, mass]}, ...]``.
    """
    out = []
    for i, item in enumerate(spec or []):
        if not isinstance(item, dict) or set(item) != {"finding", "of"} or not isinstance(
                item["of"], list) or len(item["of"]) < 2:
            raise CatalogError(
                f"params.yaml agreement.combined[{i}]: expected {{finding: NAME, of: [PART, "
                f"PART, ...]}} (shared finding names, two parts or more), got {item!r}")
        out.append((str(item["finding"]), [str(p) for p in item["of"]]))
    return out


def combine_findings(
    labels: pl.DataFrame, findings: pl.DataFrame, combos: list[tuple[str, list[str]]],
    absent: dict[str, int | None],
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Add the OR of several findings for sources that label every part but not the whole.

    Per (source, annotator, image): positive when any part is positive; negative when every
    part is a usable negative (for an implicit-negative source a missing part counts as its
    absent code); otherwise excluded (null). Only binary-family sources take part.

    Returns
    -------
    (labels, findings)
        With the combined rows appended (``finding_own`` = the parts' own names joined by
        ``' OR '``) and, for implicit-negative sources, a ``findings`` row so the combined
        finding is in their vocabulary.
    """
    if not combos or labels.height == 0:
        return labels, findings
    binary = set(labels.filter(pl.col("family") == "binary")["source_id"].unique().to_list())
    listed = set(findings["source_id"].to_list())
    vocab = pl.concat([  # the findings table, and label rows of sources missing from it
        findings.select("source_id", "finding", pl.col("shared_finding").alias("shared")),
        labels.filter(pl.col("source_id").is_in(sorted(binary - listed))).select(
            "source_id", pl.col("finding_own").alias("finding"),
            pl.col("finding").alias("shared")).unique(),
    ]).unique(subset=["source_id", "shared"], keep="first", maintain_order=True)
    new_labels, new_findings = [], []
    for name, parts in combos:
        for sid in sorted(binary):
            own = dict(vocab.filter(pl.col("source_id") == sid).select("shared", "finding").iter_rows())
            if name in own or not all(p in own for p in parts):
                continue
            rows = labels.filter((pl.col("source_id") == sid) & pl.col("finding").is_in(parts))
            implicit = rows.height > 0 and rows["negatives"][0] == "implicit"
            missing = absent.get(sid, 0) if implicit else None  # a part without a row
            g = rows.group_by("annotator", "img").agg(
                (pl.col("c") == 1).any().alias("pos"),
                (pl.col("c") == 0).sum().alias("neg"), pl.len().alias("n"),
                pl.col("negatives").first(),
            )
            n_missing = len(parts) - pl.col("n")
            c = (pl.when(pl.col("pos")).then(1)
                 .when((pl.col("neg") == len(parts)) | ((pl.col("neg") == pl.col("n"))
                                                        & (n_missing > 0) & (missing == 0)))
                 .then(0).otherwise(None).cast(pl.Int32))
            own_name = " OR ".join(own[p] for p in parts)
            new_labels.append(g.select(
                pl.lit(sid).alias("source_id"), "annotator", "img", pl.lit(name).alias("finding"),
                pl.lit(own_name).alias("finding_own"), c.alias("c"),
                pl.lit(None, pl.Int32).alias("o"), pl.lit("binary").alias("family"),
                "negatives", c.cast(pl.Float64).alias("value"),
                pl.lit(None, pl.String).alias("category"),
            ))
            new_findings.append({"source_id": sid, "finding": own_name, "shared_finding": name,
                                 "value_type": "binary"})
    if not new_labels:
        return labels, findings
    return (pl.concat([labels, *new_labels], how="vertical_relaxed"),
            pl.concat([findings, pl.DataFrame(new_findings)], how="diagonal_relaxed"))


def absent_fill(absent: int | None, by_finding: dict[str, int | None] | None = None) -> pl.Expr:
    """The code of a missing row: ``absent``, or per shared finding from ``by_finding``."""
    out = pl.lit(absent, pl.Int32)
    for f, code in sorted((by_finding or {}).items()):
        out = pl.when(pl.col("finding") == f).then(pl.lit(code, pl.Int32)).otherwise(out)
    return out


def densify_annotators(
    labels: pl.DataFrame, coverage: pl.DataFrame, findings: pl.DataFrame,
    absent: dict[str, int | None],
    absent_by_finding: dict[str, dict[str, int | None]] | None = None,
) -> tuple[pl.DataFrame, set[str]]:
    """Make implicit-negative sources with several annotators explicit (as ``labels_dense``).

    Annotator pairs, Fleiss' kappa and Krippendorff's alpha need every reader's answer on
    every finding of the source's vocabulary. The (image, annotator) pairs judged come from
    ``coverage.annotator`` when the table has it, else from the annotation rows; a missing
    (image, annotator, finding) gets the source's absent code (``absent_by_finding``:
    per source and shared finding, from finding-level policies); a row that exists keeps its
    code, even a null one (excluded).

    Returns
    -------
    (labels, sources_made_explicit)
    """
    if labels.height == 0:
        return labels, set()
    imp = labels.filter((pl.col("negatives") == "implicit") & (pl.col("annotator") != ""))
    ids = sorted(imp["source_id"].unique().to_list())
    if not ids:
        return labels, set()
    parts = [labels.filter(~pl.col("source_id").is_in(ids))]
    for sid in ids:
        rows = labels.filter(pl.col("source_id") == sid)
        if "annotator" in coverage.columns:
            judged = coverage.filter(pl.col("source_id") == sid).select(
                "annotator", image_key()).unique()
        else:
            judged = rows.select("annotator", "img").unique()
        own = own_names(findings, rows, sid)
        first = rows.row(0, named=True)
        dense = judged.join(own, how="cross").join(
            rows.select("annotator", "img", "finding", "c", "o", "value", "category",
                        pl.lit(True).alias("_row")),
            on=["annotator", "img", "finding"], how="left",
        ).with_columns(
            pl.when(pl.col("_row")).then(pl.col("c")).otherwise(
                absent_fill(absent.get(sid, 0), (absent_by_finding or {}).get(sid))).alias("c"),
            pl.lit(sid).alias("source_id"), pl.lit(first["family"]).alias("family"),
            pl.lit("explicit").alias("negatives"),
        )
        parts.append(dense.select(LABEL_COLS))
    return pl.concat(parts, how="vertical_relaxed"), set(ids)
