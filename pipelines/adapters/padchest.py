"""PadChest (BIMCV): ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv``.

160,861 chest X-rays of 67,625 patients (Hospital San Juan, Alicante) with Spanish reports
labelled over a ~190-term vocabulary. ``Labels`` holds a Python-list text such as
``"['normal', 'pleural effusion']"``. ``MethodLabel`` says who labelled the report:
'Physician' (27%, manual) -> source ``padchest:physician`` (kind expert); 'RNN_model' (the
rest, an RNN trained on the manual labels) -> ``padchest:rnn`` (kind report_nlp). Both are
exhaustive with implicit negatives: only listed labels are stored, plus one coverage row
per image, so a covered image without a row for a finding is negative.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    meta_json,
    quarantine_where,
    read_csv,
    read_header,
)
from medlake.pipelines.adapters.nih_linked import no_options, raise_if_strict

DATASET = "padchest"
COLUMNS = [
    "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
    "PatientSex_DICOM", "Projection", "MethodLabel", "Labels",
]
METHODS = {"Physician": "physician", "RNN_model": "rnn"}
# the labels named in Labels: 'single' or "double" quoted items in brackets
ITEM = r"""(?:'[^']*'|"[^"]*")"""
LIST_RE = rf"^\[\s*(?:{ITEM}\s*(?:,\s*{ITEM}\s*)*)?\]$"
MISSING = ["nan", "None", "NaN", ""]
META = {
    "birth_year": "_birth", "view_position_dicom": "ViewPosition_DICOM",
    "method_projection": "MethodProjection", "pediatric": "Pediatric",
    "dicom_modality": "Modality_DICOM", "manufacturer": "Manufacturer_DICOM",
    "photometric": "PhotometricInterpretation_DICOM", "rows": "Rows_DICOM",
    "columns": "Columns_DICOM", "bits_stored": "BitsStored_DICOM",
    "spatial_resolution": "SpatialResolution_DICOM", "report_id": "ReportID",
    "method_label": "MethodLabel",
}
DATASET_ROW = {
    "name": "PadChest",
    "modality": "CXR",
    "source": "BIMCV (Hospital San Juan, Alicante); metadata via torchxrayvision 1.5.7",
    "license": "PadChest Dataset Research Use Agreement (not stated in source)",
    "citation": "Bustos A. et al. PadChest: A large chest x-ray image dataset with multi-label "
                "annotated reports. Medical Image Analysis 2020.",
    "description": "160,861 chest X-rays, 67,625 patients; ~190 labels from Spanish reports "
                   "(27% by physicians, the rest by an RNN).",
}


def _null_if_missing(col: str) -> pl.Expr:
    c = pl.col(col).str.strip_chars()
    return pl.when(~c.is_in(MISSING)).then(c)  # null stays null


def parse_labels(df: pl.DataFrame) -> pl.DataFrame:
    """Add ``_ok`` (Labels is list text), ``_missing`` ('nan') and ``_labels`` (stripped names).

    Vectorised: a regex checks the whole text and ``extract_all`` takes the quoted items,
    instead of ``ast.literal_eval`` on each of 160k rows. Empty items ('' from the RNN) are
    dropped; repeated names are kept once.
    """
    lab = pl.col("Labels").str.strip_chars()
    item = pl.element().str.slice(1, pl.element().str.len_chars() - 2).str.strip_chars()
    return df.with_columns(
        lab.str.contains(LIST_RE).fill_null(False).alias("_ok"),
        (lab.is_in(MISSING) | lab.is_null()).alias("_missing"),
        lab.str.extract_all(ITEM)
        .list.eval(item.filter(item != ""))
        .list.unique(maintain_order=True)
        .alias("_labels"),
    )


