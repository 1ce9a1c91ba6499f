"""Machine-readable dataset cards: ``croissant.json`` (Croissant 1.0 JSON-LD + RAI fields).

:func:`build` describes a materialised version folder (``lake/versions/<name>/``) in the
`Croissant <https://mlcommons.org/croissant/>`_ 1.0 vocabulary: the files
(``distribution``: each file a ``cr:FileObject`` with its sha256, the image folders
``cr:FileSet``\\ s), the tables inside them (``recordSet``: the manifest, lineage and
annotations, one ``cr:Field`` per Parquet column) and the Responsible-AI extension
(``rai:*``), filled from what medlake knows:

===================================  ===========================================================
``rai:dataAnnotationProtocol``       each label source (kind, negatives, value type, rule) and
                                     which manifest label it feeds
``rai:dataAnnotationAnalysis``       Cohen's kappa and PPV between sources (``agreement``) and
                                     PPV from review verdicts (``reviews``)
``rai:machineAnnotationTools``       sources of kind report_nlp / model / derived
``rai:annotationsPerItem``           label sources and annotation rows per image
``rai:dataBiases``                   leakage (groups spanning splits, parent and version),
                                     known duplicates, label balance
``rai:dataCollectionMissingData``    quarantined rows (per stage), unknown labels
``rai:dataManipulationProtocol``     the recipe's rules and what each did (``lineage``)
``rai:personalSensitiveInformation`` identifying DICOM tags (``images.phi_tags``) and the
                                     recipe's privacy acknowledgement
===================================  ===========================================================

The file is deterministic (no time, no absolute path; sorted, fixed order), so a rerun of
``medlake materialize`` stays byte-identical. :func:`check` applies the Croissant 1.0 rules
that can be checked offline without ``mlcroissant`` (the tests also validate with it).

Example
-------
>>> from medlake.pipelines import croissant
>>> croissant.write(cat.ws.versions_dir / "synth-derm-clean", cat)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from medlake.catalog import Catalog, __version__

FILE = "croissant.json"
CONFORMS_TO = "http://mlcommons.org/croissant/1.0"
RAI_CONFORMS_TO = "http://mlcommons.org/croissant/RAI/1.0"
#: The Croissant 1.0 JSON-LD context (as in the specification's examples) plus ``rai``.
CONTEXT: dict[str, Any] = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "citeAs": "cr:citeAs",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/",
    "equivalentProperty": "cr:equivalentProperty",
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract",
    "field": "cr:field",
    "fileProperty": "cr:fileProperty",
    "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "parentField": "cr:parentField",
    "path": "cr:path",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "samplingRate": "cr:samplingRate",
    "sc": "https://schema.org/",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
}
ENCODING = {".parquet": "application/x-parquet", ".json": "application/json",
            ".md": "text/markdown", ".npz": "application/x-npz", ".tar": "application/x-tar",
            ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
            ".tif": "image/tiff", ".tiff": "image/tiff", ".dcm": "image/dicom",
            ".bmp": "image/bmp", ".webp": "image/webp"}
#: Record sets: (id, file, description); a file that is absent gives no record set.
TABLES = (
    ("images", "manifest.parquet", ("One row per image of the version: its split, labels, "
                                    "group (patient/lesion), leakage unit, size, sha256 and "
                                    "files.")),
    ("lineage", "lineage.parquet", ("One row per parent image and rule that touched it: kept, "
                                    "removed, moved, relabelled or merged, with the reason "
                                    "and evidence.")),
    ("annotations", "annotations.parquet", ("Every label source's annotation rows of the "
                                            "version's images (the catalog's annotations "
                                            "table, filtered).")),
    ("shards", "shards/index.parquet", ("Where each image file lies in the tar shards "
                                        "(export.pack: shards): file, shard, offset, size, "
                                        "sha256.")),
)
COLUMN_HELP = {
    "image_id": "catalog image id <dataset>:<native id>",
    "native_id": "the image's id in the original dataset",
    "dataset_id": "catalog dataset id",
    "split": "split of this version (train/val/test...)",
    "group_id": "patient or lesion group <dataset>:<id> (pseudonymous)",
    "unit": "leakage unit: group joined with duplicate clusters/pairs; one unit never spans "
            "two splits when leakage was fixed",
    "width": "image width in pixels", "height": "image height in pixels",
    "sha256": "sha256 of the original image file",
    "file": "the image file, relative to the version folder (null: metadata only)",
    "version": "version name", "rule": "recipe rule", "step": "rule position in the recipe",
    "action": "kept, removed, moved, relabelled or merged", "reason": "why",
    "evidence": "JSON evidence (cluster, pair, review id...)",
    "from_split": "split before the rule", "to_split": "split after the rule",
    "source_id": "label source <dataset>:<source>", "annotator": "reader ('' for one reader)",
    "finding": "the source's own finding name", "value": "numeric label (0/1, grade, ordinal)",
    "category": "text label (e.g. a diagnosis)", "raw_value": "the label as written",
    "meaning": "the code's meaning (positive, negative, uncertain, unknown...)",
    "is_invalid": "the annotation was judged invalid", "note": "annotator's free text",
    "shard": "the tar shard holding the file", "offset": "byte offset of the member's data",
    "size": "member size in bytes",
}
MACHINE_KINDS = ("report_nlp", "model", "derived")


def sha256_of(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _data_type(t: pa.DataType) -> str:
    if pa.types.is_boolean(t):
        return "sc:Boolean"
    if pa.types.is_integer(t):
        return "sc:Integer"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "sc:Float"
    if pa.types.is_timestamp(t):
        return "sc:DateTime"
    if pa.types.is_date(t):
        return "sc:Date"
    return "sc:Text"


def _q(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _n(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


# --------------------------------------------------------------------------------------------
# files and tables


def _distribution(folder: Path) -> list[dict[str, Any]]:
    """FileObjects (sha256) for the version's own files; FileSets for the image folders."""
    out: list[dict[str, Any]] = []
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != FILE
                   and not p.name.startswith("."))
    shards = folder / "shards"
    if shards.is_dir():
        files += sorted(p for p in shards.iterdir() if p.is_file() and not p.name.startswith("."))
    for p in files:
        rel = p.relative_to(folder).as_posix()
        out.append({
            "@type": "cr:FileObject", "@id": rel, "name": rel,
            "description": _file_help(rel),
            "contentUrl": rel, "contentSize": f"{p.stat().st_size} B",
            "encodingFormat": ENCODING.get(p.suffix.lower(), "application/octet-stream"),
            "sha256": sha256_of(p),
        })
    for d in sorted(x for x in folder.iterdir() if x.is_dir() and x.name.startswith("images")):
        exts = sorted({p.suffix.lower() for p in d.rglob("*") if p.is_file() and p.suffix})
        for ext in exts:
            out.append({
                "@type": "cr:FileSet", "@id": f"{d.name}{ext.replace('.', '-')}",
                "name": f"{d.name}/**/*{ext}",
                "description": ("original image files" if d.name == "images" else
                                f"images resized to {d.name.split('_', 1)[-1]} px")
                               + ", one folder per split and label",
                "encodingFormat": ENCODING.get(ext, "application/octet-stream"),
                "includes": f"{d.name}/**/*{ext}",
            })
    return out


