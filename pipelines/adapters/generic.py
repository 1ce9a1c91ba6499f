"""The user's own data: an image folder plus a CSV or Parquet manifest (format ``generic``).

Configured by a small YAML (``medlake ingest generic data.yaml``) or by options
(``medlake ingest generic FOLDER --dataset my-derm -o manifest=m.csv -o id=image_id
-o path=file -o label=dx:expert:category``). The YAML::

    dataset: synth-derm            # dataset_id (--dataset overrides it)
    name: ...   modality: derm   license: ...   citation: ...   description: ...
    images_root: images/derm       # relative to the YAML; default: the YAML's folder
    manifest: derm_manifest.csv    # CSV or Parquet, relative to the YAML
    columns: {id: image_id, path: path, group: lesion_id, patient: ..., study: ...,
              series: ..., split: split, sex: sex, age: age, site: site, view: view}
    split_scheme: original
    labels:                        # one source per label column
      - {column: dx_clinic, source: clinic, finding: diagnosis, kind: non_expert,
         value_type: category, unknown: ["", "unknown"], rule: ...}
    meta_columns: [capture_id]     # kept in images.meta (JSON)

Every image named by the manifest is read (thread pool) for width, height, mode and sha256;
DICOM files also give patient / study / series UIDs, modality, view and the identifying tags
present (``images.phi_tags``). Rows with a bad id, value or image go to the quarantine table;
rows read = rows ingested + rows quarantined. A blank label cell means the source did not
judge that image (no annotation row, not in ``coverage``); a non-blank value listed under
``unknown`` gives a row with value null and meaning 'unknown'. Without a ``path`` column the dataset is
metadata-only and images can be attached later (``medlake attach-images``).
"""

from __future__ import annotations

import os
import posixpath
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
from medlake.catalog.imageio import ImageReadError, inspect_many, resolve_inside
from medlake.catalog.ingestkit import findings_rows, root_versions, sha256_file
from medlake.pipelines.adapters import Adapter
from medlake.pipelines.adapters._csv import (
    AGE_RANGE,
    ROW,
    blank,
    dedupe,
    parse_number,
    quarantine_where,
)
from medlake.pipelines.adapters._generic_config import (
    GenericConfig,
    LabelSpec,
    bad_label,
    code_map,
    load_config,
    parse_label,
    read_manifest,
)

__all__ = ["ADAPTERS", "GenericConfig", "LabelSpec", "ingest", "load_config"]


def _check_paths(q: Quarantine, file: str, df: pl.DataFrame, cfg: GenericConfig, total: int) -> pl.DataFrame:
    """Quarantine rows whose path is empty, escapes the root, or names a bad image file."""
    pc, root = cfg.columns["path"], cfg.images_root
    if root is None:  # load_config sets images_root whenever a path column is mapped
        raise RuntimeError("generic adapter: a path column without an images root (a medlake bug)")
    df = quarantine_where(q, file, df, blank(pc), "empty path", cfg.columns["id"], total=total)
    targets: list[Path | None] = []
    bad: list[dict[str, Any]] = []
    for row, rel in zip(df[ROW].to_list(), df[pc].to_list()):
        try:
            targets.append(resolve_inside(root, rel))
        except ImageReadError as e:
            targets.append(None)
            bad.append({"row": row, "item": rel, "reason": e.reason, "detail": e.detail})
    ok = [t for t in targets if t is not None]
    infos = iter(inspect_many(ok))
    recs = []
    for row, rel, t in zip(df[ROW].to_list(), df[pc].to_list(), targets):
        if t is None:
            continue
        info = next(infos)
        if not info.ok:
            bad.append({"row": row, "item": rel, "reason": info.reason if info.reason != "missing file"
                        else "missing file (not found under the images root)", "detail": info.detail})
            continue
        recs.append({
            ROW: row, "_path": posixpath.normpath(rel.strip().replace("\\", "/")),
            "sha256": info.sha256, "width": info.width, "height": info.height, "mode": info.mode,
            "_d_patient": info.patient_id, "_d_study": info.study_uid, "_d_series": info.series_uid,
            "_d_modality": info.modality, "_d_view": info.view, "phi_tags": info.phi_tags,
            "_d_meta": info.dicom_meta,
        })
    if bad:
        q.add_frame(file, pl.DataFrame(bad, schema={"row": pl.Int64, "item": pl.String,
                                                   "reason": pl.String, "detail": pl.String}).sort("row"), total=total)
    schema = {ROW: pl.Int64, "_path": pl.String, "sha256": pl.String, "width": pl.Int32,
              "height": pl.Int32, "mode": pl.String, "_d_patient": pl.String, "_d_study": pl.String,
              "_d_series": pl.String, "_d_modality": pl.String, "_d_view": pl.String, "phi_tags": pl.String,
              "_d_meta": pl.String}
    return df.join(pl.DataFrame(recs, schema=schema), on=ROW, how="inner", maintain_order="left")


