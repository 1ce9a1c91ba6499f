"""RSNA Pneumonia Detection Challenge (Kaggle, stage 2 train): ``stage_2_train_labels.csv``.

26,684 chest X-rays (a subset of NIH ChestX-ray14, re-anonymised) read by radiologists of
the RSNA and STR: ``Target`` 1 when an opacity suggestive of pneumonia was boxed (one CSV row
per box), 0 otherwise. Optional inputs:

- ``headers=PATH``: the DICOM header dump (``..._dicom_headers.csv``, default: the sibling
  file when present) adds age, sex and view (DICOM modality and the rest go to ``images.meta``);
- ``mapping=PATH``: a CSV ``rsna_id,nih_image`` linking RSNA ids to NIH image names (not
  public; users may have one). The NIH image goes to ``images.meta`` and, when that image is
  in the catalog, ``group_id`` becomes its NIH patient group (so leakage checks see one
  patient across both datasets).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from medlake.catalog import Catalog, FileReport, IngestError, IngestResult, Quarantine, publish
from medlake.catalog.ingestkit import findings_rows
from medlake.pipelines.adapters import Adapter
from medlake.pipelines.adapters._csv import (
    AGE_RANGE,
    ROW,
    blank,
    code_map,
    dedupe,
    finite,
    meta_json,
    parse_number,
    quarantine_where,
    read_csv,
)
from medlake.pipelines.adapters.nih_linked import boxes_json, raise_if_strict

DATASET = "rsna-pneumonia"
NIH = "nih-cxr14"
COLUMNS = ["patientId", "x", "y", "width", "height", "Target"]
HEADER_COLUMNS = ["PatientID", "PatientAge", "PatientSex", "ViewPosition", "Modality"]
HEADERS_FILE = "kaggle_stage_2_train_images_dicom_headers.csv"
FINDING = "Pneumonia"
DATASET_ROW = {
    "name": "RSNA Pneumonia Detection Challenge (stage 2 train)",
    "modality": "CXR",
    "source": "RSNA / Kaggle; metadata via torchxrayvision 1.5.7",
    "license": "Kaggle competition terms (not stated in source)",
    "citation": "Shih G. et al. Augmenting the NIH Chest Radiograph Dataset with Expert "
                "Annotations of Possible Pneumonia. Radiology: AI 2019.",
    "description": "26,684 chest X-rays from NIH ChestX-ray14 re-read by radiologists for "
                   "pneumonia-like opacities, with boxes.",
}


def read_mapping(
    cat: Catalog, q: Quarantine, path: Path, *, id_col: str, known: pl.Series,
    nih_dataset: str = NIH,
) -> tuple[pl.DataFrame, FileReport, int]:
    """Read a user's ``<id_col>,nih_image`` CSV.

    Returns ``(native_id, nih_image, nih_group)`` per mapped id (``nih_group`` null when the
    NIH image is not in the catalog), the file's report and how many NIH images were found.
    Rows naming ids not in ``known``, blank or repeated ids go to the quarantine.
    """
    file = path.name
    df, total = read_csv(path, [id_col, "nih_image"], q, ids=[id_col])
    df = df.with_columns(pl.col(id_col).str.strip_chars(), pl.col("nih_image").str.strip_chars())
    df = quarantine_where(q, file, df, blank(id_col) | blank("nih_image"),
                          f"empty {id_col} or nih_image", ROW, total=total)
    df = dedupe(q, file, df, id_col, total=total)
    df = quarantine_where(
        q, file, df, ~pl.col(id_col).is_in(known.implode()),
        f"names an id that is not in the labels file ({id_col})", id_col, total=total,
    )
    groups = cat.read(
        "images", columns=["native_id", "group_id"],
        where=f"dataset_id = '{nih_dataset.replace(chr(39), chr(39) * 2)}'",
    )
    df = df.join(groups, left_on="nih_image", right_on="native_id", how="left", maintain_order="left")
    out = df.select(
        pl.col(id_col).alias("native_id"), pl.col("nih_image"), pl.col("group_id").alias("nih_group")
    )
    found = int(out["nih_group"].is_not_null().sum())
    return out, FileReport(file, total, df.height, q.count(file)), found


def check_options(fmt: str, options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """Raise an :class:`IngestError` naming options a format does not take."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise IngestError(
            f"format '{fmt}' has no option(s) {unknown}; it takes {list(allowed)}"
        )


def _existing(path: str | Path | None, what: str) -> Path | None:
    if path is None or str(path) == "":
        return None
    p = Path(path).expanduser()
    if not p.exists():
        raise IngestError(f"{what} file {p}: no such file; check the -o {what}=PATH option")
    return p