def _file_help(rel: str) -> str:
    known = {"manifest.parquet": "the version's images: split, labels, group, files",
             "lineage.parquet": "what each rule did to each parent image",
             "annotations.parquet": "all label sources' annotations of the version's images",
             "version.json": "recipe, parent, input sha256s, medlake version",
             "DATASHEET.md": "human-readable datasheet (counts, changes, leakage, sources, "
                             "limitations, privacy, licence)",
             "shards/index.parquet": "member index of the image shards (file, shard, offset, "
                                     "size, sha256)"}
    if rel in known:
        return known[rel]
    if rel.endswith(".npz"):
        return "images and labels as arrays per split (MedMNIST-style)"
    if rel.startswith("shards/"):
        return "image shard: plain tar of the version's image files"
    return rel


def _record_sets(folder: Path, labels: Mapping[str, str]) -> list[dict[str, Any]]:
    out = []
    for rid, fname, desc in TABLES:
        p = folder / fname
        if not p.is_file():
            continue
        schema = pq.read_schema(p)
        fields = []
        for name, typ in zip(schema.names, schema.types):
            help_ = COLUMN_HELP.get(name)
            if name in labels:
                help_ = f"label from {labels[name]}"
            elif name.startswith("file_"):
                help_ = f"the image resized to {name[5:]} px, relative to the version folder"
            fields.append({
                "@type": "cr:Field", "@id": f"{rid}/{name}", "name": name,
                "description": help_ or name, "dataType": _data_type(typ),
                "source": {"fileObject": {"@id": fname}, "extract": {"column": name}},
            })
        rs: dict[str, Any] = {"@type": "cr:RecordSet", "@id": rid, "name": rid,
                              "description": desc}
        if rid == "images" and "image_id" in schema.names:
            rs["key"] = {"@id": "images/image_id"}
        rs["field"] = fields
        out.append(rs)
    return out