def _col(cfg: GenericConfig, key: str, dicom: str | None = None) -> pl.Expr:
    """A standard field: the manifest column when mapped (and not blank), else the DICOM tag."""
    m = pl.col(cfg.columns[key]).str.strip_chars() if key in cfg.columns else pl.lit(None, pl.String)
    m = pl.when(m == "").then(None).otherwise(m)
    return pl.coalesce(m, pl.col(dicom)) if dicom else m


def ingest(
    cat: Catalog, path: Path, /, *, dataset_id: str | None = None, strict: bool = False, **options: Any
) -> IngestResult:
    """Ingest a user's image folder + manifest (see the module docstring for the config)."""
    cfg = load_config(path, options, dataset_id or None)
    ds, cols = cfg.dataset, cfg.columns
    file = cfg.manifest.name
    if cfg.images_root is not None and not cfg.images_root.is_dir():
        raise IngestError(f"images_root {cfg.images_root.name}: no such folder; check 'images_root' in {path.name}")
    expected = list(dict.fromkeys([*cols.values(), *(lb.column for lb in cfg.labels), *cfg.meta_columns]))
    q = Quarantine(ds, strict=False)  # strict is applied at the end, naming the first bad row
    idc = cols["id"]
    df, total = read_manifest(cfg.manifest, expected, q, ids=[idc])
    named = {posixpath.normpath(str(x).strip().replace("\\", "/"))
             for x in (df[cols["path"]].drop_nulls().to_list() if "path" in cols else [])}
    df = df.with_columns(pl.col(idc).str.strip_chars())
    df = quarantine_where(q, file, df, blank(idc), "empty id", ROW, total=total)
    df = dedupe(q, file, df, idc, total=total)
    if "age" in cols:
        df = parse_number(q, file, df, cols["age"], alias="_age", what=f"{cols['age']} (age)",
                          lo=AGE_RANGE[0], hi=AGE_RANGE[1], item=idc, total=total)
    if "follow_up" in cols:
        df = df.with_columns(pl.col(cols["follow_up"]).str.strip_chars().cast(pl.Int32, strict=False).alias("_fu"))
        df = quarantine_where(q, file, df, pl.col("_fu").is_null() & ~blank(cols["follow_up"]),
                              pl.lit(f"unparseable {cols['follow_up']} (follow_up): ") + pl.col(cols["follow_up"]),
                              idc, total=total)
        df = quarantine_where(q, file, df, pl.col("_fu") < 0,
                              pl.lit(f"negative {cols['follow_up']} (follow_up): ") + pl.col(cols["follow_up"]),
                              idc, total=total)
    for lb in cfg.labels:
        df = quarantine_where(q, file, df, bad_label(lb),
                              pl.lit(f"unparseable {lb.value_type} value in {lb.column}: ") + pl.col(lb.column),
                              idc, total=total)
    if "path" in cols:
        df = _check_paths(q, file, df, cfg, total)
    else:
        df = df.with_columns(*(pl.lit(None, pl.String).alias(c) for c in (
            "_path", "sha256", "mode", "_d_patient", "_d_study", "_d_series", "_d_modality", "_d_view", "phi_tags",
            "_d_meta")),
            pl.lit(None, pl.Int32).alias("width"), pl.lit(None, pl.Int32).alias("height"))
    if strict and q.count():
        first = q.frame().sort("row").row(0, named=True)
        raise IngestError(
            f"{file}: row {first['row']} of {total:,}: {first['reason']}"
            + (f" ({first['item']})" if first["item"] else "")
            + f"; {q.count():,} bad rows in all. Stopped because of --strict; without it they go "
            "to the quarantine table and the rest is ingested."
        )
    tables, messages = _tables(cat, cfg, df, file)
    report = FileReport(file, total, df.height, q.count(file))
    messages += _stray_files(cfg, named)
    return publish(cat, adapter="generic", dataset_id=ds, partition=ds, tables=tables, quarantine=q,
                   files=[report], messages=messages)