def default_headers(path: Path) -> Path | None:
    """The sibling DICOM header dump (plain or .gz), if present."""
    for name in (HEADERS_FILE + ".gz", HEADERS_FILE):
        if (path.parent / name).exists():
            return path.parent / name
    return None


def read_headers(
    q: Quarantine, path: Path, known: pl.Series
) -> tuple[pl.DataFrame, FileReport]:
    """DICOM header rows per ``PatientID`` (age, sex, view, modality, extras for meta)."""
    file = path.name
    df, total = read_csv(path, HEADER_COLUMNS, q, ids=["PatientID"])
    df = df.with_columns(pl.col("PatientID").str.strip_chars())
    df = quarantine_where(q, file, df, blank("PatientID"), "empty PatientID", ROW, total=total)
    df = dedupe(q, file, df, "PatientID", total=total)
    df = quarantine_where(
        q, file, df, ~pl.col("PatientID").is_in(known.implode()),
        "names a patientId that is not in the labels file", "PatientID", total=total,
    )
    df = parse_number(q, file, df, "PatientAge", alias="_age", lo=AGE_RANGE[0], hi=AGE_RANGE[1],
                      item="PatientID", total=total)
    extra = {
        k: c for k, c in {
            "body_part": "BodyPartExamined", "conversion_type": "ConversionType",
            "pixel_spacing": "PixelSpacing", "filename": "Filename",
        }.items() if c in df.columns
    }
    out = df.select(
        pl.col("PatientID").alias("native_id"), pl.col("_age").alias("age"),
        pl.col("PatientSex").alias("sex"), pl.col("ViewPosition").alias("view"),
        pl.col("Modality").alias("_m_dicom_modality"),
        *[pl.col(c).alias(f"_m_{k}") for k, c in extra.items()],
    )
    return out, FileReport(file, total, df.height, q.count(file))


