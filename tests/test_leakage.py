"""leakage stage on the real HAM10000 + DermaMNIST files, and its counts by brute force."""

from __future__ import annotations

import csv
from itertools import combinations
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from medlake.catalog import Catalog, CatalogError, Workspace
from medlake.pipelines import ingest, leakage

PAIRS = "derm_corrected/ham10000_newly_discovered_duplicates.csv"


@pytest.fixture(scope="module")
def ham(shared_data: Path, tmp_path_factory) -> Catalog:
    root = tmp_path_factory.mktemp("ham") / "ws"
    (root / ".dvc").mkdir(parents=True)
    cat = Catalog(Workspace(root.resolve()))
    ingest.run(cat, "ham10000", shared_data / "ham10000/HAM10000_metadata.csv")
    ingest.run(cat, "dermamnist", shared_data / "dermamnist/dermamnist_split_info.csv")
    return cat


def _reference(shared_data: Path, with_pairs: bool) -> tuple[int, int]:
    """Leaked groups computed straight from the CSV files with a plain union-find."""
    lesion = {r["image_id"]: r["lesion_id"] for r in csv.DictReader(
        (shared_data / "ham10000/HAM10000_metadata.csv").read_text().splitlines())}
    split = {r["image_id"]: r["split"] for r in csv.DictReader(
        (shared_data / "dermamnist/dermamnist_split_info.csv").read_text().splitlines())}
    parent = {x: x for x in [*lesion, *set(lesion.values())]}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for img, les in lesion.items():
        parent[find(img)] = find(les)
    if with_pairs:
        for r in csv.DictReader((shared_data / PAIRS).read_text().splitlines()):
            a, b = r["from_img"].rsplit(".", 1)[0], r["to_img"].rsplit(".", 1)[0]
            parent[find(a)] = find(b)
    by = {}
    for img in lesion:
        by.setdefault(find(img), set()).add(split[img])
    return sum(len(s) > 1 for s in by.values()), len(by)


def test_ham10000_dermamnist_leakage(ham: Catalog, shared_data: Path) -> None:
    df = leakage.run(ham, "ham10000", scheme="dermamnist", pairs=[shared_data / PAIRS])
    star = df.filter(pl.col("split_a") == "*")
    lesions = star.filter(pl.col("grouping") == "group_id").row(0, named=True)
    assert (lesions["n_groups"], lesions["n_groups_total"]) == (1006, 7470)  # the audit's figure
    assert (lesions["n_groups"], lesions["n_groups_total"]) == _reference(shared_data, False)
    dups = star.filter(pl.col("grouping") == "group_id+duplicates").row(0, named=True)
    assert (dups["n_groups"], dups["n_groups_total"]) == _reference(shared_data, True)
    assert ham.read("leakage").height == df.height == 8


def test_pair_counts_match_brute_force(ham: Catalog) -> None:
    frame = leakage.scheme_frame(ham, "ham10000", "dermamnist")
    rows = {(r["split_a"], r["split_b"]): r for r in leakage.leakage_rows(leakage.units(frame))}
    f = frame.to_dicts()
    by = {}
    for r in f:
        by.setdefault(r["group_id"], []).append(r["split"])
    n = sum(1 for s in by.values() for a, b in combinations(s, 2) if a != b)
    assert rows[("*", "*")]["n_pairs"] == n
    assert sum(rows[k]["n_pairs"] for k in rows if k[0] != "*") == n


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.sampled_from(["train", "val", "test"])),
                min_size=1, max_size=40))
def test_leakage_rows_property(items) -> None:
    frame = pl.DataFrame({"image_id": [str(i) for i in range(len(items))],
                          "unit": [f"g{g}" for g, _ in items], "split": [s for _, s in items]})
    rows = {(r["split_a"], r["split_b"]): r for r in leakage.leakage_rows(frame)}
    by = {}
    for g, s in items:
        by.setdefault(g, []).append(s)
    assert rows[("*", "*")]["n_groups"] == sum(len(set(v)) > 1 for v in by.values())
    assert rows[("*", "*")]["n_pairs"] == sum(
        1 for v in by.values() for a, b in combinations(v, 2) if a != b)
    assert rows[("*", "*")]["n_images"] == sum(len(v) for v in by.values() if len(set(v)) > 1)


def test_bad_pairs_file(ham: Catalog, tmp_path: Path) -> None:
    bad = tmp_path / "pairs.csv"
    bad.write_text("similarity,from_img,to_img\n0.9,ISIC_0024306.jpg,NOPE.jpg\n")
    leakage.run(ham, "ham10000", scheme="dermamnist", pairs=[bad])
    q = ham.read("quarantine").filter(pl.col("stage") == "leakage")
    assert q.height == 1 and q["row"][0] == 1 and "not in dataset" in q["reason"][0]
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("a,b\nx,y\n")
    with pytest.raises(CatalogError, match="expected columns similarity,from_img,to_img"):
        leakage.run(ham, "ham10000", scheme="dermamnist", pairs=[wrong])
    with pytest.raises(CatalogError, match="no split scheme"):
        leakage.run(ham, "ham10000", scheme="nope")


def test_cli(ham: Catalog) -> None:
    from medlake.cli.main import main

    r = CliRunner().invoke(main, ["leakage", "ham10000", "--split-scheme", "dermamnist",
                                  "-w", str(ham.ws.root)])
    assert r.exit_code == 0, r.output
    assert "1,006 of 7,470 groups span splits" in r.output
    r = CliRunner().invoke(main, ["leakage", "--pairs", "x.csv", "-w", str(ham.ws.root)])
    assert r.exit_code == 2 and "--pairs needs DATASET" in r.output