# --------------------------------------------------------------------------------------------
# facts medlake knows


def facts(folder: Path, catalog: Catalog, *, info: Mapping[str, Any] | None = None,
          quarantined: int | None = None) -> dict[str, Any]:
    """The numbers behind the RAI fields (also handy for tests and other cards).

    Parameters
    ----------
    folder
        The version folder (``manifest.parquet``, ``lineage.parquet``, ``version.json``).
    info
        :func:`medlake.pipelines.datasheet.datasheet_info` of the run, when called from
        ``materialize`` (gives the parent's leakage under the recipe's duplicate evidence);
        without it the parent's leakage comes from the ``leakage`` table.
    quarantined
        Rows the recipe's lists sent to the quarantine (``materialize``); without it, the
        ``quarantine`` table's partition of this version.
    """
    from medlake.pipelines.leakage import leakage_rows

    meta = json.loads((folder / "version.json").read_text())
    name, ds = meta["name"], meta["dataset"]
    man = pl.read_parquet(folder / "manifest.parquet")
    labels = json.loads((pq.read_schema(folder / "manifest.parquet").metadata or {})
                        .get(b"medlake.labels", b"{}"))
    lin = (pl.read_parquet(folder / "lineage.parquet") if (folder / "lineage.parquet").is_file()
           else pl.DataFrame(schema={"image_id": pl.String, "rule": pl.String, "step": pl.Int32,
                                     "action": pl.String, "reason": pl.String}))
    f: dict[str, Any] = {"name": name, "dataset": ds, "parent": meta.get("parent"),
                         "recipe": meta.get("recipe") or {}, "recipe_hash": meta.get("recipe_hash"),
                         "n_images": man.height, "labels": labels}
    f["splits"] = dict(sorted(man["split"].fill_null("(none)").value_counts().iter_rows()))
    f["label_totals"] = {lab: dict(sorted(man[lab].fill_null("(unknown)").cast(pl.String)
                                          .value_counts().iter_rows()))
                         for lab in labels if lab in man.columns}
    f["unknown_labels"] = {lab: man[lab].null_count() for lab in labels if lab in man.columns}
    # leakage: this version from its manifest units; the parent from the run (or the table)
    after = (next(r for r in leakage_rows(man.select("image_id", "split", "unit"))
                  if r["split_a"] == "*")
             if "unit" in man.columns and man["split"].drop_nulls().len() else None)
    before = dict(info["leakage_before"]) if info and info.get("leakage_before") else None
    if before is None and catalog.tables.exists("leakage") and f["parent"]:
        lk = catalog.read("leakage", where=f"dataset_id = {_q(ds)}").filter(
            (pl.col("version") == f["parent"]) & (pl.col("split_a") == "*")
            & (pl.col("grouping") == "group_id+duplicates"))
        before = lk.row(0, named=True) if lk.height else None
    f["leakage_after"], f["leakage_before"] = after, before
    # lineage: what each rule did
    steps = (lin.filter(pl.col("step") > 0).group_by("step", "rule", "action").len()
             .sort("step", "rule", "action"))
    f["rules"] = [dict(r) for r in steps.iter_rows(named=True)]
    f["removed"] = lin.filter(pl.col("action").is_in(["removed", "merged"]))["image_id"].n_unique()
    # duplicates known to the catalog, and those left in this version
    f["dup_clusters"] = f["dup_images"] = f["dup_left"] = None
    if catalog.tables.exists("clusters"):
        cl = catalog.read("clusters", columns=["image_id", "cluster_id"]).filter(
            pl.col("image_id").str.starts_with(ds + ":"))
        f["dup_clusters"], f["dup_images"] = cl["cluster_id"].n_unique(), cl.height
        left = (cl.filter(pl.col("image_id").is_in(man["image_id"].implode()))
                .group_by("cluster_id").len().filter(pl.col("len") > 1))
        f["dup_left"] = left.height
    # quarantine: the dataset's rows by stage, and this version's own
    qt = catalog.read("quarantine", where=f"dataset_id = {_q(ds)}", columns=["stage", "file"])
    other = qt.filter(pl.col("stage") != "materialize")
    f["quarantine_by_stage"] = dict(sorted(other.group_by("stage").len().iter_rows()))
    if quarantined is None:
        own = catalog.tables.files("quarantine", stage="materialize")
        quarantined = sum(pq.read_metadata(p).num_rows for p in own if p.stem == name)
    f["quarantine_version"] = int(quarantined)
    f["quarantined"] = other.height + f["quarantine_version"]
    # label sources, agreement, reviews
    src = catalog.read("sources", where=f"dataset_id = {_q(ds)}").sort("source_id")
    f["sources"] = src.select("source_id", "kind", "negatives", "value_type", "rule").to_dicts()
    f["agreement"] = _agreement(catalog, ds)
    f["review_ppv"] = _review_ppv(catalog, ds)
    ann = folder / "annotations.parquet"
    f["annotations_per_image"] = None
    if ann.is_file():
        a = pl.read_parquet(ann, columns=["image_id", "source_id", "annotator"])
        per = a.group_by("image_id").agg(pl.len().alias("rows"),
                                         pl.col("source_id").n_unique().alias("sources"))
        per = pl.DataFrame({"image_id": man["image_id"]}).join(per, on="image_id", how="left")\
            .fill_null(0)
        f["annotations_per_image"] = {
            "rows_mean": round(float(per["rows"].mean() or 0), 2),
            "sources_min": int(per["sources"].min() or 0),
            "sources_max": int(per["sources"].max() or 0),
            "sources_median": float(per["sources"].median() or 0),
            "readers_max": int(a.select("source_id", "annotator").unique()
                               .group_by("source_id").len()["len"].max() or 0) if a.height else 0,
        }
    # identifying tags
    img = catalog.read("images", where=f"dataset_id = {_q(ds)}",
                       columns=["image_id", "phi_tags"]).filter(
        pl.col("image_id").is_in(man["image_id"].implode()))
    dicom = img.filter(pl.col("phi_tags").is_not_null())
    ident = dicom.filter(pl.col("phi_tags") != "")
    tags = sorted({t.strip() for s in ident["phi_tags"].to_list() for t in s.split(",")
                   if t.strip()})
    ack = ((f["recipe"].get("privacy") or {}).get("acknowledged")
           if isinstance(f["recipe"].get("privacy"), Mapping) else None)
    f["privacy"] = {"dicom": dicom.height, "identifying": ident.height, "tags": tags,
                    "acknowledged": ack}
    f["limitations"] = list(info.get("limitations", [])) if info else []
    f["limitations_known"] = info is not None
    return f


