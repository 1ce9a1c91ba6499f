"""The generic adapter's configuration: the YAML / ``-o`` options, and how label cells parse.

See :mod:`pipelines.adapters.generic` for the format. :func:`load_config` turns a YAML file
(or a folder plus ``-o`` options) into a :class:`GenericConfig`; :func:`read_manifest` reads a
CSV or Parquet manifest as text; :func:`parse_label` gives the value, category and meaning of
one label column as Polars expressions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from medlake.catalog import IngestError, Quarantine, SchemaError
from medlake.catalog.ingestkit import check_dataset_id, require_columns
from medlake.catalog.schema import SOURCE_KINDS, VALUE_TYPES
from medlake.pipelines.adapters._csv import ROW, check_rows, read_csv

STD_COLUMNS = (
    "id", "path", "group", "patient", "study", "series", "split", "sex", "age", "site", "view",
    "study_date", "follow_up",
)
SCALARS = ("dataset", "name", "modality", "license", "citation", "description", "images_root",
           "manifest", "split_scheme")
TRUE = {"1", "1.0", "true", "t", "yes", "y", "positive", "pos"}
FALSE = {"0", "0.0", "false", "f", "no", "n", "negative", "neg"}


@dataclass(frozen=True)
class LabelSpec:
    """One manifest column read as one source's finding."""

    column: str
    source: str
    finding: str
    kind: str = "non_expert"
    value_type: str = "category"
    unknown: tuple[str, ...] = ("",)
    rule: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class GenericConfig:
    """A parsed generic-adapter configuration; paths are absolute."""

    dataset: str
    manifest: Path
    images_root: Path | None
    columns: dict[str, str]
    labels: tuple[LabelSpec, ...]
    meta_columns: tuple[str, ...] = ()
    split_scheme: str = "original"
    info: tuple[tuple[str, str | None], ...] = ()
    config_file: Path | None = None


def load_config(path: Path, options: dict[str, Any], dataset_id: str | None = None) -> GenericConfig:
    """Parse a YAML file (or, for a folder, the options alone) into a :class:`GenericConfig`.

    Options override the YAML's keys (``-o manifest=...``, ``-o id=...``, ``-o label=...``).

    Raises
    ------
    SchemaError
        Unreadable YAML, unknown keys, a missing id or manifest, a bad kind or value_type.
    """
    path = Path(path)
    where = path.name
    if path.is_dir():
        raw: dict[str, Any] = {}
        base = path
        images_default: Path | None = path
    else:
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise SchemaError(f"{where}: not readable YAML ({str(e).splitlines()[0]})") from e
        if not isinstance(raw, dict):
            raise SchemaError(f"{where}: expected a mapping of keys (dataset, manifest, columns, ...)")
        base = path.parent
        images_default = path.parent
    raw = _merge_options(raw, options, where)
    known = {*SCALARS, "columns", "labels", "meta_columns"}
    unknown_keys = sorted(set(raw) - known)
    if unknown_keys:
        raise SchemaError(f"{where}: unknown keys {unknown_keys}; known keys: {sorted(known)}")
    dataset = dataset_id or raw.get("dataset")
    if not dataset:
        raise SchemaError(f"{where}: no dataset id; add 'dataset: NAME' or pass --dataset NAME")
    check_dataset_id(dataset, where="--dataset" if dataset_id else f"{where}: dataset")
    if not raw.get("manifest"):
        raise SchemaError(f"{where}: no manifest; add 'manifest: FILE.csv' (or -o manifest=FILE)")
    manifest = _under(base, str(raw["manifest"]))
    columns = {str(k): str(v) for k, v in (raw.get("columns") or {}).items() if v is not None}
    bad_cols = sorted(set(columns) - set(STD_COLUMNS))
    if bad_cols:
        raise SchemaError(f"{where}: unknown columns keys {bad_cols}; known: {list(STD_COLUMNS)}")
    if "id" not in columns:
        raise SchemaError(f"{where}: columns.id is required (the manifest column with the image id)")
    root = _under(base, str(raw["images_root"])) if raw.get("images_root") else images_default
    labels = tuple(_label(x, i, where) for i, x in enumerate(raw.get("labels") or []))
    if len({(lb.source, lb.finding) for lb in labels}) != len(labels):
        raise SchemaError(f"{where}: two label columns map to the same source and finding")
    meta = raw.get("meta_columns") or []
    meta = [m.strip() for m in meta.split(",")] if isinstance(meta, str) else [str(m) for m in meta]
    info = tuple((k, None if raw.get(k) is None else str(raw[k]))
                 for k in ("name", "modality", "license", "citation", "description"))
    return GenericConfig(
        dataset=str(dataset), manifest=manifest, images_root=root if "path" in columns else None,
        columns=columns, labels=labels, meta_columns=tuple(m for m in meta if m),
        split_scheme=str(raw.get("split_scheme") or "original"), info=info,
        config_file=None if path.is_dir() else path,
    )


