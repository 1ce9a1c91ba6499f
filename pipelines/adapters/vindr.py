"""VinDr-CXR (VinBigData Kaggle competition, train): ``train.csv``.

15,000 chest X-rays (Vietnam), each read independently by 3 of 17 radiologists (``rad_id``)
who boxed 14 findings or marked 'No finding'; one CSV row per box (67,914 rows). Each reader
is exhaustive over the 15 class names, so the adapter writes dense rows per (image, reader,
finding): 1 with the boxes as JSON in raw_value, or 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from medlake.catalog import Catalog, FileReport, IngestResult, Quarantine, publish
from medlake.catalog.ingestkit import findings_rows
from medlake.pipelines.adapters import Adapter
from medlake.pipelines.adapters._csv import (
    ROW,
    blank,
    code_map,
    dedupe,
    finite,
    quarantine_where,
    read_csv,
)
from medlake.pipelines.adapters.nih_linked import boxes_json, no_options, raise_if_strict

DATASET = "vindr-cxr"
NO_FINDING = "No finding"
CLASSES = {
    "Aortic enlargement": "0", "Atelectasis": "1", "Calcification": "2", "Cardiomegaly": "3",
    "Consolidation": "4", "ILD": "5", "Infiltration": "6", "Lung Opacity": "7",
    "Nodule/Mass": "8", "Other lesion": "9", "Pleural effusion": "10",
    "Pleural thickening": "11", "Pneumothorax": "12", "Pulmonary fibrosis": "13",
    NO_FINDING: "14",
}
BOX = ["x_min", "y_min", "x_max", "y_max"]
COLUMNS = ["image_id", "class_name", "class_id", "rad_id", *BOX]
DATASET_ROW = {
    "name": "VinDr-CXR (VinBigData competition train)",
    "modality": "CXR",
    "source": "VinBigData / Kaggle; metadata via torchxrayvision 1.5.7",
    "license": "PhysioNet Credentialed Health Data License / Kaggle terms (not stated in source)",
    "citation": "Nguyen H.Q. et al. VinDr-CXR: An open dataset of chest X-rays with "
                "radiologist's annotations. Scientific Data 2022.",
    "description": "15,000 chest X-rays, each boxed independently by 3 of 17 radiologists for "
                   "14 findings or 'No finding'.",
}


def ingest(
    cat: Catalog, path: Path, *, dataset_id: str = DATASET, strict: bool = False,
    **options: Any,
) -> IngestResult:
    """Ingest the VinDr-CXR box list: one annotator per radiologist, dense binary rows.

    Parameters
    ----------
    cat
        The catalog.
    path
        ``train.csv`` (plain or .gz): image_id, class_name, class_id, rad_id, box corners.
    dataset_id
        Dataset id (default ``vindr-cxr``).
    strict
        Raise at the first bad row instead of quarantining it.

    Returns
    -------
    IngestResult
        Partition ``<dataset_id>``: images, source ``<dataset_id>:radiologists`` with
        ``annotator`` = rad_id and 15 rows per (image, reader).

    Raises
    ------
    SchemaError
        Missing columns. ``IngestError``: unreadable file, unknown option, ``strict`` and a
        bad row.
    """
    no_options("vindr-cxr", options)
    file = path.name
    q = Quarantine(dataset_id)
    df, total = read_csv(path, COLUMNS, q, ids=["image_id"])
    df = df.with_columns(
        [pl.col(c).str.strip_chars() for c in ("image_id", "class_name", "class_id", "rad_id")]
    )
    df = quarantine_where(q, file, df, blank("image_id"), "empty image_id", ROW, total=total)
    df = quarantine_where(q, file, df, blank("rad_id"), "empty rad_id", "image_id", total=total)
    df = quarantine_where(
        q, file, df, ~pl.col("class_name").is_in(list(CLASSES)) | pl.col("class_name").is_null(),
        pl.lit("unknown class_name: ") + pl.col("class_name").fill_null(""), "image_id",
        total=total,
    )
    df = quarantine_where(
        q, file, df, pl.col("class_id") != pl.col("class_name").replace_strict(CLASSES),
        pl.lit("class_id does not match class_name: ")
        + pl.concat_str("class_id", "class_name", separator=" vs "), "image_id", total=total,
    )
    df = df.with_columns(
        [finite(c).alias(f"_{c}") for c in BOX]
    )
    is_nf = pl.col("class_name") == NO_FINDING
    ok_box = pl.all_horizontal([pl.col(f"_{c}").is_not_null() for c in BOX]) & (
        (pl.col("_x_max") > pl.col("_x_min")) & (pl.col("_y_max") > pl.col("_y_min"))
    )
    any_text = pl.any_horizontal([~blank(c) for c in BOX])
    df = quarantine_where(
        q, file, df, pl.when(is_nf).then(any_text).otherwise(~ok_box),
        pl.when(is_nf).then(pl.lit("'No finding' with box values"))
        .otherwise(pl.lit("finding without a valid box (x_min < x_max, y_min < y_max): ")
                   + pl.concat_str([pl.col(c).fill_null("") for c in BOX], separator=",")),
        "image_id", total=total,
    )
    df = df.with_columns(
        pl.when(is_nf).then(pl.lit("")).otherwise(boxes_json([f"_{c}" for c in BOX])).alias("_box")
    )
    df = df.with_columns(
        pl.concat_str(["image_id", "rad_id", "class_name", "_box"], separator="|").alias("_key")
    )
    df = dedupe(q, file, df, "_key", total=total)
    reads = df.select("image_id", "rad_id").unique().sort("image_id", "rad_id")
    pos = (
        df.group_by("image_id", "rad_id", "class_name")
        .agg(pl.col("_box").filter(pl.col("_box") != "").alias("_boxes"))
        .with_columns(
            pl.when(pl.col("class_name") == NO_FINDING).then(pl.lit("listed"))
            .otherwise(pl.concat_str(pl.lit("["), pl.col("_boxes").list.join(","), pl.lit("]")))
            .alias("_raw")
        )
        .select("image_id", "rad_id", pl.col("class_name").alias("finding"), "_raw")
    )
    source_id = f"{dataset_id}:radiologists"
    # dense rows: every read x every class, read-major (row = read index * 15 + class index);
    # the positives are placed by that integer position instead of a join on three texts
    n = len(CLASSES)
    reads = reads.with_row_index("_r")
    hits = pos.join(reads, on=["image_id", "rad_id"], how="inner").select(
        (pl.col("_r").cast(pl.Int64) * n
         + pl.col("finding").replace_strict(list(CLASSES), list(range(n)), return_dtype=pl.Int64)),
        "_raw",
    )
    raw = pl.repeat(None, reads.height * n, dtype=pl.String, eager=True).alias("_raw")
    ann = (
        reads.drop("_r").join(pl.DataFrame({"finding": list(CLASSES)}), how="cross",
                              maintain_order="left_right")
        .with_columns(raw.scatter(hits["_r"], hits["_raw"]))
        .select(
            (pl.lit(dataset_id + ":") + pl.col("image_id")).alias("image_id"),
            pl.lit(source_id).alias("source_id"), pl.col("rad_id").alias("annotator"),
            "finding", pl.col("_raw").is_not_null().cast(pl.Float64).alias("value"),
            pl.col("_raw").fill_null("not listed").alias("raw_value"),
            pl.when(pl.col("_raw").is_not_null()).then(pl.lit("positive"))
            .otherwise(pl.lit("negative")).alias("meaning"),
            pl.lit(False).alias("is_invalid"),
        )
    )
    per_image = reads.group_by("image_id").agg(pl.col("rad_id").sort()).sort("image_id")
    images = per_image.select(
        (pl.lit(dataset_id + ":") + pl.col("image_id")).alias("image_id"),
        pl.lit(dataset_id).alias("dataset_id"), pl.col("image_id").alias("native_id"),
        (pl.col("image_id") + pl.lit(".dicom")).alias("path"), pl.lit("CXR").alias("modality"),
        pl.struct(pl.col("rad_id").alias("readers")).struct.json_encode().alias("meta"),
    )
    sources = [{
        "source_id": source_id, "dataset_id": dataset_id, "name": "radiologists",
        "kind": "expert", "exhaustive": True, "negatives": "explicit", "value_type": "binary",
        "rule": "each image read independently by 3 of 17 radiologists (annotator = rad_id); a "
                "reader boxed each of 14 findings seen or marked 'No finding'; every (image, "
                "reader) gets 15 rows: 1 with boxes [[x_min,y_min,x_max,y_max],...] as JSON in "
                "raw_value ('listed' for No finding), 0 ('not listed') otherwise",
        "description": "VinDr-CXR radiologists' boxes (Nguyen et al. 2022), Kaggle train set",
        "code_map": code_map({"[[x_min,y_min,x_max,y_max],...]": (1.0, "positive"),
                              "listed": (1.0, "positive"), "not listed": (0.0, "negative")}),
        "file": file,
    }]
    report = FileReport(file, total, df.height, q.count(file))
    raise_if_strict(q, strict, [report])
    return publish(
        cat, adapter="vindr-cxr", dataset_id=dataset_id, partition=dataset_id,
        tables={
            "datasets": [{"dataset_id": dataset_id, **DATASET_ROW}],
            "images": images, "sources": sources, "annotations": ann,
            "coverage": images.select("image_id", pl.lit(source_id).alias("source_id")),
            "findings": findings_rows(cat, source_id, list(CLASSES), "binary"),
        },
        quarantine=q, files=[report],
        messages=[f"{reads['rad_id'].n_unique():,} readers, {reads.height:,} reads"],
    )


ADAPTERS = [
    Adapter(
        name="vindr-cxr", dataset_id=DATASET, run=ingest,
        description="VinDr-CXR (VinBigData) train.csv: 3 radiologists' boxes per image",
        default_path="cxr/vinbigdata-train.csv.gz",
    )
]