def _agreement(catalog: Catalog, ds: str) -> list[dict[str, Any]]:
    if not catalog.tables.exists("agreement"):
        return []
    ag = catalog.read("agreement", where=f"dataset_id = {_q(ds)}")
    if not ag.height:
        return []
    ag = ag.filter((pl.col("subgroup") == "") & pl.col("kind").is_in(["pair", "annotators"]))
    cols = ["source_a", "annotator_a", "source_b", "annotator_b", "finding", "n_shared",
            "kappa", "kappa_lo", "kappa_hi", "reference", "ppv", "ppv_lo", "ppv_hi", "sens",
            "sens_lo", "sens_hi"]
    return ag.select(cols).sort("finding", "source_a", "annotator_a", "source_b",
                                "annotator_b").to_dicts()


def _review_ppv(catalog: Catalog, ds: str) -> list[dict[str, Any]]:
    if not catalog.tables.exists("reviews"):
        return []
    from medlake.catalog import reviews as rv

    df = rv.ppv_by_class(catalog).filter(pl.col("source_id").str.starts_with(ds + ":")
                                         & (pl.col("n") > 0))
    return df.sort("source_id", "finding").to_dicts()


def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _ci(p: Any, lo: Any, hi: Any) -> str:
    if _nan(p):
        return "undefined"
    if _nan(lo) or _nan(hi):
        return f"{p:.2f}"
    return f"{p:.2f} (95% CI {lo:.2f} to {hi:.2f})"


