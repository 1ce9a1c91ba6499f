"""Label files that describe NIH ChestX-ray14 images: the bounding boxes and Google's re-reads.

``nih-bbox`` reads ``BBox_List_2017.csv``: 984 boxes drawn by radiologists on 880 images for
8 findings (Wang et al. 2017). Positive-only: an image without a box for a finding was not
judged for it (``negatives = 'none'``).

``google2019`` reads ``google2019_nih-chest-xray-labels.csv`` (GCS4L): 4,376 images re-read by
radiologists for 4 findings (Majkowska et al., Radiology 2019), exhaustive over those 4, with
the authors' validation / test split (scheme ``google2019``).

Both label images of dataset ``nih-cxr14``, which must be ingested first; rows naming other
images go to the quarantine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from medlake.catalog import (
    Catalog,
    FileReport,
    IngestError,
    IngestResult,
    Quarantine,
    SchemaError,
    publish,
)
from medlake.catalog import __version__ as medlake_version
from medlake.catalog.ingestkit import findings_rows, root_versions, sha256_file
from medlake.pipelines.adapters import Adapter
from medlake.pipelines.adapters._csv import (
    ROW,
    blank,
    code_map,
    dedupe,
    finite,
    link_to_images,
    quarantine_where,
    read_csv,
    stop_if_strict,
)

DATASET = "nih-cxr14"
BOX_COLUMNS = ["Image Index", "Finding Label"]
BOX_NAMES = ("x", "y", "w", "h")
GOOGLE_FINDINGS = ["Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass"]
GOOGLE_COLUMNS = ["Image Index", *GOOGLE_FINDINGS, "Set Id"]
GOOGLE_CODES = {"YES": (1.0, "positive"), "NO": (0.0, "negative")}


def no_options(fmt: str, options: dict[str, Any]) -> None:
    """Raise an :class:`IngestError` naming options a format does not take."""
    if options:
        raise IngestError(
            f"format '{fmt}' takes no option(s) {sorted(options)}; remove the -o flag(s)"
        )


def raise_if_strict(q: Quarantine, strict: bool, reports: list[FileReport]) -> None:
    """In strict mode, raise an :class:`IngestError` naming the first bad row in file order.

    Adapters collect every bad row first (checks run column by column, not row by row) and
    call this before publishing; files are checked in ``reports`` order (the labels file
    before its helper files).
    """
    for rep in reports:
        stop_if_strict(q, rep.file, strict=strict, total=rep.rows_read)


def box_columns(file: str, columns: list[str]) -> list[str]:
    """The four box columns: the ones right after ``Finding Label``.

    The NIH header reads ``Bbox [x,y,w,h],,,`` unquoted, so the box's name is spread over
    four header fields (and three empty names trail); the values are the 4 fields after
    'Finding Label' whatever they are called.
    """
    i = columns.index("Finding Label")
    cols = columns[i + 1 : i + 5]
    if len(cols) < 4 or not cols[0].strip().lower().startswith(("bbox", "x")):
        raise SchemaError(
            f"{file}: expected 4 box columns (Bbox [x,y,w,h]) after 'Finding Label'. "
            f"Found columns: {columns}. Is this BBox_List_2017.csv?"
        )
    return cols


def boxes_json(cols: list[str]) -> pl.Expr:
    """``'[x,y,w,h]'`` text from four numeric columns (floats, so valid JSON)."""
    parts = [pl.col(c).cast(pl.String) for c in cols]
    return pl.concat_str([pl.lit("["), pl.concat_str(parts, separator=","), pl.lit("]")])


def ingest_bbox(
    cat: Catalog, path: Path, *, dataset_id: str = DATASET, strict: bool = False, **options: Any
) -> IngestResult:
    """Ingest ``BBox_List_2017.csv``: one annotation per (image, finding), boxes as JSON.

    Parameters
    ----------
    cat
        The catalog; dataset ``dataset_id`` (NIH ChestX-ray14) must be ingested already.
    path
        The CSV (plain or .gz).
    dataset_id
        The NIH dataset's id (default ``nih-cxr14``).
    strict
        Raise at the first bad row instead of quarantining it.

    Returns
    -------
    IngestResult
        Written to partition ``<dataset_id>--bbox``; source ``<dataset_id>:bbox_expert``.

    Raises
    ------
    SchemaError
        Missing columns. ``IngestError``: unreadable file, unknown option, ``strict`` and a
        bad row.
    """
    no_options("nih-bbox", options)
    file = path.name
    q = Quarantine(dataset_id)
    df, total = read_csv(path, BOX_COLUMNS, q, ids=["Image Index"])
    cols = box_columns(file, [c for c in df.columns if c != ROW])
    trailing = [c for c in df.columns[df.columns.index(cols[-1]) + 1 :] if c != ROW]
    df = df.rename(dict(zip(cols, BOX_NAMES)))
    df = quarantine_where(q, file, df, blank("Image Index"), "empty Image Index", ROW, total=total)
    df = quarantine_where(
        q, file, df, blank("Finding Label"), "empty Finding Label", "Image Index", total=total
    )
    df = df.with_columns(
        [finite(c).alias(f"_{c}") for c in BOX_NAMES]
    )
    bad_box = pl.any_horizontal([pl.col(f"_{c}").is_null() for c in BOX_NAMES])
    bad_box = bad_box | (pl.col("_w") <= 0) | (pl.col("_h") <= 0)
    df = quarantine_where(
        q, file, df, bad_box,
        pl.lit("unparseable box (x,y,w,h must be numbers, w,h > 0): ")
        + pl.concat_str([pl.col(c).fill_null("") for c in BOX_NAMES], separator=","),
        "Image Index", total=total,
    )
    if trailing:
        extra = pl.any_horizontal([~blank(c) for c in trailing])
        df = quarantine_where(
            q, file, df, extra, "values after the 4 box fields (expected Bbox x,y,w,h only)",
            "Image Index", total=total,
        )
    df = df.with_columns(
        pl.col("Image Index").str.strip_chars(), pl.col("Finding Label").str.strip_chars(),
        boxes_json([f"_{c}" for c in BOX_NAMES]).alias("_box"),
    )
    df = dedupe_box(q, file, df, total=total)
    df = link_to_images(
        cat, q, file, df, dataset_id=dataset_id, native_col="Image Index", total=total
    )
    source_id = f"{dataset_id}:bbox_expert"
    ann = (
        df.group_by("image_id", "Finding Label", maintain_order=True)
        .agg(pl.col("_box"))
        .select(
            pl.col("image_id"), pl.lit(source_id).alias("source_id"), pl.lit("").alias("annotator"),
            pl.col("Finding Label").alias("finding"), pl.lit(1.0).alias("value"),
            pl.concat_str(pl.lit("["), pl.col("_box").list.join(","), pl.lit("]")).alias("raw_value"),
            pl.lit("positive").alias("meaning"), pl.lit(False).alias("is_invalid"),
        )
        .sort("image_id", "finding")
    )
    sources = [{
        "source_id": source_id, "dataset_id": dataset_id, "name": "bbox_expert", "kind": "expert",
        "exhaustive": False, "negatives": "none", "value_type": "binary",
        "rule": "a board-certified radiologist drew a box for a finding seen on the image; "
                "one row per (image, finding) with value 1 and its boxes [[x,y,w,h],...] in "
                "pixels of the 1024x1024 image as JSON in raw_value; no row means not judged",
        "description": "NIH ChestX-ray14 bounding-box set (Wang et al. 2017): 984 boxes on 880 "
                       "images for 8 findings",
        "code_map": code_map({"[[x,y,w,h],...]": (1.0, "positive")}), "file": file,
    }]
    findings = sorted(ann["finding"].unique().to_list())
    report = FileReport(file, total, df.height, q.count(file))
    raise_if_strict(q, strict, [report])
    return publish(
        cat, adapter="nih-bbox", dataset_id=dataset_id, partition=f"{dataset_id}--bbox",
        tables={
            "sources": sources, "annotations": ann,
            "coverage": ann.select("image_id", "source_id").unique(maintain_order=True),
            "findings": findings_rows(cat, source_id, findings, "binary"),
        },
        quarantine=q, files=[report],
        messages=[f"{ann['image_id'].n_unique():,} images with boxes"],
    )


def dedupe_box(q: Quarantine, file: str, df: pl.DataFrame, *, total: int) -> pl.DataFrame:
    """Repeats of the same (image, finding, box) are duplicates; other boxes are kept."""
    key = pl.concat_str(["Image Index", "Finding Label", "_box"], separator="|")
    df = df.with_columns(key.alias("_key"))
    return dedupe(q, file, df, "_key", total=total).drop("_key")


def ingest_google(
    cat: Catalog, path: Path, *, dataset_id: str = DATASET, strict: bool = False, **options: Any
) -> IngestResult:
    """Ingest Google's 2019 expert labels of NIH images and their ``Set Id`` split.

    Parameters
    ----------
    cat
        The catalog; dataset ``dataset_id`` (NIH ChestX-ray14) must be ingested already.
    path
        ``google2019_nih-chest-xray-labels.csv`` (plain or .gz).
    dataset_id
        The NIH dataset's id (default ``nih-cxr14``).
    strict
        Raise at the first bad row instead of quarantining it.

    Returns
    -------
    IngestResult
        Partition ``<dataset_id>--google2019``: source ``<dataset_id>:google2019_expert``,
        split scheme ``google2019`` and its root version ``<dataset_id>@google2019``.

    Raises
    ------
    SchemaError
        Missing columns. ``IngestError``: unreadable file, unknown option, ``strict`` and a
        bad row.
    """
    no_options("google2019", options)
    file = path.name
    q = Quarantine(dataset_id)
    df, total = read_csv(path, GOOGLE_COLUMNS, q, ids=["Image Index"])
    df = quarantine_where(q, file, df, blank("Image Index"), "empty Image Index", ROW, total=total)
    df = df.with_columns(
        [pl.col(c).str.strip_chars().str.to_uppercase() for c in GOOGLE_FINDINGS]
        + [pl.col("Image Index").str.strip_chars(), pl.col("Set Id").str.strip_chars()]
    )
    for f in GOOGLE_FINDINGS:
        df = quarantine_where(
            q, file, df, ~pl.col(f).is_in(list(GOOGLE_CODES)) | pl.col(f).is_null(),
            pl.lit(f"unparseable {f} (expected YES or NO): ") + pl.col(f).fill_null(""),
            "Image Index", total=total,
        )
    df = quarantine_where(q, file, df, blank("Set Id"), "empty Set Id", "Image Index", total=total)
    df = dedupe(q, file, df, "Image Index", total=total)
    df = link_to_images(
        cat, q, file, df, dataset_id=dataset_id, native_col="Image Index", total=total
    )
    source_id = f"{dataset_id}:google2019_expert"
    codes = pl.DataFrame(
        {"raw_value": list(GOOGLE_CODES), "value": [v for v, _ in GOOGLE_CODES.values()],
         "meaning": [m for _, m in GOOGLE_CODES.values()]}
    )
    ann = (
        df.unpivot(GOOGLE_FINDINGS, index="image_id", variable_name="finding", value_name="raw_value")
        .join(codes, on="raw_value", how="left")
        .select(
            "image_id", pl.lit(source_id).alias("source_id"), pl.lit("").alias("annotator"),
            "finding", "value", "raw_value", "meaning", pl.lit(False).alias("is_invalid"),
        )
        .sort("image_id", "finding")
    )
    splits = df.select(
        "image_id", pl.lit(dataset_id).alias("dataset_id"), pl.lit("google2019").alias("scheme"),
        pl.col("Set Id").alias("split"),
    ).sort("image_id")
    sources = [{
        "source_id": source_id, "dataset_id": dataset_id, "name": "google2019_expert",
        "kind": "expert", "exhaustive": True, "negatives": "explicit", "value_type": "binary",
        "rule": "each image read by 3 radiologists (adjudicated for the test set); YES/NO for "
                "each of Fracture, Pneumothorax, Airspace opacity, Nodule or mass",
        "description": "Google expert labels on NIH ChestX-ray14 images (Majkowska et al., "
                       "Radiology 2019)",
        "code_map": code_map(GOOGLE_CODES), "file": file,
    }]
    versions = root_versions(
        splits, dataset_id=dataset_id, inputs={file: sha256_file(path)},
        medlake_version=medlake_version,
    )
    report = FileReport(file, total, df.height, q.count(file))
    raise_if_strict(q, strict, [report])
    return publish(
        cat, adapter="google2019", dataset_id=dataset_id, partition=f"{dataset_id}--google2019",
        tables={
            "sources": sources, "annotations": ann,
            "coverage": splits.select("image_id", pl.lit(source_id).alias("source_id")),
            "splits": splits, "versions": versions,
            "findings": findings_rows(cat, source_id, GOOGLE_FINDINGS, "binary"),
        },
        quarantine=q, files=[report],
    )


ADAPTERS = [
    Adapter(
        name="nih-bbox", dataset_id=DATASET, run=ingest_bbox, links_to="nih-cxr14",
        description="NIH ChestX-ray14 BBox_List_2017 CSV: radiologists' boxes (positive-only)",
        default_path="cxr/BBox_List_2017.csv.gz",
    ),
    Adapter(
        name="google2019", dataset_id=DATASET, run=ingest_google, links_to="nih-cxr14",
        description="Google 2019 expert labels of NIH images (4 findings) and their split",
        default_path="cxr/google2019_nih-chest-xray-labels.csv.gz",
    ),
]