def ingest(
    cat: Catalog, path: Path, *, dataset_id: str = DATASET, strict: bool = False,
    **options: Any,
) -> IngestResult:
    """Ingest the RSNA pneumonia labels (one annotation per image, boxes as JSON).

    Parameters
    ----------
    cat
        The catalog.
    path
        ``stage_2_train_labels.csv`` (plain or .gz): patientId, x, y, width, height, Target.
    dataset_id
        Dataset id (default ``rsna-pneumonia``).
    strict
        Raise at the first bad row instead of quarantining it.
    **options
        ``headers=PATH`` (DICOM header dump; ``headers=`` turns the default off) and
        ``mapping=PATH`` (CSV ``rsna_id,nih_image``).

    Returns
    -------
    IngestResult
        Partition ``<dataset_id>``: images, source ``<dataset_id>:expert``, its annotations.

    Raises
    ------
    SchemaError
        Missing columns in any input. ``IngestError``: unreadable file, unknown option, a
        missing option file, ``strict`` and a bad row.
    """
    check_options("rsna-pneumonia", options, ("headers", "mapping"))
    file = path.name
    q = Quarantine(dataset_id)
    df, total = read_csv(path, COLUMNS, q, ids=["patientId"])
    df = df.with_columns(pl.col("patientId").str.strip_chars(), pl.col("Target").str.strip_chars())
    df = quarantine_where(q, file, df, blank("patientId"), "empty patientId", ROW, total=total)
    df = quarantine_where(
        q, file, df, ~pl.col("Target").is_in(["0", "1"]) | pl.col("Target").is_null(),
        pl.lit("unparseable Target (expected 0 or 1): ") + pl.col("Target").fill_null(""),
        "patientId", total=total,
    )
    box = ["x", "y", "width", "height"]
    df = df.with_columns(
        [finite(c).alias(f"_{c}") for c in box]
    )
    has_box = pl.all_horizontal([pl.col(f"_{c}").is_not_null() for c in box])
    any_text = pl.any_horizontal([~blank(c) for c in box])
    bad = pl.when(pl.col("Target") == "1").then(~has_box).otherwise(any_text)
    df = quarantine_where(
        q, file, df, bad,
        pl.when(pl.col("Target") == "1")
        .then(pl.lit("Target 1 without a numeric box (x,y,width,height)"))
        .otherwise(pl.lit("Target 0 with box values")),
        "patientId", total=total,
    )
    df = df.with_columns(
        pl.when(pl.col("Target") == "1").then(boxes_json([f"_{c}" for c in box]))
        .otherwise(pl.lit("0")).alias("_box")
    )
    # an id read as both 0 and 1 contradicts itself: its 0 rows go, its boxes stay
    conflict = (pl.col("Target") == "0") & (pl.col("Target") == "1").any().over("patientId")
    df = quarantine_where(q, file, df, conflict, "Target 0 for an id that also has boxes",
                          "patientId", total=total)
    df = df.with_columns(pl.concat_str(["patientId", "_box"], separator="|").alias("_key"))
    df = dedupe(q, file, df, "_key", total=total)
    per_image = (
        df.group_by("patientId", maintain_order=True)
        .agg(pl.col("Target").first(), pl.col("_box"))
        .sort("patientId")
    )
    known = per_image["patientId"]
    reports = [FileReport(file, total, df.height, q.count(file))]
    messages: list[str] = []
    images = per_image.select(
        pl.col("patientId").alias("native_id"),
        (pl.lit(dataset_id + ":") + pl.col("patientId")).alias("image_id"),
        pl.lit(dataset_id).alias("dataset_id"),
        pl.col("patientId").alias("patient_id"),
        (pl.lit(dataset_id + ":") + pl.col("patientId")).alias("group_id"),
        (pl.col("patientId") + pl.lit(".dcm")).alias("path"),
        pl.lit("CXR").alias("modality"),
    )
    hdr_opt = options.get("headers", "default")
    hpath = default_headers(path) if hdr_opt == "default" else _existing(hdr_opt, "headers")
    meta: dict[str, str] = {}
    if hpath is not None:
        hdr, rep = read_headers(q, hpath, known)
        reports.append(rep)
        images = images.join(hdr, on="native_id", how="left", maintain_order="left")
        meta.update({c[3:]: c for c in hdr.columns if c.startswith("_m_")})
        messages.append(f"DICOM headers from {hpath.name}: {hdr.height:,} images")
    mpath = _existing(options.get("mapping"), "mapping")
    if mpath is not None:
        mp, rep, found = read_mapping(cat, q, mpath, id_col="rsna_id", known=known)
        reports.append(rep)
        images = images.join(mp, on="native_id", how="left", maintain_order="left").with_columns(
            pl.coalesce("nih_group", "group_id").alias("group_id")
        )
        meta["nih_image"] = "nih_image"
        messages.append(
            f"mapping {mpath.name}: {mp.height:,} ids linked to NIH images, {found:,} of them "
            f"in dataset '{NIH}' (group_id set to the NIH patient)"
        )
    if meta:
        images = images.with_columns(meta_json(images, meta).alias("meta"))
    images = images.select([c for c in images.columns if not c.startswith("_m_")
                            and c not in ("nih_image", "nih_group")])
    source_id = f"{dataset_id}:expert"
    ann = per_image.select(
        (pl.lit(dataset_id + ":") + pl.col("patientId")).alias("image_id"),
        pl.lit(source_id).alias("source_id"), pl.lit("").alias("annotator"),
        pl.lit(FINDING).alias("finding"), pl.col("Target").cast(pl.Float64).alias("value"),
        pl.when(pl.col("Target") == "1")
        .then(pl.concat_str(pl.lit("["), pl.col("_box").list.join(","), pl.lit("]")))
        .otherwise(pl.lit("0")).alias("raw_value"),
        pl.when(pl.col("Target") == "1").then(pl.lit("positive")).otherwise(pl.lit("negative"))
        .alias("meaning"),
        pl.lit(False).alias("is_invalid"),
    )
    sources = [{
        "source_id": source_id, "dataset_id": dataset_id, "name": "expert", "kind": "expert",
        "exhaustive": True, "negatives": "explicit", "value_type": "binary",
        "rule": "radiologists (RSNA/STR) boxed opacities suggestive of pneumonia: Target 1 with "
                "one CSV row per box (boxes [[x,y,width,height],...] as JSON in raw_value), "
                "Target 0 otherwise (no lung opacity, normal or not normal)",
        "description": "RSNA Pneumonia Detection Challenge labels (Shih et al. 2019)",
        "code_map": code_map({"0": (0.0, "negative"), "1": (1.0, "positive")}), "file": file,
    }]
    raise_if_strict(q, strict, reports)
    return publish(
        cat, adapter="rsna-pneumonia", dataset_id=dataset_id, partition=dataset_id,
        tables={
            "datasets": [{"dataset_id": dataset_id, **DATASET_ROW}],
            "images": images, "sources": sources, "annotations": ann,
            "coverage": ann.select("image_id", "source_id"),
            "findings": findings_rows(cat, source_id, [FINDING], "binary"),
        },
        quarantine=q, files=reports,
        messages=[f"{int((per_image['Target'] == '1').sum()):,} positive images", *messages],
    )


ADAPTERS = [
    Adapter(
        name="rsna-pneumonia", dataset_id=DATASET, run=ingest,
        description="RSNA Pneumonia (Kaggle stage 2 train labels, boxes); -o headers=, -o mapping=",
        default_path="cxr/kaggle_stage_2_train_labels.csv.gz",
    )
]
