"""Tube annotations on PadChest images (purrlab/chestxr-label-reliability).

Two non-expert annotators marked 1,011 PadChest chest X-rays for four tubes (chest drain,
nasogastric, endotracheal, tracheostomy) with a confidence grade 0, 0.25, 0.5, 0.75 or 1
(``Annotations_raw.csv``, with a free-text note per annotator); ``Annotations_aggregated.csv``
is their consensus: 1 / 0 where they agree and -1 where they disagree. The tubes matter as
shortcuts: a chest drain often marks a pneumothorax that has already been treated.

Both formats label images of the ``padchest`` dataset (``padchest:<ImageID>``), which must be
ingested first.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from medlake.catalog import Catalog, FileReport, IngestResult, Quarantine, publish
from medlake.catalog.ingestkit import findings_rows
from medlake.pipelines.adapters import Adapter
from medlake.pipelines.adapters._csv import (
    ROW,
    blank,
    code_map,
    dedupe,
    link_to_images,
    quarantine_where,
    read_csv,
    stop_if_strict,
)

DATASET = "padchest"
ANNOTATORS = ("a1", "a2")
RAW_FINDINGS = ["Chest_drain_tube", "NSG_tube", "Endotracheal_tube", "Tracheostomy_tube"]
AGG_FINDINGS = ["Chest_drain", "NSG_tube", "Endotracheal_tube", "Tracheostomy_tube"]
GRADES = {0.0: "absent", 0.25: "probably_absent", 0.5: "unsure", 0.75: "probably_present", 1.0: "present"}
CONSENSUS = {"1": (1.0, "positive"), "0": (0.0, "negative"), "-1": (None, "annotators_disagree")}


def _annotations(
    df: pl.DataFrame, *, source_id: str, annotator: str, findings: dict[str, str],
    value: pl.Expr, meaning: pl.Expr, invalid: pl.Expr, note: pl.Expr,
) -> pl.DataFrame:
    """Long rows for one annotator: ``findings`` maps finding name -> column; ``value`` etc.
    are expressions over a column named ``_raw``."""
    return pl.concat([
        df.select(pl.col("image_id"), pl.col(col).alias("_raw"), note.alias("note"))
        .select(
            pl.col("image_id"), pl.lit(source_id).alias("source_id"),
            pl.lit(annotator).alias("annotator"), pl.lit(f).alias("finding"),
            value.alias("value"), pl.col("_raw").alias("raw_value"), meaning.alias("meaning"),
            invalid.alias("is_invalid"), pl.col("note"),
        )
        for f, col in findings.items()
    ])


def _grade(raw: pl.Expr) -> pl.Expr:
    """The raw text as a grade when it is one of :data:`GRADES`, else null."""
    v = raw.str.strip_chars().cast(pl.Float64, strict=False)
    return pl.when(v.is_in(list(GRADES))).then(v).otherwise(None)


def ingest_raw(
    cat: Catalog, path: Path, *, dataset_id: str = DATASET, strict: bool = False
) -> IngestResult:
    """Ingest ``Annotations_raw.csv``: two annotators' tube grades and notes (``tubes_raw``).

    Parameters
    ----------
    cat
        The catalog; dataset ``dataset_id`` (PadChest) must be ingested already.
    path
        ``Annotations_raw.csv`` (unnamed index, ImageDir, ImageID, ``<tube>_a1`` x 4,
        Notes_a1, ``<tube>_a2`` x 4, Notes_a2).
    dataset_id
        The dataset whose images are labelled (default ``padchest``).
    strict
        Raise :class:`catalog.IngestError` at the first bad row instead of quarantining it.

    Returns
    -------
    IngestResult
        Rows read = ingested + quarantined. A grade other than 0/0.25/0.5/0.75/1 is a real
        (if unusable) answer: it is kept with ``is_invalid`` true, value null and its raw text.

    Raises
    ------
    SchemaError
        A column is missing.
    IngestError
        (``strict``) the first bad row: empty or repeated ImageID, or an image not in
        ``dataset_id``.
    """
    file = path.name
    cols = {a: {f: f"{f}_{a}" for f in RAW_FINDINGS} for a in ANNOTATORS}
    notes = {a: f"Notes_{a}" for a in ANNOTATORS}
    q = Quarantine(dataset_id)
    df, total = read_csv(path, ["ImageID", *[c for a in ANNOTATORS for c in [*cols[a].values(), notes[a]]]], q,
                         ids=["ImageID"])
    df = df.with_columns(pl.col("ImageID").str.strip_chars())
    df = quarantine_where(q, file, df, blank("ImageID"), "empty ImageID", ROW, total=total)
    df = dedupe(q, file, df, "ImageID", total=total)
    df = link_to_images(cat, q, file, df, dataset_id=dataset_id, native_col="ImageID", total=total)
    source_id = f"{dataset_id}:tubes_raw"
    grade = _grade(pl.col("_raw"))
    meaning = (
        pl.when(blank("_raw")).then(pl.lit("not_answered"))
        .when(grade.is_null()).then(pl.lit("invalid"))
        .otherwise(grade.replace_strict(GRADES, default=None, return_dtype=pl.String))
    )
    ann = pl.concat([
        _annotations(
            df, source_id=source_id, annotator=a, findings=cols[a], value=grade, meaning=meaning,
            invalid=grade.is_null(),
            note=pl.col(notes[a]).str.strip_chars().replace("", None),
        )
        for a in ANNOTATORS
    ]).with_columns(pl.lit(None, pl.String).alias("category"))
    n_invalid = int(ann["is_invalid"].sum())
    sources = [{
        "source_id": source_id, "dataset_id": dataset_id, "name": "tubes_raw",
        "kind": "non_expert", "exhaustive": True, "negatives": "explicit", "value_type": "graded",
        "rule": "two non-expert annotators (a1, a2) each grade every image for four tubes: "
                "0 absent, 0.25 probably absent, 0.5 unsure, 0.75 probably present, 1 present; "
                "any other answer is kept with is_invalid true and value null; each annotator's "
                "free-text note (Notes_a1 / Notes_a2) is in annotations.note",
        "description": "purrlab tube annotations on PadChest, per annotator "
                       "(Annotations_raw.csv, chestxr-label-reliability)",
        "code_map": code_map({str(k): (k, m) for k, m in GRADES.items()}),
        "file": file,
    }]
    stop_if_strict(q, file, strict=strict, total=total)
    report = FileReport(file, total, df.height, q.count(file))
    return publish(
        cat, adapter="tubes-raw", dataset_id=dataset_id, partition=f"{dataset_id}--tubes-raw",
        tables={
            "sources": sources, "annotations": ann,
            "coverage": df.select("image_id", pl.lit(source_id).alias("source_id")),
            "findings": findings_rows(cat, source_id, RAW_FINDINGS, "graded"),
        },
        quarantine=q, files=[report],
        messages=[f"{n_invalid:,} of {ann.height:,} grades are not 0/0.25/0.5/0.75/1 (is_invalid)"],
    )


def ingest_aggregated(
    cat: Catalog, path: Path, *, dataset_id: str = DATASET, strict: bool = False
) -> IngestResult:
    """Ingest ``Annotations_aggregated.csv``: the two annotators' consensus (``tubes_consensus``).

    Parameters
    ----------
    cat
        The catalog; dataset ``dataset_id`` (PadChest) must be ingested already.
    path
        ``Annotations_aggregated.csv`` (unnamed index, ImageID, ImageDir, ImagePath,
        Chest_drain, NSG_tube, Endotracheal_tube, Tracheostomy_tube).
    dataset_id
        The dataset whose images are labelled (default ``padchest``).
    strict
        Raise :class:`catalog.IngestError` at the first bad row instead of quarantining it.

    Returns
    -------
    IngestResult
        Rows read = ingested + quarantined. ``-1`` (the annotators disagree) is stored as value
        null with meaning ``annotators_disagree``.

    Raises
    ------
    SchemaError
        A column is missing.
    IngestError
        (``strict``) the first bad row: empty or repeated ImageID, a value other than
        1 / 0 / -1, or an image not in ``dataset_id``.
    """
    file = path.name
    q = Quarantine(dataset_id)
    df, total = read_csv(path, ["ImageID", *AGG_FINDINGS], q, ids=["ImageID"])
    df = df.with_columns(pl.col(c).str.strip_chars() for c in ["ImageID", *AGG_FINDINGS])
    df = df.with_columns(pl.col(c).str.replace(r"^(-?\d)\.0+$", "${1}") for c in AGG_FINDINGS)
    df = quarantine_where(q, file, df, blank("ImageID"), "empty ImageID", ROW, total=total)
    df = dedupe(q, file, df, "ImageID", total=total)
    for c in AGG_FINDINGS:
        df = quarantine_where(
            q, file, df, ~pl.col(c).is_in(list(CONSENSUS)) | pl.col(c).is_null(),
            pl.lit(f"{c} is not 1, 0 or -1 (disagree): '") + pl.col(c).fill_null("") + pl.lit("'"),
            "ImageID", total=total,
        )
    df = link_to_images(cat, q, file, df, dataset_id=dataset_id, native_col="ImageID", total=total)
    source_id = f"{dataset_id}:tubes_consensus"
    raw = pl.col("_raw")
    ann = _annotations(
        df, source_id=source_id, annotator="", findings={f: f for f in AGG_FINDINGS},
        value=raw.replace_strict({k: v for k, (v, _) in CONSENSUS.items()}, return_dtype=pl.Float64),
        meaning=raw.replace_strict({k: m for k, (_, m) in CONSENSUS.items()}, return_dtype=pl.String),
        invalid=pl.lit(False), note=pl.lit(None, pl.String),
    ).with_columns(pl.lit(None, pl.String).alias("category"))
    disagree = ann.filter(pl.col("meaning") == "annotators_disagree").height
    sources = [{
        "source_id": source_id, "dataset_id": dataset_id, "name": "tubes_consensus",
        "kind": "non_expert", "exhaustive": True, "negatives": "explicit", "value_type": "binary",
        "rule": "consensus of the two non-expert annotators of tubes_raw, as published: each "
                "grade reads as present (0.75, 1), absent (0, 0.25) or undecided (0.5); 1 when "
                "both read present, 0 when both read absent, -1 otherwise (stored as value "
                "null, meaning 'annotators_disagree'). This rule reproduces every published "
                "value from Annotations_raw.csv",
        "description": "purrlab tube annotations on PadChest, aggregated "
                       "(Annotations_aggregated.csv, chestxr-label-reliability)",
        "code_map": code_map(CONSENSUS), "file": file,
    }]
    stop_if_strict(q, file, strict=strict, total=total)
    report = FileReport(file, total, df.height, q.count(file))
    return publish(
        cat, adapter="tubes-aggregated", dataset_id=dataset_id,
        partition=f"{dataset_id}--tubes-aggregated",
        tables={
            "sources": sources, "annotations": ann,
            "coverage": df.select("image_id", pl.lit(source_id).alias("source_id")),
            "findings": findings_rows(cat, source_id, AGG_FINDINGS, "binary"),
        },
        quarantine=q, files=[report],
        messages=[f"{disagree:,} of {ann.height:,} (image, tube) pairs: annotators disagree"],
    )


ADAPTERS = [
    Adapter(
        name="tubes-raw", dataset_id=DATASET, run=ingest_raw, links_to="padchest",
        description="purrlab tube grades on PadChest images, two non-expert annotators, with notes",
        default_path="purrlab_tubes/Annotations_raw.csv",
    ),
    Adapter(
        name="tubes-aggregated", dataset_id=DATASET, run=ingest_aggregated, links_to="padchest",
        description="purrlab tube consensus on PadChest images (1 / 0 / -1 = annotators disagree)",
        default_path="purrlab_tubes/Annotations_aggregated.csv",
    ),
]
