"""croissant.json: every materialised version gets Croissant 1.0 metadata with RAI fields.

Real tables and files (tests/versions_helpers.py build_toy), validated with the offline rules
of ``pipelines.croissant.check`` and, when it is installed, with ``mlcroissant`` itself (which
also reads the manifest's records through the JSON-LD).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest
from versions_helpers import DS, build_toy, tree_digest, write_recipe

from medlake.catalog import Catalog
from medlake.pipelines import croissant, materialize
from medlake.pipelines.leakage import leakage_rows

RECIPE = """
dataset: toy
parent: toy@orig
description: Toy derm images without leakage, duplicates and unknown labels.
labels:
  dx: "toy:dx/dx"
rules:
  - drop_outliers: {list: data/outliers.txt}
  - fix_leakage: {to: train}
  - duplicates: {mode: keep_one}
  - drop_unknown: {labels: [dx]}
export: {images: true, sizes: [8], npz: dx}
"""
PHI = {"toy:T002": "PatientName,PatientID", "toy:T009": "PatientBirthDate"}


@pytest.fixture
def version(catalog: Catalog) -> tuple[Catalog, Path]:
    """The toy dataset with two images carrying identifying tags, two ingest quarantine rows
    and a recipe list with one entry that matches no image, materialised as 'toy-card'."""
    images = build_toy(catalog)
    images = images.with_columns(pl.col("image_id").replace_strict(PHI, default=None)
                                 .alias("phi_tags"))
    catalog.write("images", images, stage="ingest", partition=DS)
    catalog.write("quarantine", [
        {"stage": "ingest", "dataset_id": DS, "file": "toy.csv", "row": 3, "item": "T900",
         "reason": "missing file"},
        {"stage": "ingest", "dataset_id": DS, "file": "toy.csv", "row": 7, "item": "T901",
         "reason": "truncated or corrupt image"}], stage="ingest", partition=DS)
    (catalog.ws.root / "data" / "outliers.txt").write_text("T004\nNOT-AN-IMAGE\n")
    write_recipe(catalog, "toy-card", RECIPE)
    materialize.run(catalog, "toy-card")
    return catalog, catalog.ws.versions_dir / "toy-card"


def _doc(folder: Path) -> dict:
    return json.loads((folder / croissant.FILE).read_text(encoding="utf-8"))


def test_croissant_follows_the_schema_and_names_every_file(version) -> None:
    cat, folder = version
    doc = _doc(folder)
    assert croissant.check(doc, folder) == []
    assert doc["@type"] == "sc:Dataset" and croissant.CONFORMS_TO in doc["conformsTo"]
    assert doc["name"] == "toy-card" and doc["license"] == "CC-BY-NC-4.0"
    assert doc["citeAs"] == "Toy et al. 2024" and doc["url"] == "lake/versions/toy-card/"
    objs = {d["@id"]: d for d in doc["distribution"] if d["@type"] == "cr:FileObject"}
    on_disk = {p.name for p in folder.iterdir() if p.is_file()} - {croissant.FILE}
    assert set(objs) == on_disk  # manifest, lineage, annotations, version.json, DATASHEET, npz
    assert objs["manifest.parquet"]["encodingFormat"] == "application/x-parquet"
    assert objs["manifest.parquet"]["sha256"] == croissant.sha256_of(folder / "manifest.parquet")
    sets = {d["includes"]: d["encodingFormat"] for d in doc["distribution"]
            if d["@type"] == "cr:FileSet"}
    assert sets == {"images/**/*.png": "image/png", "images_8/**/*.png": "image/png"}
    rs = {r["@id"]: r for r in doc["recordSet"]}
    assert set(rs) == {"images", "lineage", "annotations"}
    manifest = pl.read_parquet(folder / "manifest.parquet")
    assert [f["name"] for f in rs["images"]["field"]] == manifest.columns
    types = {f["name"]: f["dataType"] for f in rs["images"]["field"]}
    assert types["width"] == "sc:Integer" and types["dx"] == "sc:Text"
    assert rs["images"]["key"] == {"@id": "images/image_id"}
    # deterministic and relocatable: no absolute path, no clock
    text = (folder / croissant.FILE).read_text()
    assert str(cat.ws.root) not in text and '"/' not in text
    assert not re.search(r"20\d\d-\d\d-\d\dT", text)


def test_rai_fields_reflect_the_version(version) -> None:
    cat, folder = version
    doc = _doc(folder)
    manifest = pl.read_parquet(folder / "manifest.parquet")
    lineage = pl.read_parquet(folder / "lineage.parquet")
    # quarantined rows: the dataset's ingest rows + this version's unmatched list entry
    q = cat.read("quarantine").filter(pl.col("dataset_id") == DS)
    assert q.filter(pl.col("stage") == "materialize").height == 1
    assert q.height == 3
    missing = doc["rai:dataCollectionMissingData"]
    assert missing.startswith("Quarantined rows: 3 (ingest 2, this version's recipe lists 1)")
    # leakage: the parent's (from the run) and this version's (recomputed from the manifest)
    after = next(r for r in leakage_rows(manifest.select("image_id", "split", "unit"))
                 if r["split_a"] == "*")
    assert after["n_groups"] == 0
    biases = doc["rai:dataBiases"]
    assert f"Leakage in this version: 0 of {after['n_groups_total']} groups" in biases[1]
    sheet = (folder / "DATASHEET.md").read_text()
    before = re.search(r"\| parent \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|", sheet)
    assert before, sheet
    g, total, imgs, pairs = map(int, before.groups())
    assert g > 0
    assert biases[0] == (f"Leakage in the parent toy@orig: {g} of {total} groups (patients/"
                         f"lesions joined with duplicates; {imgs} images) span splits, {pairs} "
                         "cross-split image pairs.")
    # duplicates: the two clusters of build_toy, none left with two images
    assert any(b.startswith("Known duplicates: 2 duplicate clusters (4 images) in toy")
               and "0 clusters with more than one image left" in b for b in biases)
    assert any(b.startswith("Label `dx` counts: ") for b in biases)
    # what each rule did, from the lineage
    manip = doc["rai:dataManipulationProtocol"]
    steps = lineage.filter(pl.col("step") > 0).group_by("step", "rule", "action").len()
    for step, rule, action, n in steps.iter_rows():
        assert f"step {step} {rule}: {action} {n} image" in manip
    assert f"{manifest.height} images kept" in manip
    # label sources, and which feeds the manifest's label
    proto = doc["rai:dataAnnotationProtocol"]
    assert any(p.startswith("toy:dx: non_expert source") and "feeds label `dx`" in p for p in proto)
    assert any(p.startswith("toy:expert: expert source") for p in proto)
    assert doc["rai:annotationsPerItem"].startswith("2 to 2 label sources per image")
    # identifying tags of the images that stayed
    kept_phi = sorted(i for i in PHI if i in set(manifest["image_id"]))
    pii = doc["rai:personalSensitiveInformation"][0]
    if kept_phi:
        tags = sorted({t for i in kept_phi for t in PHI[i].split(",")})
        assert pii == (f"{len(kept_phi)} image{'s' if len(kept_phi) > 1 else ''} carry "
                       f"identifying DICOM tags (images.phi_tags: {', '.join(tags)}).")
    else:
        assert pii.startswith("No image carries identifying DICOM tags")
    # the datasheet's limitations (from the same run) are the RAI limitations
    assert any("matched no image" in x for x in doc["rai:dataLimitations"])
    assert "Agreement between label sources not computed" in doc["rai:dataAnnotationAnalysis"][0]


def test_agreement_and_reviews_enter_the_annotation_analysis(version) -> None:
    from medlake.catalog import reviews as rv
    from medlake.pipelines import agreement

    cat, folder = version
    srcs = [f"{DS}:dx", f"{DS}:expert"]
    cat.write("sources", cat.read("sources").with_columns(pl.lit("explicit").alias("negatives")),
              stage="ingest", partition=DS)
    cat.write("findings", [{"source_id": s, "finding": "dx", "shared_finding": "dx",
                            "value_type": "category"} for s in srcs], stage="ingest", partition=DS)
    cat.write("coverage", [{"image_id": i, "source_id": s} for i in cat.image_ids(DS)["image_id"]
                           for s in srcs], stage="ingest", partition=DS)
    agreement.run(cat, DS, subgroups=[], annotation_subgroups=[])
    ag = cat.read("agreement").filter((pl.col("subgroup") == "") & (pl.col("kind") == "pair"))
    assert ag.height
    rv.record(cat, [rv.label_verdict("toy:T001", "toy:dx", "dx", "correct", "ana"),
                    rv.label_verdict("toy:T002", "toy:dx", "dx", "wrong", "ana")])
    materialize.run(cat, "toy-card")
    lines = _doc(folder)["rai:dataAnnotationAnalysis"]
    r = ag.row(0, named=True)
    assert any(x.startswith(f"{r['finding']}: toy:dx vs toy:expert, {r['n_shared']} shared "
                            "images, Cohen's kappa") for x in lines), lines
    assert any(x.startswith("Review verdicts on toy:dx / dx: 1 correct, 1 wrong, PPV 0.50")
               for x in lines), lines


def test_rerun_is_byte_identical_and_rebuild_from_the_folder_agrees(version) -> None:
    cat, folder = version
    first = tree_digest(folder)
    materialize.run(cat, "toy-card")
    assert tree_digest(folder) == first
    # rebuilt from the folder and the lake alone (no run info): the same files and numbers
    again = croissant.build(folder, cat)
    doc = _doc(folder)
    assert again["distribution"] == doc["distribution"]
    assert again["recordSet"] == doc["recordSet"]
    assert again["rai:dataCollectionMissingData"] == doc["rai:dataCollectionMissingData"]
    # the parent's leakage needs the run (or the leakage table, absent here); the rest agrees
    def own(doc: dict) -> list[str]:
        return [b for b in doc["rai:dataBiases"] if not b.startswith("Leakage in the parent")]

    assert own(again) == own(doc) and len(own(doc)) == len(doc["rai:dataBiases"]) - 1


def test_mlcroissant_validates_and_reads_the_records(version) -> None:
    mlc = pytest.importorskip("mlcroissant", reason="mlcroissant not installed (pip install "
                              "mlcroissant; it is in the dev extra)")
    _, folder = version
    ds = mlc.Dataset(jsonld=folder / croissant.FILE)  # raises ValidationError on any error
    issues = ds.metadata.ctx.issues
    assert not issues.errors
    # only the two recommended properties medlake cannot know (a publish date, a semver)
    for w in issues.warnings:
        assert "datePublished" in w or "schema.org/version" in w, w
    manifest = pl.read_parquet(folder / "manifest.parquet")
    recs = list(ds.records("images"))
    assert len(recs) == manifest.height
    got = sorted(r["images/image_id"].decode() for r in recs)
    assert got == sorted(manifest["image_id"].to_list())
    assert len(list(ds.records("lineage"))) == pl.read_parquet(folder / "lineage.parquet").height


def test_check_names_each_broken_rule(version) -> None:
    _, folder = version
    doc = _doc(folder)
    doc.pop("license")
    doc["conformsTo"] = "http://mlcommons.org/croissant/0.8"
    fo = next(d for d in doc["distribution"] if d["@id"] == "manifest.parquet")
    fo["sha256"] = "0" * 64
    doc["recordSet"][0]["field"][0]["source"]["fileObject"]["@id"] = "nope.parquet"
    doc["description"] = "/home/someone/data"
    problems = croissant.check(doc, folder)
    assert "'license' is required" in problems
    assert any("conformsTo" in p for p in problems)
    assert any("sha256 of manifest.parquet differs" in p for p in problems)
    assert any("source names no file" in p for p in problems)
    assert any("absolute path" in p for p in problems)


@pytest.mark.parametrize("kind", ["metadata-only", "shards"])
def test_metadata_only_and_packed_versions(catalog: Catalog, kind: str) -> None:
    from versions_helpers import TOY_RECIPE

    build_toy(catalog, images=kind != "metadata-only")
    text = (TOY_RECIPE.replace("export: {images: true, sizes: [8, 16], npz: dx}",
                               "export: {images: false}") if kind == "metadata-only"
            else TOY_RECIPE.replace("npz: dx}", "npz: dx, pack: shards}"))
    write_recipe(catalog, "toy-v", text)
    materialize.run(catalog, "toy-v")
    folder = catalog.ws.versions_dir / "toy-v"
    doc = _doc(folder)
    assert croissant.check(doc, folder) == []
    kinds = {d["@type"] for d in doc["distribution"]}
    ids = {d["@id"] for d in doc["distribution"]}
    rsets = [r["@id"] for r in doc["recordSet"]]
    if kind == "metadata-only":
        assert kinds == {"cr:FileObject"} and rsets == ["images", "lineage", "annotations"]
    else:
        assert {"shards/index.parquet", "shards/images-00000.tar"} <= ids
        assert "cr:FileSet" not in kinds and rsets[-1] == "shards"
    mlc = pytest.importorskip("mlcroissant")
    n = len(list(mlc.Dataset(jsonld=folder / croissant.FILE).records("images")))
    assert n == pl.read_parquet(folder / "manifest.parquet").height