def _tables(cat: Catalog, cfg: GenericConfig, df: pl.DataFrame, file: str) -> tuple[dict[str, Any], list[str]]:
    ds, cols = cfg.dataset, cfg.columns
    pref = pl.lit(ds + ":")
    patient = _col(cfg, "patient", "_d_patient")
    group = pl.coalesce(_col(cfg, "group"), patient)
    meta = (pl.struct([pl.col(c) for c in cfg.meta_columns]).struct.json_encode()
            if cfg.meta_columns else pl.lit(None, pl.String))
    # DICOM decode facts (frames, frame used, policy, transfer syntax, photometric) under "dicom"
    dicom = pl.lit('"dicom":') + pl.col("_d_meta")
    meta = (pl.when(pl.col("_d_meta").is_null()).then(meta)
            .when(meta.is_null()).then(pl.lit("{") + dicom + pl.lit("}"))
            .otherwise(meta.str.strip_suffix("}") + pl.lit(",") + dicom + pl.lit("}")))
    info = dict(cfg.info)
    images = df.select(
        (pref + pl.col(cols["id"])).alias("image_id"), pl.lit(ds).alias("dataset_id"),
        pl.col(cols["id"]).alias("native_id"), pl.col("_path").alias("path"), "sha256", "width",
        "height", "mode", (pref + group).alias("group_id"), patient.alias("patient_id"),
        _col(cfg, "study", "_d_study").alias("study_id"), _col(cfg, "series", "_d_series").alias("series_id"),
        _col(cfg, "view", "_d_view").alias("view"), _col(cfg, "sex").alias("sex"),
        (pl.col("_age") if "age" in cols else pl.lit(None, pl.Float64)).alias("age"),
        _col(cfg, "site").alias("site"),
        (pl.col("_fu") if "follow_up" in cols else pl.lit(None, pl.Int32)).alias("follow_up"),
        _col(cfg, "study_date").alias("study_date"),
        pl.coalesce(pl.col("_d_modality"), pl.lit(info.get("modality"), pl.String)).alias("modality"),
        "phi_tags", meta.alias("meta"),
    ).sort("image_id")
    ann, sources, findings, coverage = [], {}, [], []
    for lb in cfg.labels:
        sid = f"{ds}:{lb.source}"
        value, category, meaning = parse_label(lb)
        judged = df.filter(~blank(lb.column))  # a blank cell: the source did not judge the image
        ann.append(judged.select(
            (pref + pl.col(cols["id"])).alias("image_id"), pl.lit(sid).alias("source_id"),
            pl.lit("").alias("annotator"), pl.lit(lb.finding).alias("finding"), value.alias("value"),
            category.alias("category"), pl.col(lb.column).alias("raw_value"), meaning.alias("meaning"),
            pl.lit(False).alias("is_invalid"),
        ))
        row = {"source_id": sid, "dataset_id": ds, "name": lb.source, "kind": lb.kind, "exhaustive": True,
               "negatives": "explicit" if lb.value_type == "binary" else "none", "value_type": lb.value_type,
               "rule": lb.rule, "description": lb.description or f"column '{lb.column}' of {file}",
               "code_map": code_map(lb), "file": file}
        prev = sources.get(sid)
        if prev and (prev["kind"], prev["value_type"]) != (row["kind"], row["value_type"]):
            raise SchemaError(f"source '{lb.source}' is given two kinds or value types; use one per source")
        sources.setdefault(sid, row)
        findings += findings_rows(cat, sid, [lb.finding], lb.value_type)
        coverage.append(judged.select((pref + pl.col(cols["id"])).alias("image_id"), pl.lit(sid).alias("source_id")))
    key = ["image_id", "source_id", "annotator", "finding"]
    tables: dict[str, Any] = {
        "datasets": [{"dataset_id": ds, "name": info.get("name") or ds, "modality": info.get("modality"),
                      "source": "user data (generic adapter)", "license": info.get("license"),
                      "citation": info.get("citation"), "description": info.get("description"),
                      "images_root": _root_text(cat, cfg.images_root)}],
        "images": images,
        "sources": [sources[k] for k in sorted(sources)] or None,
        "annotations": pl.concat(ann).sort(key) if ann else None,
        "coverage": pl.concat(coverage).unique().sort(["image_id", "source_id"]) if coverage else None,
        "findings": sorted(findings, key=lambda r: (r["source_id"], r["finding"])) or None,
    }
    messages = []
    if "split" in cols:
        splits = df.select((pref + pl.col(cols["id"])).alias("image_id"), pl.lit(ds).alias("dataset_id"),
                           pl.lit(cfg.split_scheme).alias("scheme"), _col(cfg, "split").alias("split"))
        n_blank = splits["split"].null_count()
        splits = splits.drop_nulls("split").sort("image_id")
        if n_blank:
            messages.append(f"{n_blank:,} images have no value in {cols['split']} and are in no split")
        from medlake.catalog import __version__

        inputs = {file: sha256_file(cfg.manifest)}
        if cfg.config_file is not None:
            inputs[cfg.config_file.name] = sha256_file(cfg.config_file)
        tables["splits"] = splits
        tables["versions"] = root_versions(splits, dataset_id=ds, inputs=inputs, medlake_version=__version__) if splits.height else None
    n_phi = images.filter(pl.col("phi_tags").fill_null("") != "").height
    if n_phi:
        messages.append(f"warning: {n_phi:,} DICOM files carry identifying tags (images.phi_tags); "
                        "de-identify them before sharing or pushing")
    return tables, messages


def _root_text(cat: Catalog, root: Path | None) -> str | None:
    """images_root as stored: relative to the workspace root, '/'-separated."""
    return None if root is None else Path(cat.ws.relpath(root)).as_posix()


def _stray_files(cfg: GenericConfig, named: set[str]) -> list[str]:
    """A note on files under images_root that no manifest row names (not an error)."""
    if cfg.images_root is None:
        return []
    stray = []
    for d, dirs, files in os.walk(cfg.images_root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        rel = Path(d).relative_to(cfg.images_root).as_posix()
        stray += [posixpath.normpath(posixpath.join(rel, f)) for f in sorted(files)
                  if not f.startswith(".") and posixpath.normpath(posixpath.join(rel, f)) not in named]
    if not stray:
        return []
    first = ", ".join(stray[:3])
    return [f"note: {len(stray):,} files under images_root are not in the manifest (first: {first})"]


ADAPTERS = [
    Adapter(
        name="generic", dataset_id="", run=ingest,
        description="your own data: image folder + CSV/Parquet manifest, configured by YAML or -o options",
    )
]
