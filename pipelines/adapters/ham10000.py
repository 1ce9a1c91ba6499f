"""HAM10000: ``HAM10000_metadata.csv`` (dermoscopic images, lesions, diagnoses).

10,015 dermoscopic images of 7,470 lesions (Tschandl et al., Sci. Data 2018). Several images
often show the same lesion, so ``group_id`` is the lesion (``ham10000:<lesion_id>``): a split
that puts two images of one lesion on both sides leaks. Each image has one of seven
diagnoses; ``dx_type`` says how that diagnosis was confirmed, which is kept per image (in
``images.meta`` and as the annotation's ``meaning``, e.g. ``confirmed_by:histo``).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from medlake.catalog import Catalog, FileReport, IngestResult, Quarantine, publish
from medlake.catalog.ingestkit import findings_rows
from medlake.pipelines.adapters import Adapter
from medlake.pipelines.adapters._csv import (
    AGE_RANGE,
    ROW,
    blank,
    code_map,
    dedupe,
    parse_number,
    quarantine_where,
    read_csv,
    stop_if_strict,
)

DATASET = "ham10000"
COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
# The seven diagnoses (codes as in the release) and their names.
DX = {
    "akiec": "actinic keratoses and intraepithelial carcinoma (Bowen's disease)",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesions",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevi",
    "vasc": "vascular lesions",
}
# How a diagnosis was confirmed (the release's dx_type).
DX_TYPES = {
    "histo": "histopathology",
    "follow_up": "follow-up examination (no change over time)",
    "consensus": "expert consensus",
    "confocal": "in-vivo confocal microscopy",
}
# Values the release uses for "not recorded"; stored as null in images.sex / images.site.
UNKNOWN = "unknown"
DATASET_ROW = {
    "name": "HAM10000",
    "modality": "dermoscopy",
    "source": "HAM10000_metadata.csv (Harvard Dataverse release, via a public GitHub copy)",
    "license": "not stated in source; HAM10000 is distributed by its authors (Harvard Dataverse)",
    "citation": "Tschandl P., Rosendahl C., Kittler H. The HAM10000 dataset. Sci. Data 5, 180161 (2018).",
    "description": "10,015 dermoscopic images of 7,470 pigmented lesions, 7 diagnoses.",
}


def ingest(
    cat: Catalog, path: Path, *, dataset_id: str = DATASET, strict: bool = False
) -> IngestResult:
    """Ingest ``HAM10000_metadata.csv``: images (lesion groups), the ``dx`` diagnosis source.

    Parameters
    ----------
    cat
        The catalog to write to.
    path
        ``HAM10000_metadata.csv`` (columns lesion_id, image_id, dx, dx_type, age, sex,
        localization).
    dataset_id
        Dataset id (default ``ham10000``).
    strict
        Raise :class:`catalog.IngestError` at the first bad row instead of quarantining it.

    Returns
    -------
    IngestResult
        Rows read = ingested + quarantined; tables written with their row counts.

    Raises
    ------
    SchemaError
        A column is missing.
    IngestError
        The file is not CSV, or (``strict``) a row is bad: empty or repeated image id, empty
        lesion id, unknown ``dx`` or ``dx_type`` code, unparseable age.
    """
    file = path.name
    q = Quarantine(dataset_id)
    df, total = read_csv(path, COLUMNS, q, ids=["image_id"])
    df = df.with_columns(
        pl.col(c).str.strip_chars() for c in ("lesion_id", "image_id", "dx", "dx_type")
    )
    df = quarantine_where(q, file, df, blank("image_id"), "empty image_id", ROW, total=total)
    df = dedupe(q, file, df, "image_id", total=total)
    df = quarantine_where(q, file, df, blank("lesion_id"), "empty lesion_id", "image_id", total=total)
    df = quarantine_where(
        q, file, df, ~pl.col("dx").is_in(list(DX)) | pl.col("dx").is_null(),
        pl.lit("unknown dx code '") + pl.col("dx").fill_null("") + pl.lit(f"' (known: {', '.join(DX)})"),
        "image_id", total=total,
    )
    df = quarantine_where(
        q, file, df, ~pl.col("dx_type").is_in(list(DX_TYPES)) | pl.col("dx_type").is_null(),
        pl.lit("unknown dx_type '") + pl.col("dx_type").fill_null("")
        + pl.lit(f"' (known: {', '.join(DX_TYPES)})"),
        "image_id", total=total,
    )
    df = parse_number(q, file, df, "age", alias="_age", lo=AGE_RANGE[0], hi=AGE_RANGE[1],
                      item="image_id", total=total)

    def known(col: str) -> pl.Expr:
        v = pl.col(col).str.strip_chars()
        return pl.when(blank(col) | (v.str.to_lowercase() == UNKNOWN)).then(None).otherwise(v)

    images = df.select(
        (pl.lit(dataset_id + ":") + pl.col("image_id")).alias("image_id"),
        pl.lit(dataset_id).alias("dataset_id"),
        pl.col("image_id").alias("native_id"),
        (pl.lit(dataset_id + ":") + pl.col("lesion_id")).alias("group_id"),
        known("sex").alias("sex"),
        pl.col("_age").alias("age"),
        known("localization").alias("site"),
        pl.lit("dermoscopy").alias("modality"),
        pl.struct(pl.col("dx_type"), pl.col("lesion_id")).struct.json_encode().alias("meta"),
    )
    source_id = f"{dataset_id}:dx"
    ann = df.select(
        (pl.lit(dataset_id + ":") + pl.col("image_id")).alias("image_id"),
        pl.lit(source_id).alias("source_id"),
        pl.lit("").alias("annotator"),
        pl.lit("dx").alias("finding"),
        pl.lit(None, pl.Float64).alias("value"),
        pl.col("dx").alias("category"),
        pl.col("dx").alias("raw_value"),
        (pl.lit("confirmed_by:") + pl.col("dx_type")).alias("meaning"),
        pl.lit(False).alias("is_invalid"),
    )
    confirmed = "; ".join(f"{k} = {v}" for k, v in DX_TYPES.items())
    sources = [{
        "source_id": source_id, "dataset_id": dataset_id, "name": "dx", "kind": "expert",
        "exhaustive": True, "negatives": "explicit", "value_type": "category",
        "rule": "one diagnosis per image (annotations.category, a dx code); how it was "
                "confirmed varies per image and is stored as annotations.meaning "
                f"'confirmed_by:<dx_type>' and in images.meta.dx_type ({confirmed}). "
                "More than half are histopathology-confirmed; the rest rest on follow-up, "
                "expert consensus or confocal microscopy, so they are weaker labels.",
        "description": "HAM10000 ground-truth diagnosis (Tschandl et al. 2018)",
        "code_map": code_map({k: (None, v) for k, v in DX.items()}),
        "file": file,
    }]
    stop_if_strict(q, file, strict=strict, total=total)
    report = FileReport(file, total, df.height, q.count(file))
    by_type = df.group_by("dx_type").len().sort("dx_type")
    return publish(
        cat, adapter="ham10000", dataset_id=dataset_id, partition=dataset_id,
        tables={
            "datasets": [{"dataset_id": dataset_id, **DATASET_ROW}],
            "images": images,
            "sources": sources,
            "annotations": ann,
            "coverage": images.select("image_id", pl.lit(source_id).alias("source_id")),
            "findings": findings_rows(cat, source_id, ["dx"], "category"),
        },
        quarantine=q, files=[report],
        messages=[
            f"{images['group_id'].n_unique():,} lesions",
            "diagnosis confirmed by: " + ", ".join(
                f"{t} {n:,}" for t, n in zip(by_type["dx_type"], by_type["len"])
            ),
        ],
    )


ADAPTERS = [
    Adapter(
        name="ham10000", dataset_id=DATASET, run=ingest,
        description="HAM10000 metadata CSV: dermoscopic images, lesions, 7 diagnoses",
        default_path="ham10000/HAM10000_metadata.csv",
    )
]