def _leak_text(r: Mapping[str, Any] | None, what: str) -> str | None:
    if not r:
        return None
    return (f"Leakage in {what}: {r['n_groups']:,} of {r['n_groups_total']:,} groups "
            f"(patients/lesions joined with duplicates; {r['n_images']:,} images) span splits, "
            f"{r['n_pairs']:,} cross-split image pairs.")


def _rater(s: str, a: str | None) -> str:
    return s + (f"/{a}" if a else "")


# --------------------------------------------------------------------------------------------
# the document


def build(folder: Path | str, catalog: Catalog, *, info: Mapping[str, Any] | None = None,
          quarantined: int | None = None) -> dict[str, Any]:
    """The Croissant JSON-LD of a version folder, as a dict (see :func:`facts` for the
    parameters). Deterministic: the same folder and lake give the same dict."""
    folder = Path(folder)
    f = facts(folder, catalog, info=info, quarantined=quarantined)
    name, ds = f["name"], f["dataset"]
    dsrow = catalog.read("datasets", where=f"dataset_id = {_q(ds)}")
    d = dsrow.row(0, named=True) if dsrow.height else {"dataset_id": ds}
    title = d.get("name") or ds
    recipe = f["recipe"]
    desc = (recipe.get("description") or "").strip()
    description = (f"{name}: a version of {title} ({ds}) derived from {f['parent']} by the "
                   f"medlake recipe {name} (sha256 {(f['recipe_hash'] or '')[:16]}); "
                   f"{f['n_images']:,} images"
                   + (", " + ", ".join(f"{k} {v:,}" for k, v in f["splits"].items())
                      if f["splits"] else "") + "." + (f" {desc}" if desc else ""))
    doc: dict[str, Any] = {
        "@context": CONTEXT,
        "@type": "sc:Dataset",
        "conformsTo": [CONFORMS_TO, RAI_CONFORMS_TO],
        "name": name,
        "description": description,
        "license": d.get("license") or "unknown (see the original dataset's terms)",
        "url": f"lake/versions/{name}/",
        "citeAs": d.get("citation") or f"{title} ({ds})",
        "keywords": [k for k in ("medical imaging", d.get("modality"), ds, "medlake") if k],
        "isAccessibleForFree": True,
        "distribution": _distribution(folder),
        "recordSet": _record_sets(folder, f["labels"]),
    }
    doc.update(_rai(f, d))
    return doc