def _under(base: Path, rel: str) -> Path:
    p = Path(rel).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def _merge_options(raw: dict[str, Any], options: dict[str, Any], where: str) -> dict[str, Any]:
    out = {**raw, "columns": dict(raw.get("columns") or {})}
    flag_labels: list[str] = []
    unknown_vals: list[str] | None = None
    for k, v in options.items():
        vals = v if isinstance(v, (list, tuple)) else [v]
        if k in SCALARS:
            out[k] = vals[-1]
        elif k in STD_COLUMNS:
            out["columns"][k] = vals[-1]
        elif k in ("label", "labels"):
            flag_labels += [s for x in vals for s in str(x).split(",") if s.strip()]
        elif k in ("meta", "meta_columns"):
            out["meta_columns"] = [s.strip() for x in vals for s in str(x).split(",") if s.strip()]
        elif k == "unknown":
            unknown_vals = str(vals[-1]).split("|")
        else:
            raise SchemaError(
                f"{where}: unknown option '{k}'; options are {list(SCALARS)}, the column keys "
                f"{list(STD_COLUMNS)}, label=COLUMN:kind:value_type[:source[:finding]], "
                "meta=COL,COL and unknown=VALUE|VALUE"
            )
    if flag_labels:
        out["labels"] = []
        for s in flag_labels:
            parts = [x.strip() for x in s.split(":")]
            d: dict[str, Any] = dict(zip(["column", "kind", "value_type", "source", "finding"], parts))
            if unknown_vals is not None:
                d["unknown"] = unknown_vals
            out["labels"].append(d)
    return out


def _label(x: Any, i: int, where: str) -> LabelSpec:
    if not isinstance(x, dict) or not x.get("column"):
        raise SchemaError(f"{where}: labels[{i}] needs at least 'column' (got {x!r})")
    col = str(x["column"])
    kind = str(x.get("kind") or "non_expert")
    vt = str(x.get("value_type") or "category")
    if kind not in SOURCE_KINDS:
        raise SchemaError(f"{where}: labels[{i}] ({col}): kind '{kind}' is not one of {list(SOURCE_KINDS)}")
    if vt not in VALUE_TYPES:
        raise SchemaError(f"{where}: labels[{i}] ({col}): value_type '{vt}' is not one of {list(VALUE_TYPES)}")
    unk = x.get("unknown", [""])
    unk = [unk] if isinstance(unk, str) else list(unk or [])
    return LabelSpec(
        column=col, source=str(x.get("source") or col), finding=str(x.get("finding") or col),
        kind=kind, value_type=vt, unknown=tuple(sorted({str(u).strip().lower() for u in unk} | {""})),
        rule=x.get("rule"), description=x.get("description"),
    )


def read_manifest(
    path: Path, expected: list[str], q: Quarantine, *, ids: Sequence[str] = ()
) -> tuple[pl.DataFrame, int]:
    """A CSV or Parquet manifest with every column as text plus a 1-based ``__row``.

    CSV goes through the shared reader (:func:`pipelines.adapters._csv.read_csv`: encoding,
    repeated header names, short/long rows, control bytes, over-long ids); a Parquet manifest
    gets the same row checks. Returns the good rows and the number of rows read.
    """
    if not path.is_file():
        raise IngestError(
            f"{path.name}: manifest not found (looked for {_shown(path)}); check 'manifest' "
            "in the config: a relative path is read from the YAML's folder, or with -o options "
            "from the image folder")
    if path.suffix.lower() not in (".parquet", ".pq"):
        return read_csv(path, expected, q, ids=ids)
    try:
        df = pl.read_parquet(path)
        df = df.with_columns(pl.all().cast(pl.String))
    except (pl.exceptions.PolarsError, OSError) as e:
        raise IngestError(f"{path.name}: cannot be read as Parquet ({str(e).splitlines()[0]})") from e
    require_columns(path.name, df.columns, expected)
    df = df.with_row_index(ROW, offset=1).with_columns(pl.col(ROW).cast(pl.Int64))
    return check_rows(q, path.name, df, ids=ids, total=df.height), df.height


def parse_label(lb: LabelSpec) -> tuple[pl.Expr, pl.Expr, pl.Expr]:
    """(value, category, meaning) expressions for one label column; value null = unparseable."""
    raw = pl.col(lb.column).fill_null("").str.strip_chars()
    low = raw.str.to_lowercase()
    unknown = low.is_in(list(lb.unknown))
    num = raw.cast(pl.Float64, strict=False)
    if lb.value_type == "binary":
        value = pl.when(low.is_in(list(TRUE))).then(1.0).when(low.is_in(list(FALSE))).then(0.0)
        meaning = pl.when(value == 1.0).then(pl.lit("positive")).otherwise(pl.lit("negative"))
    elif lb.value_type == "graded":
        value = pl.when((num >= 0) & (num <= 1)).then(num)
        meaning = pl.lit("graded")
    elif lb.value_type == "ordinal":
        value = pl.when(num.is_finite()).then(num)  # NaN and infinity (1e400) are not grades
        meaning = pl.lit("ordinal")
    else:
        value = pl.lit(None, pl.Float64)
        meaning = pl.lit("category")
    value = pl.when(unknown).then(None).otherwise(value).cast(pl.Float64)
    category = pl.when(unknown).then(None).otherwise(raw) if lb.value_type == "category" else pl.lit(None, pl.String)
    meaning = pl.when(unknown).then(pl.lit("unknown")).otherwise(meaning)
    return value, category, meaning


def bad_label(lb: LabelSpec) -> pl.Expr:
    if lb.value_type == "category":
        return pl.lit(False)
    value, _, _ = parse_label(lb)
    unknown = pl.col(lb.column).fill_null("").str.strip_chars().str.to_lowercase().is_in(list(lb.unknown))
    return value.is_null() & ~unknown


def code_map(lb: LabelSpec) -> str | None:
    if lb.value_type != "binary":
        return json.dumps({u: {"value": None, "meaning": "unknown"} for u in lb.unknown}, sort_keys=True)
    m = {k: {"value": 1.0, "meaning": "positive"} for k in TRUE}
    m.update({k: {"value": 0.0, "meaning": "negative"} for k in FALSE})
    m.update({u: {"value": None, "meaning": "unknown"} for u in lb.unknown})
    return json.dumps(m, sort_keys=True)


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (messages)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
