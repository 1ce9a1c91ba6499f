"""NIH ChestX-ray14: ``Data_Entry_2017_v2020.csv`` (images, patients, report-NLP labels).

112,120 frontal chest X-rays of 30,805 patients; 14 findings and 'No Finding' mined from the
radiology reports by NLP (Wang et al., CVPR 2017). The labels are exhaustive over the 15
names: a finding not listed for an image is a negative.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from medlake.catalog import Catalog, FileReport, IngestResult, Quarantine, publish
from medlake.catalog.ingestkit import ABSENT, findings_rows
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
)

DATASET = "nih-cxr14"
FINDINGS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
    "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia",
    "Pneumothorax", "No Finding",
]
COLUMNS = [
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
    "Patient Gender", "View Position",
]
DATASET_ROW = {
    "name": "NIH ChestX-ray14",
    "modality": "CXR",
    "source": "NIH Clinical Center; metadata via torchxrayvision 1.5.7",
    "license": "CC0 1.0 (NIH release); see the NIH Box release page",
    "citation": "Wang X. et al. ChestX-ray8. CVPR 2017.",
    "description": "112,120 frontal chest X-rays, 30,805 patients, 14 NLP-mined findings.",
}


def ingest(
    cat: Catalog, path: Path, *, dataset_id: str = DATASET, strict: bool = False
) -> IngestResult:
    file = path.name
    q = Quarantine(dataset_id, strict=strict)
    df, total = read_csv(path, COLUMNS, q, ids=["Image Index"])
    df = quarantine_where(q, file, df, blank("Image Index"), "empty Image Index", ROW, total=total)
    df = dedupe(q, file, df, "Image Index", total=total)
    df = df.with_columns(
        pl.col("Follow-up #").str.strip_chars().cast(pl.Int32, strict=False).alias("_fu"),
        pl.col("Finding Labels").str.split("|").alias("_labels"),
    )
    df = parse_number(q, file, df, "Patient Age", alias="_age", lo=AGE_RANGE[0], hi=AGE_RANGE[1],
                      item="Image Index", total=total)
    df = quarantine_where(
        q, file, df, pl.col("_fu") < 0,
        pl.lit("negative Follow-up #: ") + pl.col("Follow-up #"), "Image Index", total=total,
    )
    df = quarantine_where(q, file, df, blank("Patient ID"), "empty Patient ID", "Image Index", total=total)
    unknown = pl.col("_labels").list.eval(pl.element().is_in(FINDINGS).not_()).list.any()
    df = quarantine_where(
        q, file, df, unknown | blank("Finding Labels"),
        pl.lit("unknown finding in Finding Labels: ") + pl.col("Finding Labels").fill_null(""),
        "Image Index", total=total,
    )
    extra = {
        "orig_width": "OriginalImage[Width", "orig_height": "Height]",
        "pixel_spacing_x": "OriginalImagePixelSpacing[x", "pixel_spacing_y": "y]",
    }
    present = {k: c for k, c in extra.items() if c in df.columns}
    source_id = f"{dataset_id}:report_nlp"
    images = df.select(
        (pl.lit(dataset_id + ":") + pl.col("Image Index")).alias("image_id"),
        pl.lit(dataset_id).alias("dataset_id"),
        pl.col("Image Index").alias("native_id"),
        (pl.lit(dataset_id + ":") + pl.col("Patient ID").str.strip_chars()).alias("group_id"),
        pl.col("Patient ID").str.strip_chars().alias("patient_id"),
        pl.col("View Position").alias("view"),
        pl.col("Patient Gender").alias("sex"),
        pl.col("_age").alias("age"),
        pl.col("_fu").alias("follow_up"),
        pl.lit("CXR").alias("modality"),
        (pl.struct([pl.col(c).alias(k) for k, c in present.items()]).struct.json_encode()
         if present else pl.lit(None, pl.String)).alias("meta"),
    )
    # exhaustive over 15 names but stored sparsely: a covered image without a row for a
    # finding is negative (sources.negatives = 'implicit'); the labels_dense view expands it
    ann = (
        df.select(pl.col("Image Index"), pl.col("_labels").alias("finding"))
        .explode("finding")
        .select(
            (pl.lit(dataset_id + ":") + pl.col("Image Index")).alias("image_id"),
            pl.lit(source_id).alias("source_id"),
            pl.lit("").alias("annotator"),
            pl.col("finding"),
            pl.lit(1.0).alias("value"),
            pl.lit("listed").alias("raw_value"),
            pl.lit("positive").alias("meaning"),
            pl.lit(False).alias("is_invalid"),
        )
    )
    sources = [{
        "source_id": source_id, "dataset_id": dataset_id, "name": "report_nlp",
        "kind": "report_nlp", "exhaustive": True, "negatives": "implicit",
        "value_type": "binary",
        "rule": "NLP-mined from radiology reports (NegBio/DNorm); a finding not listed in "
                "'Finding Labels' is negative; 'No Finding' when none of the 14 is listed",
        "description": "NIH report-derived labels (Wang et al. 2017)",
        "code_map": code_map({"listed": (1.0, "positive"), ABSENT: (0.0, "negative")}),
        "file": file,
    }]
    report = FileReport(file, total, df.height, q.count(file))
    return publish(
        cat, adapter="nih-cxr14", dataset_id=dataset_id, partition=dataset_id,
        tables={
            "datasets": [{"dataset_id": dataset_id, **DATASET_ROW}],
            "images": images,
            "sources": sources,
            "annotations": ann,
            "coverage": images.select("image_id", pl.lit(source_id).alias("source_id")),
            "findings": findings_rows(cat, source_id, FINDINGS, "binary"),
        },
        quarantine=q, files=[report],
        messages=[f"{images['patient_id'].n_unique():,} patients"],
    )


ADAPTERS = [
    Adapter(
        name="nih-cxr14", dataset_id=DATASET, run=ingest,
        description="NIH ChestX-ray14 Data_Entry_2017 CSV: images, patients, report-NLP labels",
        default_path="cxr/Data_Entry_2017_v2020.csv.gz",
    )
]