def ingest(
    cat: Catalog, path: Path, *, dataset_id: str = DATASET, strict: bool = False,
    **options: Any,
) -> IngestResult:
    """Ingest the PadChest label CSV: images, two label sources, implicit negatives.

    Parameters
    ----------
    cat
        The catalog.
    path
        The PadChest CSV (plain or .gz).
    dataset_id
        Dataset id (default ``padchest``).
    strict
        Raise at the first bad row instead of quarantining it.

    Returns
    -------
    IngestResult
        Partition ``<dataset_id>``: images (group = patient), sources ``<dataset_id>:physician``
        and ``<dataset_id>:rnn``, their positive annotations and coverage. Rows whose Labels is
        'nan' (no report) are ingested as images that no source covers.

    Raises
    ------
    SchemaError
        Missing columns. ``IngestError``: unreadable file, unknown option, ``strict`` and a
        bad row.
    """
    no_options("padchest", options)
    file = path.name
    q = Quarantine(dataset_id)
    df, total = _read(path, q)
    df = df.with_columns(pl.col("ImageID").str.strip_chars(), pl.col("PatientID").str.strip_chars())
    df = quarantine_where(q, file, df, blank("ImageID"), "empty ImageID", ROW, total=total)
    df = dedupe(q, file, df, "ImageID", total=total)
    df = quarantine_where(q, file, df, blank("PatientID"), "empty PatientID", "ImageID", total=total)
    df = quarantine_where(
        q, file, df, ~pl.col("MethodLabel").is_in(list(METHODS)) | pl.col("MethodLabel").is_null(),
        pl.lit("unknown MethodLabel (expected Physician or RNN_model): ")
        + pl.col("MethodLabel").fill_null(""), "ImageID", total=total,
    )
    df = parse_labels(df)
    df = quarantine_where(
        q, file, df, ~pl.col("_ok") & ~pl.col("_missing"),
        pl.lit("unparseable Labels (expected a list like ['normal']): ")
        + pl.col("Labels").str.slice(0, 60), "ImageID", total=total,
    )
    df = df.with_columns(
        _null_if_missing("PatientBirth").alias("_birth_raw"),
        _null_if_missing("StudyDate_DICOM").alias("_date_raw"),
    ).with_columns(
        pl.col("_birth_raw").cast(pl.Float64, strict=False).alias("_birth"),
        pl.col("_date_raw").str.to_date("%Y%m%d", strict=False).alias("_date"),
    )
    df = quarantine_where(
        q, file, df, pl.col("_birth").is_null() & pl.col("_birth_raw").is_not_null(),
        pl.lit("unparseable PatientBirth: ") + pl.col("PatientBirth"), "ImageID", total=total,
    )
    df = quarantine_where(
        q, file, df, pl.col("_date").is_null() & pl.col("_date_raw").is_not_null(),
        pl.lit("unparseable StudyDate_DICOM (expected YYYYMMDD): ") + pl.col("StudyDate_DICOM"),
        "ImageID", total=total,
    )
    age = pl.col("_date").dt.year() - pl.col("_birth")
    df = quarantine_where(
        q, file, df, ~age.is_between(*AGE_RANGE) | (pl.col("_birth").is_not_null() & ~pl.col("_birth").is_finite()),
        pl.format("age out of range ({} to {}): StudyDate_DICOM {} - PatientBirth {}",
                  pl.lit(f"{AGE_RANGE[0]:g}"), pl.lit(f"{AGE_RANGE[1]:g}"),
                  pl.col("StudyDate_DICOM"), pl.col("PatientBirth")),
        "ImageID", total=total,
    )
    df = df.with_columns(
        (pl.lit(dataset_id + ":") + pl.col("ImageID")).alias("image_id"),
        pl.concat_str(pl.lit(dataset_id + ":"), pl.col("MethodLabel").replace_strict(METHODS))
        .alias("_source"),
    )
    present = {k: c for k, c in META.items() if c in df.columns}
    meta_cols = [
        (pl.col(c) if c == "_birth" else _null_if_missing(c)).alias(c) for c in set(present.values())
    ]
    images = df.with_columns(meta_cols).select(
        "image_id", pl.lit(dataset_id).alias("dataset_id"), pl.col("ImageID").alias("native_id"),
        pl.concat_str(_null_if_missing("ImageDir"), pl.col("ImageID"), separator="/").alias("path"),
        (pl.lit(dataset_id + ":") + pl.col("PatientID")).alias("group_id"),
        pl.col("PatientID").alias("patient_id"), _null_if_missing("StudyID").alias("study_id"),
        _null_if_missing("Projection").alias("view"),
        _null_if_missing("PatientSex_DICOM").alias("sex"),
        (pl.col("_date").dt.year() - pl.col("_birth")).alias("age"),
        pl.col("_date").dt.to_string("%Y-%m-%d").alias("study_date"),
        pl.lit("CXR").alias("modality"),
        meta_json(df, present).alias("meta"),
    )
    labelled = df.filter(~pl.col("_missing"))
    ann = (
        labelled.select("image_id", "_source", "_labels")
        .explode("_labels")
        .drop_nulls("_labels")
        .select(
            "image_id", pl.col("_source").alias("source_id"), pl.lit("").alias("annotator"),
            pl.col("_labels").alias("finding"), pl.lit(1.0).alias("value"),
            pl.lit("listed").alias("raw_value"), pl.lit("positive").alias("meaning"),
            pl.lit(False).alias("is_invalid"),
        )
    )
    coverage = labelled.select("image_id", pl.col("_source").alias("source_id"))
    sources, findings = [], []
    for method, name in METHODS.items():
        sid = f"{dataset_id}:{name}"
        sources.append(_source(dataset_id, sid, name, method, file))
        vocab = ann.filter(pl.col("source_id") == sid)["finding"].unique().to_list()
        findings.extend(findings_rows(cat, sid, vocab, "binary"))
    n_missing = int(df["_missing"].sum())
    messages = [f"{images['patient_id'].n_unique():,} patients"]
    if n_missing:
        messages.append(
            f"{n_missing:,} images have no labels (Labels 'nan', no report): ingested as "
            "images that no label source covers"
        )
    report = FileReport(file, total, df.height, q.count(file))
    raise_if_strict(q, strict, [report])
    return publish(
        cat, adapter="padchest", dataset_id=dataset_id, partition=dataset_id,
        tables={
            "datasets": [{"dataset_id": dataset_id, **DATASET_ROW}],
            "images": images, "sources": sources, "annotations": ann, "coverage": coverage,
            "findings": findings,
        },
        quarantine=q, files=[report], messages=messages,
    )


