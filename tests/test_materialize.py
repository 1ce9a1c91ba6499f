"""materialize: recipes -> version folders, lineage, versions rows; real tables and files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from versions_helpers import TOY_RECIPE, build_toy, tree_digest, write_recipe

from medlake.catalog import Catalog, CatalogError, Workspace
from medlake.catalog.recipes import RecipeError, parse_recipe
from medlake.catalog.versions import VersionDataset, load_version
from medlake.pipelines import materialize
from medlake.pipelines.leakage import units


@pytest.fixture
def toy(catalog: Catalog) -> Catalog:
    build_toy(catalog)
    write_recipe(catalog, "toy-clean", TOY_RECIPE)
    return catalog


def test_toy_version_contents(toy: Catalog) -> None:
    res = materialize.run(toy, "toy-clean")
    folder = toy.ws.versions_dir / "toy-clean"
    m = load_version(folder)
    lin = pl.read_parquet(folder / "lineage.parquet")
    parent = toy.read("splits")
    # every parent image has a lineage row; parent = kept + removed, each removal with a reason
    assert set(lin["image_id"]) == set(parent["image_id"])
    gone = lin.filter(pl.col("action").is_in(["removed", "merged"]))
    assert m.height + gone["image_id"].n_unique() == parent.height == res.n_parent
    assert gone["reason"].null_count() == 0 and not set(gone["image_id"]) & set(m["image_id"])
    # no group spans two splits
    g = m.group_by("group_id").agg(pl.col("split").n_unique())
    assert g["split"].max() == 1
    # the agreeing cluster keeps its largest image; the conflicting one is dropped whole
    cl = toy.read("clusters")
    c1 = cl.filter(pl.col("cluster_id") == "c1")["image_id"].to_list()
    img = toy.read("images").with_columns((pl.col("width") * pl.col("height")).alias("px"))
    largest = img.filter(pl.col("image_id").is_in(c1)).sort("px", descending=True)["image_id"][0]
    assert largest in m["image_id"].to_list()
    merged = lin.filter(pl.col("action") == "merged")
    assert merged["into"].to_list() == [largest]
    c2 = cl.filter(pl.col("cluster_id") == "c2")["image_id"].to_list()
    assert not set(c2) & set(m["image_id"])
    assert "conflicting" in lin.filter(pl.col("image_id") == c2[0])["evidence"][0]
    # unknown labels dropped
    assert m["dx"].null_count() == 0
    # files: originals hardlinked, resizes at the right size, npz arrays
    src = toy.ws.root / "data/toy" / Path(m["file"][0]).name
    assert os.stat(folder / m["file"][0]).st_ino == os.stat(src).st_ino
    from PIL import Image

    with Image.open(folder / m["file_16"][0]) as im:
        assert im.size == (16, 16)
    z = np.load(folder / "toy-clean_8.npz")
    assert z["train_images"].shape == ((m["split"] == "train").sum(), 8, 8, 3)
    assert sorted(z["label_names"].tolist()) == sorted(m["dx"].unique().to_list())
    # as MedMNIST's own files: (N, 1) uint8 labels
    assert z["train_labels"].dtype == np.uint8 and z["train_labels"].shape[1] == 1
    # datasheet and versions row
    ds = (folder / "DATASHEET.md").read_text()
    for part in ("Counts per split", "What changed", "Leakage", "Licence", "CC-BY-NC-4.0"):
        assert part in ds
    v = toy.read("versions").filter(pl.col("name") == "toy-clean").row(0, named=True)
    assert v["parent"] == "toy@orig" and v["n_images"] == m.height and v["recipe_hash"]
    # the lineage table holds the same rows as the folder's lineage.parquet
    assert toy.read("lineage").filter(pl.col("version") == "toy-clean").height == lin.height


def test_torch_dataset_reads_split(toy: Catalog) -> None:
    import torch
    from torch.utils.data import DataLoader

    materialize.run(toy, "toy-clean")
    folder = toy.ws.versions_dir / "toy-clean"
    ds = VersionDataset(folder, "train", size=8)
    x, y = next(iter(DataLoader(ds, batch_size=4)))
    assert x.shape == (min(4, len(ds)), 3, 8, 8) and x.dtype == torch.float32
    assert set(y.tolist()) <= set(range(len(ds.classes)))
    with pytest.raises(CatalogError, match="no split 'holdout'"):
        VersionDataset(folder, "holdout")
    # the originals differ in size: the default resize still batches them
    from medlake.catalog.versions import DEFAULT_SIZE

    orig = VersionDataset(folder, "train", target_transform=lambda i: ds.classes[i])
    x, y = next(iter(DataLoader(orig, batch_size=4)))
    assert x.shape == (min(4, len(orig)), 3, DEFAULT_SIZE, DEFAULT_SIZE)
    assert set(y) <= set(ds.classes)  # labels as names through target_transform
    small = VersionDataset(folder, "train", resize=32)
    assert small[0][0].shape == (3, 32, 32)


def test_rerun_is_byte_identical(toy: Catalog) -> None:
    materialize.run(toy, "toy-clean")
    first = tree_digest(toy.ws.versions_dir / "toy-clean")
    materialize.run(toy, "toy-clean", processes=2)
    assert tree_digest(toy.ws.versions_dir / "toy-clean") == first
    assert len(first) > 20


def test_failure_leaves_previous_version_intact(toy: Catalog) -> None:
    materialize.run(toy, "toy-clean")
    folder = toy.ws.versions_dir / "toy-clean"
    before = tree_digest(folder)
    (toy.ws.root / "data/toy/T005.png").unlink()
    with pytest.raises(CatalogError, match="image file for toy:T005 not found"):
        materialize.run(toy, "toy-clean")
    assert tree_digest(folder) == before
    assert not [p for p in toy.ws.versions_dir.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("text, match", [
    ("dataset: toy\nparent: toy@orig\nrules: [{fix_leaks: {}}]", "unknown rule 'fix_leaks'"),
    ("dataset: toy\nparent: toy@orig\nrules: [{fix_leakage: {to: test2}}]", "to must be one of"),
    ("dataset: toy\nrules: []", "'parent' is required"),
    ("dataset: toy\nparent: x\nrules: [{resplit: {ratios: {train: 0.5}}}]", "summing to 1"),
    ("dataset: toy\nparent: x\nlabels: {dx: toy:dx}\nrules: [{resplit: {stratify: y}}]",
     "not a label column"),
])
def test_recipe_errors_are_clear(text: str, match: str) -> None:
    import yaml

    with pytest.raises(RecipeError, match=match):
        parse_recipe(yaml.safe_load(text), file="bad.yaml")


def test_unknown_parent_and_unmatched_list(toy: Catalog) -> None:
    write_recipe(toy, "bad-parent", "dataset: toy\nparent: toy@nope\n")
    with pytest.raises(RecipeError, match="parent 'toy@nope' is not a version"):
        materialize.run(toy, "bad-parent")
    (toy.ws.root / "drop.txt").write_text("T001\nT002.png\nZZZ\n")
    write_recipe(toy, "drop", "dataset: toy\nparent: toy@orig\nexport: {images: false}\n"
                 "rules: [{drop_outliers: {list: drop.txt}}]\n")
    res = materialize.run(toy, "drop")
    assert res.n_kept == res.n_parent - 2 and res.quarantined == 1
    q = toy.read("quarantine").filter(pl.col("stage") == "materialize")
    assert q["item"].to_list() == ["ZZZ"] and q["row"].to_list() == [3]


@st.composite
def datasets(draw):
    n = draw(st.integers(5, 60))
    groups = draw(st.lists(st.integers(0, 14), min_size=n, max_size=n))
    splits = draw(st.lists(st.sampled_from(["train", "val", "test"]), min_size=n, max_size=n))
    labels = draw(st.lists(st.sampled_from(["a", "b", None]), min_size=n, max_size=n))
    return groups, splits, labels, draw(st.integers(0, 1000))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=datasets())
def test_properties(tmp_path_factory, data) -> None:
    groups, splits, labels, seed = data
    root = tmp_path_factory.mktemp("p") / "ws"
    (root / ".dvc").mkdir(parents=True)
    cat = Catalog(Workspace(root.resolve()))
    ids = [f"p:{i:03d}" for i in range(len(groups))]
    with cat.transaction() as tx:
        tx.write("images", pl.DataFrame({"image_id": ids, "dataset_id": "p", "native_id": ids,
                                         "group_id": [f"g{g}" for g in groups]}), stage="ingest")
        tx.write("splits", pl.DataFrame({"image_id": ids, "dataset_id": "p", "scheme": "s",
                                         "split": splits}), stage="ingest")
        tx.write("annotations", pl.DataFrame({"image_id": ids, "source_id": "p:l", "annotator": "",
                                              "finding": "l", "category": labels}), stage="ingest")
        tx.write("versions", [{"name": "p@s", "dataset_id": "p", "kind": "root", "scheme": "s"}],
                 stage="ingest")
    write_recipe(cat, "v", f"dataset: p\nparent: p@s\nlabels: {{l: p:l}}\nrules:\n"
                 f"  - fix_leakage: {{to: majority}}\n  - drop_unknown: {{}}\n"
                 f"  - resplit: {{seed: {seed}, stratify: l}}\n")
    materialize.run(cat, "v")
    m = load_version(root / "lake/versions/v")
    lin = pl.read_parquet(root / "lake/versions/v/lineage.parquet")
    gone = lin.filter(pl.col("action") == "removed")["image_id"].n_unique()
    assert m.height + gone == len(ids)
    assert m.height == sum(x is not None for x in labels)
    assert m.group_by("group_id").agg(pl.col("split").n_unique())["split"].max() in (None, 1)
    # ratios: each split within the size of the largest group of the target share
    if m.height:
        biggest = m.group_by("group_id").len()["len"].max()
        for sp, share in {"train": 0.7, "val": 0.1, "test": 0.2}.items():
            n = (m["split"] == sp).sum()
            strata = m["l"].n_unique()
            assert abs(n - share * m.height) <= biggest * strata + 1
    first = tree_digest(root / "lake/versions/v")
    materialize.run(cat, "v")
    assert tree_digest(root / "lake/versions/v") == first


def test_units_join_groups_and_duplicates() -> None:
    f = pl.DataFrame({"image_id": ["a", "b", "c", "d"], "group_id": ["g1", "g1", "g2", None]})
    links = pl.DataFrame({"image_a": ["b"], "image_b": ["d"]})
    u = units(f, links)
    assert u.group_by("unit").len().sort("len")["len"].to_list() == [1, 3]


def test_recipe_for_absent_dataset_is_skipped_explicitly(catalog):
    """Without the public metadata, a real-data recipe writes a SKIPPED version and a
    quarantine row saying why (dvc repro then still runs the rest of the pipeline)."""
    from medlake.pipelines import materialize

    catalog.ws.recipes_dir.mkdir(parents=True, exist_ok=True)
    (catalog.ws.recipes_dir / "absent.yaml").write_text(
        "name: absent\ndataset: not-ingested\nparent: not-ingested@x\nrules: []\n")
    res = materialize.run(catalog, "absent")
    assert res.actions == {"skipped": 1} and res.n_kept == 0
    assert "no images" in (catalog.ws.versions_dir / "absent" / "SKIPPED.md").read_text()
    q = catalog.read("quarantine", where="stage = 'materialize'")
    assert q.height == 1 and q["reason"][0].startswith("skipped: dataset 'not-ingested' has no images")
    assert catalog.read("lineage").height == 0