def _rai(f: Mapping[str, Any], d: Mapping[str, Any]) -> dict[str, Any]:
    ds, name = f["dataset"], f["name"]
    rai: dict[str, Any] = {}
    src_txt = "; ".join(x for x in (d.get("source"), d.get("description")) if x)
    rai["rai:dataCollection"] = (
        f"Images and labels of {d.get('name') or ds} ({ds})"
        + (f" ({src_txt})" if src_txt else "")
        + f", ingested into a medlake catalog and corrected by the recipe recipes/{name}.yaml "
        f"(parent version {f['parent']}); see DATASHEET.md.")
    rai["rai:dataCollectionType"] = ["Secondary Data Analysis"]
    # missing data and quarantine
    by = f["quarantine_by_stage"]
    parts = [f"{k} {v:,}" for k, v in by.items()]
    if f["quarantine_version"]:
        parts.append(f"this version's recipe lists {f['quarantine_version']:,}")
    miss = [f"Quarantined rows: {f['quarantined']:,}"
            + (f" ({', '.join(parts)})" if parts else "")
            + ": input rows, files or list entries of this dataset that medlake could not use "
            "(see the quarantine table)."]
    for lab, n in f["unknown_labels"].items():
        miss.append(f"{_n(n, 'image')} with an unknown `{lab}`.")
    rai["rai:dataCollectionMissingData"] = " ".join(miss)
    rai["rai:dataCollectionRawData"] = (
        f"Parent version {f['parent']}; the inputs' sha256 (recipe files and catalog tables) "
        "are in version.json, the per-image sha256 in manifest.parquet.")
    # what the recipe did
    rules = [f"step {r['step']} {r['rule']}: {r['action']} {_n(r['len'], 'image')}"
             for r in f["rules"]]
    rai["rai:dataManipulationProtocol"] = (
        f"Recipe {name} (sha256 {f['recipe_hash']}) applied to {f['parent']}: "
        + ("; ".join(rules) if rules else "no rule changed an image")
        + f". {f['n_images']:,} images kept, {f['removed']:,} removed or merged; every image's "
        "fate is in lineage.parquet.")
    export = f["recipe"].get("export") or {}
    pre = []
    if export.get("sizes"):
        pre.append("Resized copies at " + ", ".join(f"{s} px" for s in export["sizes"])
                   + " (images_<size>/).")
    if export.get("npz"):
        pre.append(f"Arrays per split with label `{export['npz']}` (<name>_<size>.npz).")
    if export.get("pack") == "shards":
        pre.append("Image files packed in plain tar shards (shards/, index.parquet).")
    pre.append("Original image files are hard links of the ingested files, unchanged.")
    rai["rai:dataPreprocessingProtocol"] = pre
    # labels
    used = {}
    for lab, spec in f["labels"].items():
        used.setdefault(spec.split("/", 1)[0], []).append(f"`{lab}` ({spec})")
    proto = [f"{s['source_id']}: {s['kind']} source, negatives {s['negatives'] or 'n/a'}, "
             f"{s['value_type']} values; rule: {s['rule'] or 'not recorded'}"
             + (f"; feeds label {', '.join(used[s['source_id']])}" if s["source_id"] in used
                else "") for s in f["sources"]]
    rai["rai:dataAnnotationProtocol"] = proto or ["No label source recorded for this dataset."]
    machine = [f"{s['source_id']} ({s['kind']}): {s['rule'] or 'rule not recorded'}"
               for s in f["sources"] if s["kind"] in MACHINE_KINDS]
    if machine:
        rai["rai:machineAnnotationTools"] = machine
    api = f["annotations_per_image"]
    if api:
        rai["rai:annotationsPerItem"] = (
            f"{api['sources_min']} to {api['sources_max']} label sources per image (median "
            f"{api['sources_median']:g}); {api['rows_mean']:g} annotation rows per image on "
            f"average; up to {api['readers_max']} reader(s) per source (annotations.parquet).")
    analysis = []
    for a in f["agreement"][:40]:
        line = (f"{a['finding']}: {_rater(a['source_a'], a['annotator_a'])} vs "
                f"{_rater(a['source_b'], a['annotator_b'])}, {a['n_shared']:,} shared images, "
                f"Cohen's kappa {_ci(a['kappa'], a['kappa_lo'], a['kappa_hi'])}")
        if a["reference"]:
            line += (f"; against {a['reference']}: PPV {_ci(a['ppv'], a['ppv_lo'], a['ppv_hi'])}"
                     f", sensitivity {_ci(a['sens'], a['sens_lo'], a['sens_hi'])}")
        analysis.append(line + ".")
    if not f["agreement"]:
        analysis.append("Agreement between label sources not computed for this dataset "
                        "(medlake agreement needs two sources judging the same findings).")
    for r in f["review_ppv"][:20]:
        analysis.append(f"Review verdicts on {r['source_id']} / {r['finding']}: "
                        f"{r['n_correct']:,} correct, {r['n_wrong']:,} wrong, PPV "
                        f"{_ci(r['ppv'], r['ppv_lo'], r['ppv_hi'])}.")
    rai["rai:dataAnnotationAnalysis"] = analysis
    # biases: leakage, duplicates, balance
    biases = [t for t in (_leak_text(f["leakage_before"], f"the parent {f['parent']}"),
                          _leak_text(f["leakage_after"], "this version")) if t]
    if f["leakage_after"] is None:
        biases.append("No split in this version: leakage not applicable.")
    if f["dup_clusters"] is not None:
        biases.append(f"Known duplicates: {_n(f['dup_clusters'], 'duplicate cluster')} "
                      f"({_n(f['dup_images'], 'image')}) in {ds} (clusters table); "
                      f"{_n(f['dup_left'], 'cluster')} with more than one image left in this "
                      "version.")
    else:
        biases.append("Duplicates not searched (medlake duplicates has not run): near-"
                      "duplicate images may remain.")
    for lab, tot in f["label_totals"].items():
        biases.append(f"Label `{lab}` counts: " + ", ".join(f"{k} {v:,}" for k, v in tot.items())
                      + ".")
    rai["rai:dataBiases"] = biases
    none = ("None recorded by medlake (DATASHEET.md, Known limitations)."
            if f["limitations_known"] else "See DATASHEET.md, Known limitations.")
    lim = list(f["limitations"]) or [none]
    rai["rai:dataLimitations"] = lim
    p = f["privacy"]
    if p["identifying"]:
        pii = [(f"{_n(p['identifying'], 'image')} carry identifying DICOM tags "
                f"(images.phi_tags: {', '.join(p['tags'])}).")]
    else:
        pii = [(f"No image carries identifying DICOM tags known to medlake ({p['dicom']:,} "
                f"DICOM images checked; {f['n_images'] - p['dicom']:,} non-DICOM images carry "
                "no tags medlake can read).")]
    pii.append("group_id holds pseudonymous patient/lesion ids of the original dataset.")
    if p["acknowledged"]:
        pii.append(f"Publisher's acknowledgement: {p['acknowledged']}")
    rai["rai:personalSensitiveInformation"] = pii
    rai["rai:dataReleaseMaintenancePlan"] = (
        f"Rebuilt byte-identically by `medlake materialize {name}` from recipes/{name}.yaml "
        f"and the catalog (medlake {__version__}); published as git tags {name}@vN by "
        "`medlake publish` and fetched with `dvc pull` or `dvc import`.")
    return rai


