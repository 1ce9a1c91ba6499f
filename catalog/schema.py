"""Every catalog table's schema, declared once.

A table is stored as Parquet files under ``lake/tables/<table>/<stage>/<partition>.parquet``:
the stage that writes a table owns its ``<stage>/`` folder (so DVC never sees two stages
declaring one output) and a partition is one unit of rewriting (usually one dataset or one
input file). Readers see the union of all files of a table.

Columns may grow; add them here, in the table's own block, and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION = 1

SOURCE_KINDS = ("report_nlp", "expert", "non_expert", "crowd", "model", "reviewer", "derived")
# How a source's missing rows should be read:
#   explicit  - every (covered image, finding) has a row (positives and negatives)
#   implicit  - only positives are stored; a covered image without a row is negative
#               (used for large multi-label vocabularies such as PadChest's ~190 labels)
#   none      - positive-only: absence means "not judged" (e.g. NIH bounding boxes)
NEGATIVES = ("explicit", "implicit", "none")
VALUE_TYPES = ("binary", "graded", "ordinal", "category")
LINEAGE_ACTIONS = ("kept", "removed", "moved", "relabelled", "merged")


@dataclass(frozen=True)
class TableSpec:
    """A catalog table: its name, the columns that identify a row and its Arrow schema."""

    name: str
    key: tuple[str, ...]
    schema: pa.Schema
    description: str


def _s(*fields: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema([pa.field(n, t) for n, t in fields])


STR, I32, I64, F64, BOOL = pa.string(), pa.int32(), pa.int64(), pa.float64(), pa.bool_()
TS = pa.timestamp("us", tz="UTC")

TABLES: dict[str, TableSpec] = {}


def _table(name: str, key: tuple[str, ...], description: str, *fields: tuple[str, pa.DataType]):
    TABLES[name] = TableSpec(name, key, _s(*fields), description)


# --- foundation (ingest) -------------------------------------------------------------------
_table(
    "datasets", ("dataset_id",), "one row per dataset",
    ("dataset_id", STR), ("name", STR), ("modality", STR), ("source", STR), ("license", STR),
    ("citation", STR), ("description", STR), ("images_root", STR),
)
_table(
    "images", ("image_id",), "one row per image; image_id = '<dataset>:<native id>'",
    ("image_id", STR), ("dataset_id", STR), ("native_id", STR), ("path", STR), ("sha256", STR),
    ("width", I32), ("height", I32), ("mode", STR), ("group_id", STR), ("patient_id", STR),
    ("study_id", STR), ("series_id", STR), ("view", STR), ("sex", STR), ("age", F64),
    ("site", STR), ("follow_up", I32), ("study_date", STR), ("modality", STR),
    ("phi_tags", STR),  # comma-separated identifying DICOM tags found (generic adapter)
    ("meta", STR),  # JSON object of dataset-specific metadata
)
_table(
    "sources", ("source_id",), "one row per label source",
    ("source_id", STR), ("dataset_id", STR), ("name", STR), ("kind", STR),
    ("exhaustive", BOOL), ("negatives", STR), ("value_type", STR), ("rule", STR),
    ("description", STR), ("code_map", STR),  # JSON: raw code -> {value, meaning}
    ("file", STR),
)
_table(
    "annotations", ("image_id", "source_id", "annotator", "finding"),
    "one row per image x source x annotator x finding (annotator '' when a source has one)",
    ("image_id", STR), ("source_id", STR), ("annotator", STR), ("finding", STR),
    ("value", F64), ("category", STR), ("raw_value", STR), ("meaning", STR), ("is_invalid", BOOL),
    ("note", STR),  # the annotator's free-text note on the image (e.g. purrlab tubes)
)
_table(
    "coverage", ("image_id", "source_id"), "which images each source judged",
    ("image_id", STR), ("source_id", STR),
)
_table(
    "splits", ("image_id", "scheme"), "one row per image and split scheme",
    ("image_id", STR), ("dataset_id", STR), ("scheme", STR), ("split", STR),
    ("position", I64),  # index in the scheme's published array (e.g. MedMNIST .npz), if any
)
_table(
    "findings", ("source_id", "finding"), "vocabulary per source, mapped to a shared vocabulary",
    ("source_id", STR), ("finding", STR), ("shared_finding", STR), ("value_type", STR),
)
_table(
    "quarantine", ("stage", "dataset_id", "file", "row", "item", "reason"), "rows and images that were not taken in, with why",
    ("stage", STR), ("dataset_id", STR), ("file", STR), ("row", I64), ("item", STR),
    ("reason", STR), ("detail", STR),
)
_table(
    "versions", ("name",), "dataset versions: roots from ingest, corrected ones from recipes",
    ("name", STR), ("dataset_id", STR), ("parent", STR), ("kind", STR), ("scheme", STR),
    ("recipe", STR), ("recipe_hash", STR), ("params", STR), ("inputs", STR),
    ("git_commit", STR), ("medlake_version", STR), ("created_at", TS), ("n_images", I64),
    ("counts", STR), ("path", STR),
)

# --- later stages: declared here so every table has one home ------------------------------
_table(
    "agreement",
    ("source_a", "annotator_a", "source_b", "annotator_b", "finding", "subgroup", "subgroup_value"),
    "agreement statistics per source (or annotator) pair, finding and subgroup ('' = all); "
    "kind: pair, annotators, raters (all readers of a source), positive_only, prevalence",
    ("dataset_id", STR), ("kind", STR), ("value_type", STR), ("source_a", STR),
    ("annotator_a", STR), ("source_b", STR), ("annotator_b", STR), ("finding", STR),
    ("finding_a", STR), ("finding_b", STR), ("subgroup", STR), ("subgroup_value", STR),
    ("n_subgroup", I64), ("n_shared", I64), ("n_excluded_a", I64), ("n_excluded_b", I64),
    ("pos_a", I64), ("pos_b", I64), ("both_pos", I64), ("observed", F64), ("expected", F64),
    ("kappa", F64), ("kappa_se", F64), ("kappa_lo", F64), ("kappa_hi", F64),
    ("kappa_linear", F64), ("kappa_quadratic", F64), ("off_by_one", F64),
    ("kappa_linear_lo", F64), ("kappa_linear_hi", F64),  # asymptotic 95% CI (statsmodels)
    ("kappa_quadratic_lo", F64), ("kappa_quadratic_hi", F64),
    ("confusion", STR),  # category pairs: the most frequent disagreements 'a->b: n; ...'
    ("reference", STR),  # the source taken as truth for ppv/npv/sens/spec (params.yaml)
    ("ppv", F64), ("ppv_lo", F64), ("ppv_hi", F64), ("npv", F64), ("npv_lo", F64),
    ("npv_hi", F64), ("sens", F64), ("sens_lo", F64), ("sens_hi", F64), ("spec", F64),
    ("spec_lo", F64), ("spec_hi", F64),
    ("pos_confirmed", F64), ("pos_confirmed_lo", F64), ("pos_confirmed_hi", F64),
    ("n_raters", I64), ("fleiss", F64), ("alpha", F64),
    ("n_a", I64), ("prev_a", F64), ("prev_a_lo", F64), ("prev_a_hi", F64),
    ("n_b", I64), ("prev_b", F64), ("prev_b_lo", F64), ("prev_b_hi", F64),
    ("rule", STR), ("note", STR),  # note: why a figure is missing (null + reason, never 0)
    # the label policies and choices in effect (JSON): {"sources": {source: {meaning or graded
    # value: exclude|negative|positive|category}}, "kappa_ci", "binarise"?, ...}
    ("policy", STR),
)
_table(
    "fingerprints", ("image_id",), "hashes, size and quality flags per image",
    ("image_id", STR), ("sha256", STR), ("width", I32), ("height", I32), ("mode", STR),
    ("dataset_id", STR), ("format", STR), ("bytes", I64),
    ("phash", STR), ("dhash", STR), ("ahash", STR), ("whash", STR),  # imagehash, 64-bit hex
    ("phash_sym", STR),  # pHash of its 32 x 32 reduction averaged with its mirror: same for mirrored copies
    ("brightness", F64), ("contrast", F64), ("sharpness", F64), ("entropy", F64),
    ("flags", STR),  # comma-separated quality flags ('' when none)
    ("params", STR),  # JSON of the thresholds that produced the flags
)
_table(
    "pairs", ("image_a", "image_b", "method"), "candidate duplicate pairs",
    ("image_a", STR), ("image_b", STR), ("method", STR), ("score", F64), ("verified", BOOL),
    ("hamming", I32), ("cosine", F64), ("inliers", I32), ("ncc", F64), ("transform", STR),
    ("evidence", STR), ("params", STR),
)
_table(
    "clusters", ("image_id",), "duplicate clusters from confirmed pairs",
    ("image_id", STR), ("cluster_id", STR), ("size", I64), ("datasets", STR), ("params", STR),
)
_table(
    # the storage of record of the embed stage (DVC-tracked, byte-reproducible); LanceDB under
    # lake/vectors is the working store and search index, rebuilt from this table when absent
    "embeddings", ("image_id", "model"), "one image vector per (image, model)",
    ("image_id", STR), ("model", STR), ("sha256", STR), ("vector", pa.list_(pa.float32())),
)
_table(
    "outliers", ("image_id",), "outlier score per image",
    ("image_id", STR), ("score", F64), ("rank", I64),
    ("dataset_id", STR), ("mean_sim", F64), ("model", STR), ("k", I64), ("params", STR),
)
_table(
    "leakage", ("dataset_id", "scheme", "grouping", "split_a", "split_b"),
    "groups spanning splits, per split pair, for all splits together (split_a = '*') and, "
    "optionally, groups present in every split (split_a = 'all')",
    ("dataset_id", STR), ("scheme", STR), ("split_a", STR), ("split_b", STR),
    ("n_groups", I64),
    # grouping: 'group_id' (patient/lesion) or 'group_id+duplicates' (union with clusters/pairs)
    ("grouping", STR), ("n_images_a", I64), ("n_images_b", I64), ("n_images", I64),
    ("n_pairs", I64), ("n_groups_total", I64), ("n_images_total", I64),
    ("version", STR),  # the version whose splits were checked (root '<dataset>@<scheme>')
    # rows split_a = split_b = 'all' (groups in every split, params.yaml leakage.all_splits):
    # JSON {"splits", "images": {split: n}, "pairs": {"a|b": n}}; null on the other rows
    ("by_split", STR),
)
_table(
    "lineage", ("version", "image_id", "rule"), "what happened to each image in a version",
    ("version", STR), ("image_id", STR), ("rule", STR), ("action", STR), ("reason", STR),
    ("evidence", STR), ("from_split", STR), ("to_split", STR),
    ("step", I32), ("label", STR), ("old_value", STR), ("new_value", STR), ("into", STR),
)
_table(
    "reviews", ("review_id",), "human verdicts, append-only; the latest per item counts",
    ("review_id", STR), ("item", STR), ("kind", STR), ("reviewer", STR), ("verdict", STR),
    ("rule", STR), ("note", STR), ("created_at", TS),
    # what the item is made of, so recipes need not parse `item` (see catalog/reviews.py)
    ("image_id", STR), ("image_b", STR), ("source_id", STR), ("finding", STR),
    ("label", STR), ("label_shown", BOOL), ("session", STR),
    # how the reviewer was identified: 'typed' | 'proxy-header:<NAME>' | 'insecure-open'
    # (medlake ui); null for rows recorded before the column existed or by library code
    ("identity", STR),
)


def spec(name: str) -> TableSpec:
    """Return the declared spec of table ``name``.

    Raises
    ------
    KeyError
        With the list of known tables when ``name`` is not one of them.
    """
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown table '{name}'; known tables: {', '.join(sorted(TABLES))}") from None
