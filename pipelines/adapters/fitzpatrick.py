"""Fitzpatrick17k: ``fitzpatrick17k.csv`` in its current (2022-07-06) and first (2021-04-16) release.

16,577 clinical photographs from two online atlases (DermaAmin, Atlas Dermatologico), each
with a skin-condition label (114 conditions, grouped into nine and three partitions) and
Fitzpatrick skin-type labels 1-6 from crowd annotators (Groh et al., CVPR-W 2021). The image
id is the file's ``md5hash``. ``-1`` means the annotators could not tell the skin type: it is
stored as value null with meaning ``unknown`` (raw value ``-1``), never as a number.

Two formats:

* ``fitzpatrick17k`` - the current release: images, ``label``, two skin-type sources
  (``fitzpatrick_scale``, ``fitzpatrick_centaur``) and the dermatologist quality check
  ``qc``; root version ``fitzpatrick17k@2022-07-06``.
* ``fitzpatrick17k-2021`` - the first release (one skin-type column ``fitzpatrick``), as
  labels of the same images: sources suffixed ``@2021-04-16``; root version
  ``fitzpatrick17k@2021-04-16``. Diffing the two releases' sources and annotations shows what
  changed between them.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from medlake.catalog import Catalog, FileReport, IngestResult, Quarantine, __version__, publish
from medlake.catalog.ingestkit import findings_rows, sha256_file
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

DATASET = "fitzpatrick17k"
RELEASE = "2022-07-06"
FIRST_RELEASE = "2021-04-16"
LABELS = ["label", "nine_partition_label", "three_partition_label"]
SKIN_TYPES = {  # column -> who labelled it
    "fitzpatrick_scale": "Scale AI annotators",
    "fitzpatrick_centaur": "Centaur Labs annotators",
    "fitzpatrick": "Scale AI annotators (the first release's only skin-type column; "
                   "named fitzpatrick_scale from the 2022 release on)",
}
SKIN_CODES = {"-1": (None, "unknown"), **{str(i): (float(i), f"skin_type_{i}") for i in range(1, 7)}}
QC = {  # the quality-check codes of the release and their meaning
    "1 Diagnostic": "diagnostic", "2 Characteristic": "characteristic",
    "3 Wrongly labelled": "wrongly_labelled", "4 Other": "other", "5 Potentially": "potentially",
}
DATASET_ROW = {
    "name": "Fitzpatrick17k",
    "modality": "clinical photograph",
    "source": "github.com/mattgroh/fitzpatrick17k (fitzpatrick17k.csv); images from "
              "DermaAmin and Atlas Dermatologico (not included)",
    "license": "CC BY-NC-SA 3.0 (repository README); images belong to the atlases",
    "citation": "Groh M. et al. Evaluating deep neural networks trained on clinical images "
                "in dermatology with the Fitzpatrick 17k dataset. CVPR-W 2021.",
    "description": "16,577 clinical images, 114 skin conditions, Fitzpatrick skin types 1-6.",
}


def _read(path: Path, skin_cols: list[str], q: Quarantine) -> tuple[pl.DataFrame, int]:
    """Read, strip and check one release file; bad rows go to ``q``."""
    file = path.name
    df, total = read_csv(path, ["md5hash", *skin_cols, *LABELS, "qc"], q, ids=["md5hash"])
    df = df.with_columns(pl.col(c).str.strip_chars() for c in ["md5hash", *skin_cols, *LABELS, "qc"])
    df = quarantine_where(q, file, df, blank("md5hash"), "empty md5hash", ROW, total=total)
    df = quarantine_where(
        q, file, df, ~pl.col("md5hash").str.contains(r"^[0-9a-f]{32}$"),
        "md5hash is not 32 lower-case hex digits", "md5hash", total=total,
    )
    df = dedupe(q, file, df, "md5hash", total=total)
    for c in LABELS:
        df = quarantine_where(q, file, df, blank(c), f"empty {c}", "md5hash", total=total)
    for c in skin_cols:
        df = df.with_columns(pl.col(c).str.replace(r"^(-?\d+)\.0+$", "${1}").alias(f"_{c}"))
        df = quarantine_where(
            q, file, df, ~pl.col(f"_{c}").is_in(list(SKIN_CODES)) | pl.col(f"_{c}").is_null(),
            pl.lit(f"{c} is not a skin type 1-6 or -1 (unknown): '")
            + pl.col(c).fill_null("") + pl.lit("'"),
            "md5hash", total=total,
        )
    return df.with_columns(pl.when(blank("qc")).then(None).otherwise(pl.col("qc")).alias("qc")), total


def _labels(
    cat: Catalog, df: pl.DataFrame, *, dataset_id: str, file: str, skin_cols: list[str],
    suffix: str,
) -> dict[str, object]:
    """sources, annotations, coverage and findings of one release (``image_id`` set in ``df``)."""
    sid = {n: f"{dataset_id}:{n}{suffix}" for n in ["label", *skin_cols, "qc"]}
    release = f" (release {suffix[1:]})" if suffix else ""
    base = [pl.col("image_id"), pl.lit("").alias("annotator")]
    frames = [
        df.select(
            *base, pl.lit(sid["label"]).alias("source_id"), pl.lit(c).alias("finding"),
            pl.lit(None, pl.Float64).alias("value"), pl.col(c).alias("category"),
            pl.col(c).alias("raw_value"), pl.lit(None, pl.String).alias("meaning"),
        )
        for c in LABELS
    ]
    sources = [{
        "source_id": sid["label"], "dataset_id": dataset_id, "name": "label" + suffix,
        "kind": "expert", "exhaustive": True, "negatives": "explicit", "value_type": "category",
        "rule": "the skin condition the source atlas (DermaAmin, Atlas Dermatologico) gives for "
                "the image (finding 'label', 114 conditions); 'nine_partition_label' and "
                "'three_partition_label' are the authors' groupings of it, as categories",
        "description": "Fitzpatrick17k condition label" + release,
        "code_map": None, "file": file,
    }]
    findings = findings_rows(cat, sid["label"], LABELS, "category")
    for c in skin_cols:
        m = {k: v[1] for k, v in SKIN_CODES.items()}
        v = {k: v[0] for k, v in SKIN_CODES.items()}
        frames.append(df.select(
            *base, pl.lit(sid[c]).alias("source_id"), pl.lit(c).alias("finding"),
            pl.col(f"_{c}").replace_strict(v, return_dtype=pl.Float64).alias("value"),
            pl.lit(None, pl.String).alias("category"), pl.col(c).alias("raw_value"),
            pl.col(f"_{c}").replace_strict(m, return_dtype=pl.String).alias("meaning"),
        ))
        sources.append({
            "source_id": sid[c], "dataset_id": dataset_id, "name": c + suffix, "kind": "crowd",
            "exhaustive": True, "negatives": "explicit", "value_type": "ordinal",
            "rule": f"Fitzpatrick skin type 1-6 by {SKIN_TYPES[c]}; -1 (could not be "
                    "determined) is stored as value null, meaning 'unknown', raw value '-1'",
            "description": f"Fitzpatrick17k skin type, column '{c}'" + release,
            "code_map": code_map(SKIN_CODES), "file": file,
        })
        findings += findings_rows(cat, sid[c], [c], "ordinal")
    qc = df.filter(pl.col("qc").is_not_null())
    if qc.height:
        frames.append(qc.select(
            *base, pl.lit(sid["qc"]).alias("source_id"), pl.lit("qc").alias("finding"),
            pl.lit(None, pl.Float64).alias("value"), pl.col("qc").alias("category"),
            pl.col("qc").alias("raw_value"),
            pl.col("qc").replace_strict(QC, default=None, return_dtype=pl.String).alias("meaning"),
        ))
        codes = sorted(qc["qc"].unique().to_list())
        sources.append({
            "source_id": sid["qc"], "dataset_id": dataset_id, "name": "qc" + suffix,
            "kind": "expert", "exhaustive": False, "negatives": "none", "value_type": "category",
            "rule": "a board-certified dermatologist's quality check of a random subset: is the "
                    "image diagnostic of its label (1 Diagnostic, 2 Characteristic, 3 Wrongly "
                    "labelled, 4 Other, 5 Potentially); images without a qc value were not checked",
            "description": f"Fitzpatrick17k label quality check of {qc.height:,} images" + release,
            "code_map": code_map({k: (None, QC.get(k)) for k in codes}), "file": file,
        })
        findings += findings_rows(cat, sid["qc"], ["qc"], "category")
    ann = pl.concat(
        [f.with_columns(pl.lit(False).alias("is_invalid")) for f in frames], how="diagonal_relaxed"
    )
    coverage = ann.select("image_id", "source_id").unique().sort("source_id", "image_id")
    return {"sources": sources, "annotations": ann, "coverage": coverage, "findings": findings}


def _release_version(
    *, dataset_id: str, release: str, path: Path, tables: dict[str, object]
) -> pl.DataFrame:
    """The root ``versions`` row of a release (same columns as ``root_versions``' rows)."""
    ann = pl.DataFrame(tables["annotations"])
    src = [s["source_id"] for s in tables["sources"]]  # type: ignore[attr-defined]
    per_source = ann.group_by("source_id").agg(pl.col("image_id").n_unique()).sort("source_id")
    return pl.DataFrame([{
        "name": f"{dataset_id}@{release}", "dataset_id": dataset_id, "parent": None,
        "kind": "root", "scheme": None, "recipe": None, "recipe_hash": None,
        "params": json.dumps({"release": release, "sources": sorted(src)}, sort_keys=True),
        "inputs": json.dumps({path.name: sha256_file(path)}, sort_keys=True), "git_commit": None,
        "medlake_version": __version__, "created_at": None,
        "n_images": ann["image_id"].n_unique(),
        "counts": json.dumps({"images_per_source": dict(per_source.iter_rows())}, sort_keys=True),
        "path": None,
    }])


def _unknown_counts(df: pl.DataFrame, skin_cols: list[str]) -> list[str]:
    return [f"{c}: {df.filter(pl.col(f'_{c}') == '-1').height:,} unknown (-1)" for c in skin_cols]


def ingest(
    cat: Catalog, path: Path, *, dataset_id: str = DATASET, strict: bool = False,
    release: str = RELEASE,
) -> IngestResult:
    """Ingest the current Fitzpatrick17k release: images, label, skin types, qc, root version.

    Parameters
    ----------
    cat
        The catalog to write to.
    path
        ``fitzpatrick17k.csv`` (md5hash, fitzpatrick_scale, fitzpatrick_centaur, label,
        nine_partition_label, three_partition_label, qc, url, url_alphanum).
    dataset_id
        Dataset id (default ``fitzpatrick17k``).
    strict
        Raise :class:`catalog.IngestError` at the first bad row instead of quarantining it.
    release
        Release date, named in the root version ``<dataset_id>@<release>``.

    Returns
    -------
    IngestResult
        Rows read = ingested + quarantined; tables written with their row counts.

    Raises
    ------
    SchemaError
        A column is missing.
    IngestError
        (``strict``) the first bad row: empty, malformed or repeated md5hash, an empty
        label, or a skin type other than 1-6 / -1.
    """
    file = path.name
    skin = ["fitzpatrick_scale", "fitzpatrick_centaur"]
    q = Quarantine(dataset_id)
    df, total = _read(path, skin, q)
    if "url" not in df.columns:
        df = df.with_columns(pl.lit(None, pl.String).alias("url"))
    if "url_alphanum" not in df.columns:
        df = df.with_columns(pl.lit(None, pl.String).alias("url_alphanum"))
    df = df.with_columns((pl.lit(dataset_id + ":") + pl.col("md5hash")).alias("image_id"))
    images = df.select(
        pl.col("image_id"), pl.lit(dataset_id).alias("dataset_id"),
        pl.col("md5hash").alias("native_id"),
        pl.col("url").str.extract(r"^[a-zA-Z]+://(?:www\.)?([^/:]+)", 1).str.to_lowercase().alias("site"),
        pl.lit("clinical photograph").alias("modality"),
        pl.struct(pl.col("qc"), pl.col("url"), pl.col("url_alphanum")).struct.json_encode().alias("meta"),
    )
    tables: dict[str, object] = {
        "datasets": [{"dataset_id": dataset_id, **DATASET_ROW}], "images": images,
        **_labels(cat, df, dataset_id=dataset_id, file=file, skin_cols=skin, suffix=""),
    }
    tables["versions"] = _release_version(dataset_id=dataset_id, release=release, path=path, tables=tables)
    sites = images.group_by("site").len().sort("site", nulls_last=True)
    stop_if_strict(q, file, strict=strict, total=total)
    report = FileReport(file, total, df.height, q.count(file))
    return publish(
        cat, adapter="fitzpatrick17k", dataset_id=dataset_id, partition=dataset_id,
        tables=tables, quarantine=q, files=[report],
        messages=[
            *_unknown_counts(df, skin),
            "site: " + ", ".join(f"{s or 'no url'} {n:,}" for s, n in sites.iter_rows()),
        ],
    )


def ingest_2021(
    cat: Catalog, path: Path, *, dataset_id: str = DATASET, strict: bool = False,
    release: str = FIRST_RELEASE,
) -> IngestResult:
    """Ingest the first Fitzpatrick17k release as labels of the current release's images.

    Parameters
    ----------
    cat
        The catalog; dataset ``dataset_id`` must be ingested already (format
        ``fitzpatrick17k``).
    path
        ``fitzpatrick17k_2021-04-16.csv`` (unnamed index, md5hash, fitzpatrick, label,
        nine_partition_label, three_partition_label, qc, url, url_alphanum).
    dataset_id
        Dataset id (default ``fitzpatrick17k``).
    strict
        Raise :class:`catalog.IngestError` at the first bad row instead of quarantining it.
    release
        Release date: suffix of the sources (``<dataset>:label@<release>``), partition
        ``<dataset>--<release>`` and root version ``<dataset>@<release>``.

    Returns
    -------
    IngestResult
        Rows read = ingested + quarantined; tables written with their row counts.

    Raises
    ------
    SchemaError
        A column is missing.
    IngestError
        (``strict``) the first bad row, as for :func:`ingest`, or an md5hash that is not an
        image of ``dataset_id``.
    """
    file = path.name
    skin = ["fitzpatrick"]
    q = Quarantine(dataset_id)
    df, total = _read(path, skin, q)
    df = link_to_images(cat, q, file, df, dataset_id=dataset_id, native_col="md5hash", total=total)
    tables = _labels(cat, df, dataset_id=dataset_id, file=file, skin_cols=skin, suffix=f"@{release}")
    tables["versions"] = _release_version(dataset_id=dataset_id, release=release, path=path, tables=tables)
    stop_if_strict(q, file, strict=strict, total=total)
    report = FileReport(file, total, df.height, q.count(file))
    return publish(
        cat, adapter="fitzpatrick17k-2021", dataset_id=dataset_id,
        partition=f"{dataset_id}--{release}", tables=tables, quarantine=q, files=[report],
        messages=_unknown_counts(df, skin),
    )


ADAPTERS = [
    Adapter(
        name="fitzpatrick17k", dataset_id=DATASET, run=ingest,
        description="Fitzpatrick17k CSV (2022-07-06): images, conditions, two skin-type sources, qc",
        default_path="fitzpatrick17k/fitzpatrick17k.csv",
    ),
    Adapter(
        name="fitzpatrick17k-2021", dataset_id=DATASET, run=ingest_2021, links_to="fitzpatrick17k",
        description="Fitzpatrick17k first release (2021-04-16) as labels of the current images",
        default_path="fitzpatrick17k/fitzpatrick17k_2021-04-16.csv",
    ),
]
