"""The ``ingest`` stage over params.yaml's list in worker processes (``run_all``).

Real public files, real worker processes: the tables must be byte-identical to a sequential
run, linked files must find their parent's images, and an error must surface in plan order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medlake.catalog import Catalog, CatalogError, Workspace
from medlake.pipelines import ingest

# small real files; nih-bbox and google2019 label nih-cxr14's images (same dataset)
ENTRIES = [
    {"format": "nih-cxr14", "path": "real:cxr/Data_Entry_2017_v2020.csv.gz"},
    {"format": "nih-bbox", "path": "real:cxr/BBox_List_2017.csv.gz"},
    {"format": "siim-acr", "path": "real:cxr/siim-pneumothorax-train-rle.csv.gz"},
    {"format": "google2019", "path": "real:cxr/google2019_nih-chest-xray-labels.csv.gz"},
    {"format": "ham10000", "path": "real:ham10000/HAM10000_metadata.csv"},
    {"format": "dermamnist", "path": "real:dermamnist/dermamnist_split_info.csv"},
]


def _catalog(root: Path, real: Path, entries: list[dict]) -> Catalog:
    (root / ".dvc").mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"real_data": str(real), "ingest": entries}))
    return Catalog(Workspace(root))


def _files(cat: Catalog) -> dict[str, bytes]:
    d = cat.ws.tables_dir
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*.parquet"))}


@pytest.fixture(scope="module")
def both(shared_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("parallel")
    seq = _catalog(base / "seq", shared_data, ENTRIES)
    par = _catalog(base / "par", shared_data, ENTRIES)
    said: list[str] = []
    r_seq = ingest.run_all(seq, processes=1, echo=lambda m: None)
    r_par = ingest.run_all(par, processes=2, echo=said.append)
    return seq, par, r_seq, r_par, said


def test_parallel_tables_are_byte_identical_to_sequential(both):
    seq, par, _, _, _ = both
    a, b = _files(seq), _files(par)
    assert len(a) >= 5 * len(ENTRIES) - 6  # every entry wrote its tables
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_results_and_summaries_come_in_plan_order(both):
    _, _, r_seq, r_par, said = both
    assert [r.adapter for r in r_par] == [e["format"] for e in ENTRIES]
    assert [(r.adapter, r.rows_read, r.rows_quarantined, r.tables) for r in r_par] == [
        (r.adapter, r.rows_read, r.rows_quarantined, r.tables) for r in r_seq
    ]
    assert said == [r.summary() for r in r_par]


def test_linked_files_labelled_the_parent_images(both):
    _, par, _, r_par, _ = both
    by = {r.adapter: r for r in r_par}
    # every box row of the real file is ingested: its images were there when it ran
    n = par.query("SELECT count(*) AS n FROM annotations WHERE source_id LIKE '%bbox%'")["n"][0]
    assert by["nih-bbox"].files[0].rows_ingested > 900 and n > 900


def test_groups_keep_a_dataset_together_in_plan_order():
    entries = [{"format": f, "path": "x"} for f in
               ("nih-bbox", "ham10000", "chexpert", "nih-cxr14", "google2019", "dermamnist")]
    groups = ingest._groups(entries)
    assert [[e["format"] for e in g] for g in groups] == [
        ["nih-bbox", "nih-cxr14", "google2019"], ["ham10000", "dermamnist"], ["chexpert"]]


def test_first_error_in_plan_order_is_raised_and_others_publish(shared_data, tmp_path):
    entries = [ENTRIES[2], {"format": "ham10000", "path": "data/broken.csv"}, ENTRIES[5]]
    cat = _catalog(tmp_path / "ws", shared_data, entries)
    bad = cat.ws.root / "data/broken.csv"  # inputs live in the workspace (or under real_data)
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text("a,b\n1,2\n")
    said: list[str] = []
    with pytest.raises(CatalogError, match="broken.csv.*missing column"):
        ingest.run_all(cat, processes=2, echo=said.append)
    assert len(said) == 1 and "siim" in said[0]  # the entry before the error was reported
    assert "ham10000" not in cat.read("datasets")["dataset_id"].to_list()