def _read(path: Path, q: Quarantine) -> tuple[pl.DataFrame, int]:
    """Only the columns used (the file has 36, among them the long report texts); rows read."""
    header = read_header(path)
    wanted = set(COLUMNS) | set(META.values()) | {"ImageDir", "StudyID"}
    return read_csv(path, COLUMNS, q, ids=["ImageID"], columns=[c for c in header if c in wanted])


def _source(dataset_id: str, sid: str, name: str, method: str, file: str) -> dict[str, Any]:
    who = (
        "a physician labelled the report by hand" if method == "Physician"
        else "an RNN trained on the physicians' labels labelled the report"
    )
    return {
        "source_id": sid, "dataset_id": dataset_id, "name": name,
        "kind": "expert" if method == "Physician" else "report_nlp",
        "exhaustive": True, "negatives": "implicit", "value_type": "binary",
        "rule": f"rows with MethodLabel '{method}': {who} over the PadChest vocabulary; every "
                "label in 'Labels' is stored as value 1, a covered image without a row for a "
                "finding is negative; empty items ('') are ignored",
        "description": f"PadChest report labels, MethodLabel = {method} (Bustos et al. 2020)",
        "code_map": code_map({"listed": (1.0, "positive"), "not listed": (0.0, "negative")}),
        "file": file,
    }


ADAPTERS = [
    Adapter(
        name="padchest", dataset_id=DATASET, run=ingest,
        description="PadChest labels CSV (160K): images, physician and RNN report labels",
        default_path="cxr/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz",
    )
]
