"""SIIM-ACR Pneumothorax Segmentation (Kaggle): ``train-rle.csv``.

12,047 chest X-rays (DICOM, identified by SOP instance UID; a subset of NIH ChestX-ray14)
with pneumothorax masks drawn by radiologists, run-length encoded. ``EncodedPixels`` is
``-1`` when there is no pneumothorax; an image with several separate masks has one row per
mask (12,954 rows), which are merged into one annotation (value 1, mask count in raw_value).
The header's second name has a leading space (`` EncodedPixels``).

Option ``mapping=PATH``: a CSV ``siim_id,nih_image`` (as for RSNA) puts the NIH image in
``images.meta`` and, when that image is in the catalog, its NIH patient in ``group_id``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from medlake.catalog import Catalog, FileReport, IngestResult, Quarantine, SchemaError, publish
from medlake.catalog.ingestkit import findings_rows
from medlake.pipelines.adapters import Adapter
from medlake.pipelines.adapters._csv import (
    ROW,
    blank,
    code_map,
    dedupe,
    meta_json,
    quarantine_where,
    read_csv,
    read_header,
)
from medlake.pipelines.adapters.nih_linked import raise_if_strict
from medlake.pipelines.adapters.rsna import NIH, _existing, check_options, read_mapping

DATASET = "siim-acr-pneumothorax"
FINDING = "Pneumothorax"
ID, RLE = "ImageId", "EncodedPixels"
DATASET_ROW = {
    "name": "SIIM-ACR Pneumothorax Segmentation (train)",
    "modality": "CXR",
    "source": "SIIM / ACR / Kaggle; metadata via torchxrayvision 1.5.7",
    "license": "Kaggle competition terms (not stated in source)",
    "citation": "Zawacki A. et al. SIIM-ACR Pneumothorax Segmentation. Kaggle 2019.",
    "description": "12,047 chest X-rays with radiologist pneumothorax masks (RLE).",
}


def ingest(
    cat: Catalog, path: Path, *, dataset_id: str = DATASET, strict: bool = False,
    **options: Any,
) -> IngestResult:
    """Ingest the SIIM-ACR mask list: one pneumothorax annotation per image.

    Parameters
    ----------
    cat
        The catalog.
    path
        ``train-rle.csv`` (plain or .gz): ``ImageId, EncodedPixels`` (the second name may
        carry a leading space, as in the Kaggle file).
    dataset_id
        Dataset id (default ``siim-acr-pneumothorax``).
    strict
        Raise at the first bad row instead of quarantining it.
    **options
        ``mapping=PATH``: CSV ``siim_id,nih_image``.

    Returns
    -------
    IngestResult
        Partition ``<dataset_id>``. Rows read = rows ingested (extra mask rows count as
        ingested, merged into their image) + rows quarantined.

    Raises
    ------
    SchemaError
        Missing columns. ``IngestError``: unreadable file, unknown option, ``strict`` and a
        bad row.
    """
    check_options("siim-acr", options, ("mapping",))
    file = path.name
    q = Quarantine(dataset_id)
    df, total = _read(path, q)
    df = df.with_columns(pl.col(ID).str.strip_chars(), pl.col(RLE).str.strip_chars())
    df = quarantine_where(q, file, df, blank(ID), "empty ImageId", ROW, total=total)
    df = quarantine_where(q, file, df, blank(RLE), "empty EncodedPixels", ID, total=total)
    neg = pl.col(RLE) == "-1"
    # a run-length code is pairs of positive integers (start, length), one space apart;
    # checked as text (a regex and a count), not by splitting each code into a list
    run = r"0*[1-9][0-9]{0,17}"  # a positive 64-bit integer (up to 18 significant digits)
    valid = pl.col(RLE).str.contains(rf"^{run}(?: {run})*$") & (
        pl.col(RLE).str.count_matches(" ") % 2 == 1
    )
    df = quarantine_where(
        q, file, df, ~neg & ~valid,
        pl.lit("unparseable EncodedPixels (expected -1 or pairs of positive integers): ")
        + pl.col(RLE).str.slice(0, 40),
        ID, total=total,
    )
    conflict = neg & (~neg).any().over(ID)
    df = quarantine_where(q, file, df, conflict, "-1 (no pneumothorax) for an image with masks",
                          ID, total=total)
    df = df.with_columns(pl.concat_str([ID, RLE], separator="|").alias("_key"))
    df = dedupe(q, file, df, "_key", total=total)
    per_image = (
        df.group_by(ID).agg((pl.col(RLE) != "-1").sum().alias("_masks")).sort(ID)
    )
    reports = [FileReport(file, total, df.height, q.count(file))]
    n_pos, n_masks = int((per_image["_masks"] > 0).sum()), int(per_image["_masks"].sum())
    messages = [f"{per_image.height:,} images, {n_pos:,} with pneumothorax ({n_masks:,} masks)"]
    images = per_image.select(
        (pl.lit(dataset_id + ":") + pl.col(ID)).alias("image_id"),
        pl.lit(dataset_id).alias("dataset_id"), pl.col(ID).alias("native_id"),
        (pl.col(ID) + pl.lit(".dcm")).alias("path"), pl.lit("CXR").alias("modality"),
    )
    mpath = _existing(options.get("mapping"), "mapping")
    if mpath is not None:
        mp, rep, found = read_mapping(cat, q, mpath, id_col="siim_id", known=per_image[ID])
        reports.append(rep)
        images = (
            images.join(mp, on="native_id", how="left", maintain_order="left")
            .with_columns(pl.col("nih_group").alias("group_id"),
                          meta_json(images, {"nih_image": "nih_image"}).alias("meta"))
            .drop("nih_image", "nih_group")
        )
        messages.append(
            f"mapping {mpath.name}: {mp.height:,} ids linked to NIH images, {found:,} of them "
            f"in dataset '{NIH}' (group_id set to the NIH patient)"
        )
    source_id = f"{dataset_id}:expert"
    pos = pl.col("_masks") > 0
    ann = per_image.select(
        (pl.lit(dataset_id + ":") + pl.col(ID)).alias("image_id"),
        pl.lit(source_id).alias("source_id"), pl.lit("").alias("annotator"),
        pl.lit(FINDING).alias("finding"), pos.cast(pl.Float64).alias("value"),
        pl.when(pos)
        .then(pl.concat_str(pl.lit('{"masks": '), pl.col("_masks").cast(pl.String), pl.lit("}")))
        .otherwise(pl.lit("-1")).alias("raw_value"),
        pl.when(pos).then(pl.lit("positive")).otherwise(pl.lit("negative")).alias("meaning"),
        pl.lit(False).alias("is_invalid"),
    )
    sources = [{
        "source_id": source_id, "dataset_id": dataset_id, "name": "expert", "kind": "expert",
        "exhaustive": True, "negatives": "explicit", "value_type": "binary",
        "rule": "radiologists segmented pneumothorax; EncodedPixels -1 = no pneumothorax "
                "(value 0), a run-length mask = pneumothorax (value 1); an image's mask rows are "
                'merged and counted in raw_value as {"masks": N}',
        "description": "SIIM-ACR Pneumothorax Segmentation challenge masks (train)",
        "code_map": code_map({"-1": (0.0, "negative"), '{"masks": N}': (1.0, "positive")}),
        "file": file,
    }]
    raise_if_strict(q, strict, reports)
    return publish(
        cat, adapter="siim-acr", dataset_id=dataset_id, partition=dataset_id,
        tables={
            "datasets": [{"dataset_id": dataset_id, **DATASET_ROW}],
            "images": images, "sources": sources, "annotations": ann,
            "coverage": ann.select("image_id", "source_id"),
            "findings": findings_rows(cat, source_id, [FINDING], "binary"),
        },
        quarantine=q, files=reports, messages=messages,
    )


def _read(path: Path, q: Quarantine) -> tuple[pl.DataFrame, int]:
    """The CSV with its header names stripped (Kaggle's `` EncodedPixels``), and rows read."""
    ids = [c for c in read_header(path) if c.strip() == ID]
    df, total = read_csv(path, [], q, ids=ids)
    found = [c for c in df.columns if c != ROW]
    if ID not in [c.strip() for c in found] or RLE not in [c.strip() for c in found]:
        raise SchemaError(
            f"{path.name}: missing column(s) among {[ID, RLE]}. Found columns: {found}. "
            f"Expected: {[ID, RLE]} (surrounding spaces are ignored). "
            "Is this the SIIM-ACR train-rle.csv?"
        )
    return df.rename({c: c.strip() for c in found if c != c.strip()}), total


ADAPTERS = [
    Adapter(
        name="siim-acr", dataset_id=DATASET, run=ingest,
        description="SIIM-ACR Pneumothorax train-rle CSV (RLE masks, -1 = none); -o mapping=",
        default_path="cxr/siim-pneumothorax-train-rle.csv.gz",
    )
]
