"""CheXpert v1.0 (small) training labels: ``train.csv``.

223,414 chest X-rays of 64,540 patients (Stanford) labelled by the CheXpert labeler, a
rule-based NLP tool run on the reports, for 14 observations. Each cell is 1.0 (positive),
0.0 (negative), -1.0 (uncertain) or blank (not mentioned); all four are kept distinct:
uncertain and not-mentioned rows have value null and say which in ``meaning``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
from medlake.pipelines.adapters.nih_linked import no_options, raise_if_strict

DATASET = "chexpert"
FINDINGS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]
COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FINDINGS]
PATH_RE = r"(?:^|/)(patient\d+)/(study\d+)/(view\d+)_(frontal|lateral)\.\w+$"
# raw cell text -> (value, meaning); blank cells are 'not_mentioned'
CODES: dict[str, tuple[float | None, str]] = {
    "1.0": (1.0, "positive"), "0.0": (0.0, "negative"), "-1.0": (None, "uncertain"),
    # blank cells are not stored (negatives 'implicit'): a covered image without a row for
    # an observation was not mentioned; the labels_dense view shows those rows
    ABSENT: (None, "not_mentioned"),
}
ALIASES = {"1": "1.0", "0": "0.0", "-1": "-1.0"}
SEX = {"Male": "M", "Female": "F"}
DATASET_ROW = {
    "name": "CheXpert v1.0 (small), train",
    "modality": "CXR",
    "source": "Stanford ML Group; metadata via torchxrayvision 1.5.7",
    "license": "Stanford University School of Medicine CheXpert Dataset Research Use "
               "Agreement (not stated in source)",
    "citation": "Irvin J. et al. CheXpert: A Large Chest Radiograph Dataset with Uncertainty "
                "Labels and Expert Comparison. AAAI 2019.",
    "description": "223,414 chest X-rays, 64,540 patients; 14 observations from the CheXpert "
                   "report labeler (positive, negative, uncertain, not mentioned).",
}


def ingest(
    cat: Catalog, path: Path, *, dataset_id: str = DATASET, strict: bool = False,
    **options: Any,
) -> IngestResult:
    """Ingest CheXpert's ``train.csv``: images and dense report-NLP rows for 14 observations.

    Parameters
    ----------
    cat
        The catalog.
    path
        ``train.csv`` (plain or .gz).
    dataset_id
        Dataset id (default ``chexpert``).
    strict
        Raise at the first bad row instead of quarantining it.

    Returns
    -------
    IngestResult
        Partition ``<dataset_id>``: images (image id = the Path, group = patient), source
        ``<dataset_id>:report_nlp`` with one row per image and observation.

    Raises
    ------
    SchemaError
        Missing columns. ``IngestError``: unreadable file, unknown option, ``strict`` and a
        bad row.
    """
    no_options("chexpert", options)
    file = path.name
    q = Quarantine(dataset_id)
    df, total = read_csv(path, COLUMNS, q, ids=["Path"])
    df = df.with_columns(pl.col("Path").str.strip_chars())
    df = quarantine_where(q, file, df, blank("Path"), "empty Path", ROW, total=total)
    df = dedupe(q, file, df, "Path", total=total)
    df = df.with_columns(pl.col("Path").str.extract_groups(PATH_RE).alias("_parts")).with_columns(
        pl.col("_parts").struct.field("1").alias("_patient"),
        pl.col("_parts").struct.field("2").alias("_study"),
    ).drop("_parts")  # the regex runs once (two struct.field calls on it would run it twice)
    df = quarantine_where(
        q, file, df, pl.col("_patient").is_null(),
        "Path does not look like .../patientN/studyN/viewN_frontal|lateral.jpg", "Path",
        total=total,
    )
    df = df.with_columns(
        [pl.col(f).str.strip_chars().fill_null("") for f in FINDINGS]
    )
    known = [*CODES, *ALIASES, ""]
    bad = pl.any_horizontal([~pl.col(f).is_in(known) for f in FINDINGS])
    first_bad = pl.coalesce(
        [pl.when(~pl.col(f).is_in(known)).then(pl.lit(f"{f}=") + pl.col(f)) for f in FINDINGS]
    )
    df = quarantine_where(
        q, file, df, bad,
        pl.lit("unparseable label (expected 1.0, 0.0, -1.0 or blank): ") + first_bad, "Path",
        total=total,
    )
    df = parse_number(q, file, df, "Age", alias="_age", lo=AGE_RANGE[0], hi=AGE_RANGE[1],
                      item="Path", total=total)
    frontal = pl.col("Frontal/Lateral").str.strip_chars() == "Frontal"
    images = df.select(
        (pl.lit(dataset_id + ":") + pl.col("Path")).alias("image_id"),
        pl.lit(dataset_id).alias("dataset_id"), pl.col("Path").alias("native_id"),
        pl.col("Path").alias("path"),
        (pl.lit(dataset_id + ":") + pl.col("_patient")).alias("group_id"),
        pl.col("_patient").alias("patient_id"),
        pl.concat_str("_patient", "_study", separator="/").alias("study_id"),
        pl.when(frontal).then(pl.col("AP/PA")).otherwise(pl.lit("LATERAL")).alias("view"),
        pl.col("Sex").replace_strict(SEX, default=None).alias("sex"),
        pl.col("_age").alias("age"), pl.lit("CXR").alias("modality"),
        pl.struct(pl.col("Frontal/Lateral").alias("frontal_lateral"),
                  pl.col("AP/PA").alias("ap_pa"), pl.col("Sex").alias("sex_raw"))
        .struct.json_encode().alias("meta"),
    )
    source_id = f"{dataset_id}:report_nlp"
    # cell text (codes and their aliases '1', '0', '-1') -> raw_value (the code), value, meaning
    cells = {**{k: k for k in CODES}, **ALIASES}
    codes = pl.DataFrame(
        {"_cell": list(cells), "raw_value": list(cells.values()),
         "value": [CODES[c][0] for c in cells.values()],
         "meaning": [CODES[c][1] for c in cells.values()]},
        schema={"_cell": pl.String, "raw_value": pl.String, "value": pl.Float64,
                "meaning": pl.String},
    )
    # long rows finding by finding, blank cells left out before they are made (an unpivot
    # would build all 14 x images rows first); same order as unpivot (finding-major)
    image_id = (pl.lit(dataset_id + ":") + pl.col("Path")).alias("image_id")
    ann = (
        pl.concat([
            df.filter(pl.col(f) != "").select(
                image_id, pl.lit(f).alias("finding"), pl.col(f).alias("_cell"))
            for f in FINDINGS
        ])
        .join(codes, on="_cell", how="left", maintain_order="left")
        .select(
            "image_id", pl.lit(source_id).alias("source_id"), pl.lit("").alias("annotator"),
            "finding", "value", "raw_value", "meaning", pl.lit(False).alias("is_invalid"),
        )
    )
    sources = [{
        "source_id": source_id, "dataset_id": dataset_id, "name": "report_nlp",
        "kind": "report_nlp", "exhaustive": True, "negatives": "implicit",
        "value_type": "binary",
        "rule": "CheXpert labeler (rule-based NLP on the radiology report): 1.0 positive, "
                "0.0 negative, -1.0 uncertain (value null); blank = not mentioned: no row is "
                "stored (value null, meaning not_mentioned in the labels_dense view)",
        "description": "CheXpert report labels for 14 observations (Irvin et al. 2019)",
        "code_map": code_map(CODES), "file": file,
    }]
    report = FileReport(file, total, df.height, q.count(file))
    raise_if_strict(q, strict, [report])
    return publish(
        cat, adapter="chexpert", dataset_id=dataset_id, partition=dataset_id,
        tables={
            "datasets": [{"dataset_id": dataset_id, **DATASET_ROW}],
            "images": images, "sources": sources, "annotations": ann,
            "coverage": images.select("image_id", pl.lit(source_id).alias("source_id")),
            "findings": findings_rows(cat, source_id, FINDINGS, "binary"),
        },
        quarantine=q, files=[report],
        messages=[f"{images['patient_id'].n_unique():,} patients"],
    )


ADAPTERS = [
    Adapter(
        name="chexpert", dataset_id=DATASET, run=ingest,
        description="CheXpert v1.0 train.csv: images, patients, 14 report-NLP observations",
        default_path="cxr/chexpert_train.csv.gz",
    )
]
