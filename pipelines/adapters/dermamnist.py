"""DermaMNIST: ``dermamnist_split_info.csv`` (the MedMNIST split of HAM10000's images).

DermaMNIST (Yang et al., MedMNIST v2) resizes HAM10000's 10,015 images and splits them
7:1:2 into train / val / test *by image*, not by lesion, so images of one lesion can sit in
two splits. This file (from Abhishek et al.'s corrected-datasets repository) maps each
MedMNIST array slot ``(split, index)`` back to its HAM10000 ``image_id``. The adapter writes
the split scheme ``dermamnist`` (with the array index in ``splits.position``) and its root
version ``ham10000@dermamnist``.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from medlake.catalog import Catalog, FileReport, IngestResult, Quarantine, __version__, publish
from medlake.catalog.ingestkit import root_versions, sha256_file
from medlake.pipelines.adapters import Adapter
from medlake.pipelines.adapters._csv import (
    ROW,
    blank,
    dedupe,
    link_to_images,
    quarantine_where,
    read_csv,
    stop_if_strict,
)

DATASET = "ham10000"
SCHEME = "dermamnist"
COLUMNS = ["split", "index", "image_id"]
SPLITS = ("train", "val", "test")


def ingest(
    cat: Catalog, path: Path, *, dataset_id: str = DATASET, strict: bool = False,
    scheme: str = SCHEME,
) -> IngestResult:
    """Ingest the DermaMNIST split file as split scheme ``scheme`` of ``dataset_id``.

    Parameters
    ----------
    cat
        The catalog; dataset ``dataset_id`` (HAM10000) must be ingested already.
    path
        ``dermamnist_split_info.csv`` (columns split, index, image_id).
    dataset_id
        The dataset whose images are split (default ``ham10000``).
    strict
        Raise :class:`catalog.IngestError` at the first bad row instead of quarantining it.
    scheme
        Name of the split scheme (default ``dermamnist``); the root version is
        ``<dataset_id>@<scheme>``.

    Returns
    -------
    IngestResult
        Rows read = ingested + quarantined; ``splits`` and ``versions`` rows written.

    Raises
    ------
    SchemaError
        A column is missing.
    IngestError
        (``strict``) the first bad row: unknown split, unparseable or repeated
        ``(split, index)``, repeated image id, or an image not in ``dataset_id``.
    """
    file = path.name
    q = Quarantine(dataset_id)
    df, total = read_csv(path, COLUMNS, q, ids=["image_id"])
    df = df.with_columns(pl.col(c).str.strip_chars() for c in COLUMNS)
    df = quarantine_where(q, file, df, blank("image_id"), "empty image_id", ROW, total=total)
    df = quarantine_where(
        q, file, df, ~pl.col("split").is_in(list(SPLITS)) | pl.col("split").is_null(),
        pl.lit("unknown split '") + pl.col("split").fill_null("") + pl.lit(f"' (known: {', '.join(SPLITS)})"),
        "image_id", total=total,
    )
    df = df.with_columns(pl.col("index").cast(pl.Int64, strict=False).alias("_pos"))
    df = quarantine_where(
        q, file, df, pl.col("_pos").is_null() | (pl.col("_pos") < 0),
        pl.lit("index is not a non-negative integer: '") + pl.col("index").fill_null("") + pl.lit("'"),
        "image_id", total=total,
    )
    df = df.with_columns((pl.col("split") + pl.lit("/") + pl.col("index")).alias("_slot"))
    df = dedupe(q, file, df, "_slot", total=total)
    df = dedupe(q, file, df, "image_id", total=total)
    df = link_to_images(cat, q, file, df, dataset_id=dataset_id, native_col="image_id", total=total)
    # Position gaps mean the file does not describe the whole published array.
    gaps = (
        df.group_by("split").agg(pl.len().alias("n"), pl.col("_pos").max().alias("top"))
        .filter(pl.col("top") + 1 != pl.col("n")).sort("split")
    )
    splits = df.select(
        pl.col("image_id"), pl.lit(dataset_id).alias("dataset_id"), pl.lit(scheme).alias("scheme"),
        pl.col("split"), pl.col("_pos").alias("position"),
    ).sort("split", "position")
    versions = root_versions(
        splits, dataset_id=dataset_id, inputs={file: sha256_file(path)}, medlake_version=__version__,
    )
    n_all = cat.image_ids(dataset_id).height
    messages = [
        f"scheme '{scheme}': " + ", ".join(
            f"{s} {splits.filter(pl.col('split') == s).height:,}" for s in SPLITS
        ),
        f"{n_all - splits.height:,} of {n_all:,} images of '{dataset_id}' are in no split",
    ]
    messages += [
        f"split '{r['split']}': {r['n']:,} rows but positions run to {r['top']:,} (gaps)"
        for r in gaps.iter_rows(named=True)
    ]
    stop_if_strict(q, file, strict=strict, total=total)
    report = FileReport(file, total, df.height, q.count(file))
    return publish(
        cat, adapter="dermamnist", dataset_id=dataset_id, partition=f"{dataset_id}--{scheme}",
        # an empty frame (not None) so a re-ingest that keeps no row also clears the old root
        tables={"splits": splits, "versions": versions if versions is not None
                else pl.DataFrame(schema={"name": pl.String})},
        quarantine=q, files=[report], messages=messages,
    )


ADAPTERS = [
    Adapter(
        name="dermamnist", dataset_id=DATASET, run=ingest, links_to="ham10000",
        description="DermaMNIST split info CSV: MedMNIST train/val/test split of HAM10000 images",
        default_path="dermamnist/dermamnist_split_info.csv",
    )
]
