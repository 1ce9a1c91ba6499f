"""NIH ChestX-ray14 Data_Entry ingest: real counts, determinism, every kind of bad row."""

from __future__ import annotations

import csv
import gzip
import hashlib
from collections import Counter

import pytest
from click.testing import CliRunner

from medlake.catalog import Catalog, IngestError, SchemaError
from medlake.cli.main import main
from medlake.pipelines import ingest

HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
          "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


@pytest.fixture(scope="module")
def nih(shared_data, tmp_path_factory):
    from medlake.catalog import Workspace

    root = tmp_path_factory.mktemp("nih") / "ws"
    (root / ".dvc").mkdir(parents=True)
    cat = Catalog(Workspace(root))
    path = shared_data / "cxr" / "Data_Entry_2017_v2020.csv.gz"
    res = ingest.run(cat, "nih-cxr14", path)
    with gzip.open(path, "rt", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return cat, res, rows, path


def test_real_counts_match_the_file(nih):
    cat, res, rows, _ = nih
    assert res.rows_read == len(rows) == 112_120
    assert res.rows_quarantined == 0
    images = cat.read("images")
    assert images.height == 112_120
    assert images["group_id"].n_unique() == len({r["Patient ID"] for r in rows}) == 30_805
    expected = Counter(lbl for r in rows for lbl in r["Finding Labels"].split("|"))
    got = cat.sql("""SELECT finding, sum(value)::BIGINT AS n FROM annotations
                     WHERE source_id = 'nih-cxr14:report_nlp' GROUP BY 1""").to_pylist()
    assert {g["finding"]: g["n"] for g in got} == dict(expected)
    # positives are stored; the 14 other findings of each image are implicit negatives
    assert cat.read("annotations").height == sum(expected.values())
    src = cat.read("sources").row(0, named=True)
    assert src["kind"] == "report_nlp" and src["exhaustive"] and src["negatives"] == "implicit"
    dense = cat.sql("""SELECT count(*) AS n, sum(value)::BIGINT AS pos,
                              count(*) FILTER (WHERE meaning = 'negative') AS neg
                       FROM labels_dense WHERE source_id = 'nih-cxr14:report_nlp'""").to_pylist()[0]
    assert dense == {"n": 112_120 * 15, "pos": sum(expected.values()),
                     "neg": 112_120 * 15 - sum(expected.values())}


def test_findings_map_to_shared_vocabulary(nih):
    cat = nih[0]
    m = dict(cat.read("findings").select("finding", "shared_finding").iter_rows())
    assert m["Effusion"] == "pleural_effusion"
    assert m["No Finding"] == "no_finding"
    assert m["Pleural_Thickening"] == "pleural_thickening"


def test_reingest_gives_identical_files(nih):
    cat, _, _, path = nih
    files = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in cat.tables.files("annotations")}
    ingest.run(cat, "nih-cxr14", path)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files} == files
    assert cat.read("images").height == 112_120  # no duplicate rows


def _write(tmp_path, lines, name="entries.csv"):
    p = tmp_path / name
    p.write_text("\n".join([HEADER, *lines]) + "\n")
    return p


GOOD = "a_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143"


def test_bad_rows_are_quarantined_with_reasons(catalog: Catalog, tmp_path):
    p = _write(tmp_path, [
        GOOD,
        "a_000.png,Effusion,1,1,58,M,PA,2682,2749,0.143,0.143",      # duplicate id
        "b_000.png,Effusion,0,2,old,F,AP,2682,2749,0.143,0.143",    # unparseable age
        "c_000.png,Dragons|Effusion,0,3,40,F,AP,2682,2749,0.143,0.143",  # unknown finding
        ",Effusion,0,4,40,F,AP,2682,2749,0.143,0.143",              # empty id
        "d_000.png,No Finding,0,5,33,F,PA,2682,2749,0.143,0.143",
    ])
    res = ingest.run(catalog, "nih-cxr14", p)
    assert (res.rows_read, res.files[0].rows_ingested, res.rows_quarantined) == (6, 2, 4)
    q = catalog.read("quarantine").sort("row")
    assert q["row"].to_list() == [2, 3, 4, 5]
    reasons = " | ".join(q["reason"].to_list())
    for words in ("duplicate id", "Patient Age: old", "unknown finding", "empty Image Index"):
        assert words in reasons
    assert set(q["file"]) == {"entries.csv"} and set(q["stage"]) == {"ingest"}
    assert catalog.read("images")["native_id"].to_list() == ["a_000.png", "d_000.png"]
    assert "4 quarantined" in res.summary()


def test_strict_stops_at_first_bad_row(catalog: Catalog, tmp_path):
    p = _write(tmp_path, [GOOD, "b_000.png,Effusion,0,2,old,F,AP,1,1,0.1,0.1"])
    with pytest.raises(IngestError, match=r"entries.csv: row 2 of 2: unparseable Patient Age"):
        ingest.run(catalog, "nih-cxr14", p, strict=True)
    assert catalog.read("images").height == 0  # nothing written


def test_missing_columns_name_file_found_and_expected(catalog: Catalog, tmp_path):
    p = tmp_path / "wrong.csv"
    p.write_text("Image,Labels\nx.png,Effusion\n")
    with pytest.raises(SchemaError) as e:
        ingest.run(catalog, "nih-cxr14", p)
    msg = str(e.value)
    assert "wrong.csv" in msg and "['Image', 'Labels']" in msg and "Patient ID" in msg


def test_cli_ingest_reports_counts_and_errors(catalog: Catalog, tmp_path):
    p = _write(tmp_path, [GOOD, "b_000.png,Effusion,0,2,old,F,AP,1,1,0.1,0.1"])
    ws = str(catalog.ws.root)
    res = CliRunner().invoke(main, ["ingest", "nih-cxr14", str(p), "-w", ws])
    assert res.exit_code == 0, res.output
    assert "2 rows read = 1 ingested + 1 quarantined" in res.output
    res = CliRunner().invoke(main, ["ingest", "nih-cxr14", str(p), "-w", ws, "--strict"])
    assert res.exit_code == 1 and "row 2" in res.output and "--strict" in res.output
    res = CliRunner().invoke(main, ["ingest", "no-such-format", str(p), "-w", ws])
    assert res.exit_code == 1 and "known formats" in res.output
    res = CliRunner().invoke(main, ["ingest", "nih-cxr14", str(tmp_path / "absent.csv"), "-w", ws])
    assert res.exit_code == 1 and "no such file" in res.output