def dumps(doc: Mapping[str, Any]) -> str:
    """The file's text: indented JSON, keys in the built order, UTF-8, a final newline."""
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def write(folder: Path | str, catalog: Catalog, *, info: Mapping[str, Any] | None = None,
          quarantined: int | None = None) -> Path:
    """Build and write ``<folder>/croissant.json``; returns its path."""
    folder = Path(folder)
    doc = build(folder, catalog, info=info, quarantined=quarantined)
    problems = check(doc)
    if problems:  # a medlake bug, never the user's data
        raise RuntimeError("croissant.json does not follow Croissant 1.0: " + "; ".join(problems))
    path = folder / FILE
    path.write_text(dumps(doc), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# offline checks


def check(doc: Mapping[str, Any], folder: Path | None = None) -> list[str]:
    """Croissant 1.0 rules checked offline; returns the problems (empty: none).

    Required: ``@context`` (with the ``cr``/``sc``/``dct`` prefixes), ``@type sc:Dataset``,
    ``conformsTo`` naming Croissant 1.0, ``name``, ``description``, ``license``, ``url``;
    each ``cr:FileObject`` with ``@id``, ``name``, ``contentUrl``, ``encodingFormat`` and a
    64-hex ``sha256`` (and, given ``folder``, equal to the file's); each ``cr:FileSet`` with
    ``includes`` and ``encodingFormat``; each ``cr:RecordSet`` with fields whose ``dataType``
    is set and whose ``source`` names a file of the distribution. No absolute path anywhere.
    """
    bad: list[str] = []
    ctx = doc.get("@context")
    if not isinstance(ctx, Mapping):
        bad.append("@context must be a mapping")
    else:
        for k, v in (("cr", "http://mlcommons.org/croissant/"), ("sc", "https://schema.org/"),
                     ("dct", "http://purl.org/dc/terms/")):
            if ctx.get(k) != v:
                bad.append(f"@context.{k} must be {v}")
    if doc.get("@type") not in ("sc:Dataset", "https://schema.org/Dataset"):
        bad.append("@type must be sc:Dataset")
    ct = doc.get("conformsTo")
    if CONFORMS_TO not in (ct if isinstance(ct, list) else [ct]):
        bad.append(f"conformsTo must name {CONFORMS_TO}")
    for k in ("name", "description", "license", "url"):
        if not doc.get(k):
            bad.append(f"'{k}' is required")
    ids: set[str] = set()
    for i, fo in enumerate(doc.get("distribution") or []):
        where = f"distribution[{i}]"
        if not fo.get("@id") or fo["@id"] in ids:
            bad.append(f"{where}: a unique @id is required")
        ids.add(fo.get("@id", ""))
        if fo.get("@type") == "cr:FileObject":
            for k in ("name", "contentUrl", "encodingFormat", "sha256"):
                if not fo.get(k):
                    bad.append(f"{where} ({fo.get('@id')}): '{k}' is required")
            sha = str(fo.get("sha256", ""))
            if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
                bad.append(f"{where} ({fo.get('@id')}): sha256 must be 64 hex digits")
            elif folder is not None:
                p = Path(folder) / str(fo.get("contentUrl"))
                if not p.is_file():
                    bad.append(f"{where}: {fo.get('contentUrl')} is missing")
                elif sha256_of(p) != sha:
                    bad.append(f"{where}: sha256 of {fo.get('contentUrl')} differs")
        elif fo.get("@type") == "cr:FileSet":
            for k in ("includes", "encodingFormat"):
                if not fo.get(k):
                    bad.append(f"{where} ({fo.get('@id')}): '{k}' is required")
        else:
            bad.append(f"{where}: @type must be cr:FileObject or cr:FileSet")
    rsets = doc.get("recordSet") or []
    if not rsets:
        bad.append("at least one recordSet is required")
    for rs in rsets:
        if rs.get("@type") != "cr:RecordSet" or not rs.get("@id") or not rs.get("field"):
            bad.append(f"recordSet {rs.get('@id')}: @type cr:RecordSet, @id and fields required")
        for fld in rs.get("field") or []:
            src = (fld.get("source") or {}).get("fileObject", {}).get("@id")
            if fld.get("@type") != "cr:Field" or not fld.get("dataType"):
                bad.append(f"field {fld.get('@id')}: @type cr:Field and dataType required")
            if src not in ids:
                bad.append(f"field {fld.get('@id')}: source names no file of the distribution")
            if not (fld.get("source") or {}).get("extract", {}).get("column"):
                bad.append(f"field {fld.get('@id')}: source.extract.column required")
    text = json.dumps(doc)
    if '"/' in text or ":\\\\" in text:
        bad.append("an absolute path appears in the document")
    return bad
