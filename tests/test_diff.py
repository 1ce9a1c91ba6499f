"""diff: the two Fitzpatrick17k releases, HAM10000 corrected vs DermaMNIST, a relabel rule."""

from __future__ import annotations

import csv
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner
from versions_helpers import build_toy, write_recipe

from medlake.catalog import Catalog, Workspace
from medlake.pipelines import diff, ingest, materialize

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def derm(shared_data: Path, tmp_path_factory) -> Catalog:
    root = tmp_path_factory.mktemp("derm") / "ws"
    (root / ".dvc").mkdir(parents=True)
    (root / "params.yaml").write_text(f"real_data: {shared_data}\n")
    cat = Catalog(Workspace(root.resolve()))
    ingest.run(cat, "ham10000", shared_data / "ham10000/HAM10000_metadata.csv")
    ingest.run(cat, "dermamnist", shared_data / "dermamnist/dermamnist_split_info.csv")
    ingest.run(cat, "fitzpatrick17k", shared_data / "fitzpatrick17k/fitzpatrick17k.csv")
    ingest.run(cat, "fitzpatrick17k-2021", shared_data / "fitzpatrick17k/fitzpatrick17k_2021-04-16.csv")
    for name in ("ham10000-corrected", "fitzpatrick17k-clean"):
        write_recipe(cat, name, (REPO / "recipes" / f"{name}.yaml").read_text())
    return cat


def test_fitzpatrick_releases(derm: Catalog, tmp_path: Path) -> None:
    res = diff.run(derm, "fitzpatrick17k@2021-04-16", "fitzpatrick17k@2022-07-06",
                   out=tmp_path / "d.parquet")
    assert res.counts() == {}  # no image added, removed, moved or relabelled
    changes = {(s["change"], s["a"], s["b"]) for s in res.sources}
    assert ("renamed", "fitzpatrick/fitzpatrick", "fitzpatrick_scale/fitzpatrick_scale") in changes
    assert ("added", "", "fitzpatrick_centaur/fitzpatrick_centaur") in changes
    assert pl.read_parquet(tmp_path / "d.parquet").height == 0


def test_ham_corrected_vs_dermamnist(derm: Catalog, shared_data: Path, tmp_path: Path) -> None:
    r = materialize.run(derm, "ham10000-corrected")
    res = diff.run(derm, "ham10000@dermamnist", "ham10000-corrected", out=tmp_path / "d.parquet")
    moved = res.changes.filter(pl.col("change") == "moved")
    assert res.counts() == {"moved": moved.height} == {"moved": r.actions["moved"]}
    assert set(moved["rule"]) == {"fix_leakage"} and set(moved["to_split"]) == {"train"}
    back = pl.read_parquet(tmp_path / "d.parquet")
    assert back.equals(res.changes)
    # every moved image belongs to a lesion that spanned splits in the DermaMNIST list
    lesion = {r["image_id"]: r["lesion_id"] for r in csv.DictReader(
        (shared_data / "ham10000/HAM10000_metadata.csv").read_text().splitlines())}
    split = {r["image_id"]: r["split"] for r in csv.DictReader(
        (shared_data / "dermamnist/dermamnist_split_info.csv").read_text().splitlines())}
    spans = {}
    for img, les in lesion.items():
        spans.setdefault(les, set()).add(split[img])
    leaked = {les for les, s in spans.items() if len(s) > 1}
    lesion_moved = {lesion[i.split(":", 1)[1]] for i in moved["image_id"]}
    assert len(lesion_moved - leaked) <= 18  # only via the 18 duplicate pairs
    assert all(split[i.split(":", 1)[1]] != "train" for i in moved["image_id"])


def test_fitzpatrick_recipe(derm: Catalog, shared_data: Path) -> None:
    r = materialize.run(derm, "fitzpatrick17k-clean")
    outliers = {ln.strip()[-8:] for ln in (shared_data / "derm_corrected/fitzpatrick17k_selected_outliers.txt").read_text().splitlines() if ln.strip()}
    rows = list(csv.DictReader((shared_data / "fitzpatrick17k/fitzpatrick17k.csv").read_text().splitlines()))
    expect = [x for x in rows if x["md5hash"][:8] not in outliers and x["fitzpatrick_scale"] != "-1"]
    assert r.n_parent == len(rows) == 16577 and r.n_kept == len(expect)
    for sp, share in {"train": 0.7, "val": 0.1, "test": 0.2}.items():
        assert abs(r.counts[sp] / r.n_kept - share) < 0.01
    lin = derm.read("lineage").filter(pl.col("version") == "fitzpatrick17k-clean")
    assert lin.filter(pl.col("rule") == "drop_outliers").height == len(outliers) == 1113
    res = diff.diff(derm, "fitzpatrick17k@2022-07-06", "fitzpatrick17k-clean")
    assert res.counts()["removed"] == 16577 - len(expect)
    assert "relabelled" not in res.counts()


def test_relabel_rule_shows_in_diff(catalog: Catalog) -> None:
    build_toy(catalog, images=False, clusters=False)
    write_recipe(catalog, "toy-expert", "dataset: toy\nparent: toy@orig\nlabels: {dx: toy:dx}\n"
                 "rules: [{relabel: {label: dx, source: toy:expert}}]\n")
    materialize.run(catalog, "toy-expert")
    res = diff.diff(catalog, "toy@orig", "toy-expert")
    rel = res.changes.filter(pl.col("change") == "relabelled")
    ann = catalog.read("annotations").pivot("source_id", index="image_id", values="category")
    expect = ann.filter(pl.col("toy:dx").ne_missing(pl.col("toy:expert")))
    assert sorted(rel["image_id"]) == sorted(expect["image_id"]) and len(rel) > 0
    assert set(rel["rule"]) == {"relabel"} and set(rel["new"]) <= {"melanoma", "nevus", "bcc"}
    from medlake.cli.main import main

    out = CliRunner().invoke(main, ["diff", "toy@orig", "toy-expert", "-w", str(catalog.ws.root)])
    assert out.exit_code == 0 and f"relabelled {len(rel):,}" in out.output
    out = CliRunner().invoke(main, ["versions", "-w", str(catalog.ws.root)])
    assert out.exit_code == 0 and "toy-expert" in out.output
