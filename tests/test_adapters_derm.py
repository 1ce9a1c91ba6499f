"""Dermatology and tube-annotation adapters: HAM10000, DermaMNIST, Fitzpatrick17k (both
releases) and the purrlab tube annotations on PadChest.

Expected figures are computed here from the CSVs with the ``csv`` module (and cited from
``../shared/data/PROVENANCE.md``), never from medlake's own code.
"""

from __future__ import annotations

import csv
import hashlib
import json
import tempfile
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import polars as pl
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from medlake.catalog import Catalog, CatalogError, IngestError, SchemaError, Workspace
from medlake.cli.main import main
from medlake.pipelines import ingest

HAM = "ham10000/HAM10000_metadata.csv"
DMN = "dermamnist/dermamnist_split_info.csv"
FZ = "fitzpatrick17k/fitzpatrick17k.csv"
FZ21 = "fitzpatrick17k/fitzpatrick17k_2021-04-16.csv"
RAW = "purrlab_tubes/Annotations_raw.csv"
AGG = "purrlab_tubes/Annotations_aggregated.csv"
PADCHEST = "cxr/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _lake(root: Path) -> Catalog:
    (root / ".dvc").mkdir(parents=True)
    return Catalog(Workspace(root.resolve()))


def _hashes(cat: Catalog) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(cat.ws.tables_dir.rglob("*.parquet"))}


@pytest.fixture(scope="module")
def derm(shared_data, tmp_path_factory):
    cat = _lake(tmp_path_factory.mktemp("derm") / "ws")
    res = {fmt: ingest.run(cat, fmt, shared_data / p) for fmt, p in [
        ("ham10000", HAM), ("dermamnist", DMN), ("fitzpatrick17k", FZ), ("fitzpatrick17k-2021", FZ21),
    ]}
    return cat, res


# --- HAM10000 ---------------------------------------------------------------------------------
def test_ham10000_images_lesions_and_diagnoses(derm, shared_data):
    cat, res = derm
    rows = _rows(shared_data / HAM)
    assert res["ham10000"].rows_read == len(rows) == 10_015 and res["ham10000"].rows_quarantined == 0
    img = cat.read("images", where="dataset_id = 'ham10000'")
    assert img.height == 10_015
    assert img["group_id"].n_unique() == len({r["lesion_id"] for r in rows}) == 7_470
    assert img["sex"].null_count() == sum(r["sex"] == "unknown" for r in rows) == 57
    assert img["site"].null_count() == sum(r["localization"] == "unknown" for r in rows)
    assert img["age"].null_count() == sum(r["age"] == "" for r in rows)
    one = img.filter(pl.col("native_id") == rows[0]["image_id"]).row(0, named=True)
    assert one["group_id"] == f"ham10000:{rows[0]['lesion_id']}"
    assert json.loads(one["meta"])["dx_type"] == rows[0]["dx_type"]
    ann = cat.read("annotations", where="source_id = 'ham10000:dx'")
    assert dict(ann.group_by("category").len().iter_rows()) == Counter(r["dx"] for r in rows)
    assert dict(ann.group_by("meaning").len().iter_rows()) == {
        f"confirmed_by:{k}": n for k, n in Counter(r["dx_type"] for r in rows).items()
    }
    src = cat.read("sources", where="source_id = 'ham10000:dx'").row(0, named=True)
    assert src["value_type"] == "category" and "confirmed_by:<dx_type>" in src["rule"]
    assert "histo" in src["rule"] and "confocal" in src["rule"]
    shared = cat.read("findings", where="source_id = 'ham10000:dx'")["shared_finding"].to_list()
    assert shared == ["diagnosis"]


# --- DermaMNIST -------------------------------------------------------------------------------
def test_dermamnist_split_positions_and_root_version(derm, shared_data):
    cat, res = derm
    rows = _rows(shared_data / DMN)
    assert res["dermamnist"].rows_read == 10_015 and res["dermamnist"].rows_quarantined == 0
    sp = cat.read("splits", where="scheme = 'dermamnist'")
    assert dict(sp.group_by("split").len().iter_rows()) == {"train": 7_007, "val": 1_003, "test": 2_005}
    expected = {(f"ham10000:{r['image_id']}", r["split"], int(r["index"])) for r in rows}
    assert set(sp.select("image_id", "split", "position").iter_rows()) == expected
    v = cat.read("versions", where="name = 'ham10000@dermamnist'").row(0, named=True)
    assert v["kind"] == "root" and v["scheme"] == "dermamnist" and v["n_images"] == 10_015
    assert json.loads(v["counts"]) == {"split": {"test": 2_005, "train": 7_007, "val": 1_003}}
    sha = hashlib.sha256((shared_data / DMN).read_bytes()).hexdigest()
    assert json.loads(v["inputs"]) == {"dermamnist_split_info.csv": sha}
    # DermaMNIST splits by image, so lesions leak: count them from the two CSVs directly.
    lesion = {r["image_id"]: r["lesion_id"] for r in _rows(shared_data / HAM)}
    per_lesion: dict[str, set[str]] = {}
    for r in rows:
        per_lesion.setdefault(lesion[r["image_id"]], set()).add(r["split"])
    leaking = sum(len(s) > 1 for s in per_lesion.values())
    got = cat.sql("""SELECT count(*) AS n FROM (SELECT i.group_id FROM splits s
                     JOIN images i USING (image_id) WHERE s.scheme = 'dermamnist'
                     GROUP BY 1 HAVING count(DISTINCT s.split) > 1)""").to_pylist()[0]["n"]
    assert got == leaking > 0


# --- Fitzpatrick17k ---------------------------------------------------------------------------
def test_fitzpatrick_images_sites_and_labels(derm, shared_data):
    cat, res = derm
    rows = _rows(shared_data / FZ)
    assert res["fitzpatrick17k"].rows_read == len(rows) == 16_577
    img = cat.read("images", where="dataset_id = 'fitzpatrick17k'")
    assert img.height == 16_577 and set(img["native_id"]) == {r["md5hash"] for r in rows}
    hosts = Counter(urlparse(r["url"]).hostname.removeprefix("www.") if r["url"] else None for r in rows)
    assert dict(img.group_by("site").len().iter_rows()) == dict(hosts)
    assert set(hosts) == {"dermaamin.com", "atlasdermatologico.com.br", None}
    lab = cat.read("annotations", where="source_id = 'fitzpatrick17k:label'")
    for f in ("label", "nine_partition_label", "three_partition_label"):
        got = dict(lab.filter(pl.col("finding") == f).group_by("category").len().iter_rows())
        assert got == Counter(r[f] for r in rows)
    assert lab.filter(pl.col("finding") == "label")["category"].n_unique() == 114


@pytest.mark.parametrize("col", ["fitzpatrick_scale", "fitzpatrick_centaur"])
def test_fitzpatrick_skin_types_keep_unknown_apart(derm, shared_data, col):
    cat = derm[0]
    rows = _rows(shared_data / FZ)
    ann = cat.read("annotations", where=f"source_id = 'fitzpatrick17k:{col}'")
    assert ann.height == 16_577
    unknown = ann.filter(pl.col("meaning") == "unknown")
    assert unknown.height == sum(r[col] == "-1" for r in rows) == {"fitzpatrick_scale": 565,
                                                                   "fitzpatrick_centaur": 1_073}[col]
    assert unknown["value"].null_count() == unknown.height and set(unknown["raw_value"]) == {"-1"}
    known = Counter(float(r[col]) for r in rows if r[col] != "-1")
    assert dict(ann.filter(pl.col("value").is_not_null()).group_by("value").len().iter_rows()) == known
    src = cat.read("sources", where=f"source_id = 'fitzpatrick17k:{col}'").row(0, named=True)
    assert src["value_type"] == "ordinal" and json.loads(src["code_map"])["-1"]["meaning"] == "unknown"
    assert cat.shared_finding(f"fitzpatrick17k:{col}", col) == "skin_type"


def test_fitzpatrick_qc_source_and_release_version(derm, shared_data):
    cat = derm[0]
    rows = _rows(shared_data / FZ)
    qc = cat.read("annotations", where="source_id = 'fitzpatrick17k:qc'")
    assert dict(qc.group_by("category").len().iter_rows()) == Counter(r["qc"] for r in rows if r["qc"])
    assert qc.height == 504 and qc["meaning"].null_count() == 0
    cov = cat.read("coverage", where="source_id = 'fitzpatrick17k:qc'")
    assert cov.height == 504  # only checked images are covered
    meta = cat.read("images", where="dataset_id = 'fitzpatrick17k'")["meta"].map_elements(
        lambda m: json.loads(m)["qc"], return_dtype=pl.String)
    assert meta.null_count() == 16_577 - 504
    v = cat.read("versions", where="name = 'fitzpatrick17k@2022-07-06'").row(0, named=True)
    assert v["kind"] == "root" and v["scheme"] is None and v["n_images"] == 16_577
    assert json.loads(v["params"]) == {"release": "2022-07-06", "sources": [
        "fitzpatrick17k:fitzpatrick_centaur", "fitzpatrick17k:fitzpatrick_scale",
        "fitzpatrick17k:label", "fitzpatrick17k:qc"]}
    roots = cat.read("versions")
    assert set(roots.columns) == set(cat.read("versions", where="name = 'ham10000@dermamnist'").columns)


def test_fitzpatrick_releases_diff_from_tables(derm, shared_data):
    cat, res = derm
    assert res["fitzpatrick17k-2021"].rows_quarantined == 0
    # Independent truth from the two CSVs: no label changed, the old column is fitzpatrick_scale.
    old = {r["md5hash"]: r for r in _rows(shared_data / FZ21)}
    new = _rows(shared_data / FZ)
    assert sum(old[r["md5hash"]]["label"] != r["label"] for r in new) == 0
    changed = cat.sql("""
        SELECT count(*) AS n FROM annotations a JOIN annotations b
          ON a.image_id = b.image_id AND a.finding = b.finding
        WHERE a.source_id = 'fitzpatrick17k:label'
          AND b.source_id = 'fitzpatrick17k:label@2021-04-16' AND a.category <> b.category
    """).to_pylist()[0]["n"]
    assert changed == 0
    skin = cat.sql("""
        SELECT v.name, count(*) AS n FROM versions v,
               unnest(CAST(json_extract(v.params, '$.sources') AS VARCHAR[])) AS s(source_id)
        JOIN findings f ON f.source_id = s.source_id
        WHERE v.dataset_id = 'fitzpatrick17k' AND f.shared_finding = 'skin_type' GROUP BY 1
    """).to_pylist()
    assert {r["name"]: r["n"] for r in skin} == {"fitzpatrick17k@2021-04-16": 1, "fitzpatrick17k@2022-07-06": 2}
    same = cat.sql("""
        SELECT count(*) AS n FROM annotations a JOIN annotations b USING (image_id)
        WHERE a.source_id = 'fitzpatrick17k:fitzpatrick_scale'
          AND b.source_id = 'fitzpatrick17k:fitzpatrick@2021-04-16'
          AND a.raw_value = b.raw_value
    """).to_pylist()[0]["n"]
    assert same == sum(old[r["md5hash"]]["fitzpatrick"] == r["fitzpatrick_scale"] for r in new) == 16_577


def test_reingest_gives_identical_files(derm, shared_data):
    cat = derm[0]
    before = _hashes(cat)
    for fmt, p in [("ham10000", HAM), ("dermamnist", DMN), ("fitzpatrick17k", FZ),
                   ("fitzpatrick17k-2021", FZ21)]:
        ingest.run(cat, fmt, shared_data / p)
    assert _hashes(cat) == before
    assert cat.read("images").height == 10_015 + 16_577


def test_cli_ingest_ham10000_and_list(shared_data, tmp_path):
    cat = _lake(tmp_path / "ws")
    runner = CliRunner()
    out = runner.invoke(main, ["ingest", "ham10000", str(shared_data / HAM), "-w", str(cat.ws.root)])
    assert out.exit_code == 0, out.output
    assert "10,015 rows read = 10,015 ingested + 0 quarantined" in out.output
    assert "7,470 lesions" in out.output
    out = runner.invoke(main, ["ingest", "--list", "-w", str(cat.ws.root)])
    for fmt in ("ham10000", "dermamnist", "fitzpatrick17k", "fitzpatrick17k-2021", "tubes-raw",
                "tubes-aggregated"):
        assert fmt in out.output
    out = runner.invoke(main, ["ingest", "tubes-raw", str(shared_data / RAW), "-w", str(cat.ws.root)])
    assert out.exit_code == 1 and "dataset 'padchest', which is not ingested yet" in out.output


# --- bad input (small CSVs in tmp_path) ---------------------------------------------------------
def _csv(tmp_path: Path, name: str, lines: list[str]) -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


HAM_HEAD = "lesion_id,image_id,dx,dx_type,age,sex,localization"
HAM_BAD = [
    HAM_HEAD,
    "HAM_1,ISIC_1,nv,histo,40.0,male,back",
    "HAM_1,ISIC_1,nv,histo,40.0,male,back",           # 2: duplicate image id
    "HAM_2,ISIC_2,xyz,histo,40.0,female,face",        # 3: unknown dx
    "HAM_3,ISIC_3,mel,biopsy,40.0,female,face",       # 4: unknown dx_type
    "HAM_4,ISIC_4,mel,histo,forty,female,face",       # 5: unparseable age
    ",ISIC_5,mel,histo,40.0,female,face",             # 6: empty lesion id
    "HAM_6,ISIC_6,bcc,consensus,,unknown,unknown",    # 7: fine (unknowns -> null)
]


def test_ham10000_bad_rows_are_quarantined(catalog, tmp_path):
    res = ingest.run(catalog, "ham10000", _csv(tmp_path, "meta.csv", HAM_BAD))
    assert (res.rows_read, res.files[0].rows_ingested, res.rows_quarantined) == (7, 2, 5)
    q = catalog.read("quarantine").sort("row")
    assert q["row"].to_list() == [2, 3, 4, 5, 6]
    reasons = q["reason"].to_list()
    assert reasons[0].startswith("duplicate id") and "unknown dx code 'xyz'" in reasons[1]
    assert "unknown dx_type 'biopsy'" in reasons[2] and "unparseable age: forty" == reasons[3]
    assert reasons[4] == "empty lesion_id"
    ok = catalog.read("images", where="native_id = 'ISIC_6'").row(0, named=True)
    assert ok["sex"] is None and ok["site"] is None and ok["age"] is None
    with pytest.raises(IngestError, match=r"meta.csv: row 2 of 7: duplicate id"):
        ingest.run(catalog, "ham10000", tmp_path / "meta.csv", strict=True)


BREAK = {  # how to spoil one HAM10000 row (None: leave it good)
    "dup": lambda r: {**r, "image_id": "ISIC_0"}, "dx": lambda r: {**r, "dx": "melanoma"},
    "dx_type": lambda r: {**r, "dx_type": "biopsy"}, "age": lambda r: {**r, "age": "n/a"},
    "lesion": lambda r: {**r, "lesion_id": " "}, None: lambda r: r,
}


@settings(max_examples=15, deadline=None)
@given(st.lists(st.sampled_from(list(BREAK)), min_size=1, max_size=25))
def test_ham10000_rows_in_equal_rows_out_plus_quarantined(kinds):
    rows = [{"lesion_id": "HAM_0", "image_id": "ISIC_0", "dx": "nv", "dx_type": "histo",
             "age": "50.0", "sex": "male", "localization": "back"}]
    rows += [BREAK[k]({**rows[0], "lesion_id": f"HAM_{i % 3}", "image_id": f"ISIC_{i}"})
             for i, k in enumerate(kinds, start=1)]
    with tempfile.TemporaryDirectory() as d:
        cat = _lake(Path(d) / "ws")
        p = _csv(Path(d), "m.csv", [HAM_HEAD] + [",".join(r.values()) for r in rows])
        res = ingest.run(cat, "ham10000", p)
        bad = [i for i, k in enumerate(kinds, start=2) if k is not None]
        assert (res.rows_read, res.rows_quarantined) == (len(rows), len(bad))
        assert sorted(cat.read("quarantine")["row"].to_list()) == bad
        assert cat.read("images").height == cat.read("annotations").height == len(rows) - len(bad)


def test_missing_columns_name_file_found_and_expected(catalog, tmp_path):
    p = _csv(tmp_path, "meta.csv", ["lesion_id,image_id,diagnosis,age", "HAM_1,ISIC_1,nv,40"])
    with pytest.raises(SchemaError) as e:
        ingest.run(catalog, "ham10000", p)
    msg = str(e.value)
    assert "meta.csv" in msg and "'dx'" in msg and "'diagnosis'" in msg and "Expected" in msg
    p = _csv(tmp_path, "f.csv", ["md5hash,fitzpatrick,label", "a,1,x"])
    with pytest.raises(SchemaError, match="fitzpatrick_scale"):
        ingest.run(catalog, "fitzpatrick17k", p)


def test_dermamnist_bad_rows(catalog, tmp_path):
    with pytest.raises(CatalogError, match="ingest it first with 'medlake ingest ham10000"):
        ingest.run(catalog, "dermamnist", _csv(tmp_path, "s.csv", ["split,index,image_id"]))
    ingest.run(catalog, "ham10000", _csv(tmp_path, "meta.csv", HAM_BAD))
    p = _csv(tmp_path, "s.csv", [
        "split,index,image_id",
        "train,0,ISIC_1",
        "train,0,ISIC_6",      # 2: slot train/0 repeated
        "val,0,ISIC_1",        # 3: image repeated
        "val,x,ISIC_6",        # 4: bad index
        "dev,0,ISIC_6",        # 5: unknown split
        "test,0,ISIC_999",     # 6: not in ham10000
        "test,1,ISIC_6",
    ])
    res = ingest.run(catalog, "dermamnist", p)
    assert (res.rows_read, res.files[0].rows_ingested, res.rows_quarantined) == (7, 2, 5)
    q = catalog.read("quarantine", where="file = 's.csv'").sort("row")
    assert q["row"].to_list() == [2, 3, 4, 5, 6]
    assert "not in dataset 'ham10000'" in q["reason"][4] and q["item"][4] == "ISIC_999"
    sp = catalog.read("splits").sort("split")
    assert sp.select("split", "position").rows() == [("test", 1), ("train", 0)]
    assert any("positions run to 1 (gaps)" in m for m in res.messages)
    # strict names the first bad row in file order, whichever check caught it
    with pytest.raises(IngestError, match=r"s.csv: row 2 of 7: duplicate id.*5 bad rows in all"):
        ingest.run(catalog, "dermamnist", p, strict=True)
    assert catalog.read("splits").height == 2  # nothing written by the strict run


FZ_HEAD = ("md5hash,fitzpatrick_scale,fitzpatrick_centaur,label,nine_partition_label,"
           "three_partition_label,qc,url,url_alphanum")
H = [f"{i:032x}" for i in range(8)]


def test_fitzpatrick_bad_rows_and_linked_release(catalog, tmp_path):
    p = _csv(tmp_path, "fz.csv", [
        FZ_HEAD,
        f"{H[0]},3,-1,psoriasis,inflammatory,non-neoplastic,1 Diagnostic,https://www.dermaamin.com/a.jpg,a",
        f"{H[0]},3,3,psoriasis,inflammatory,non-neoplastic,,,",     # 2: duplicate
        "XYZ,3,3,psoriasis,inflammatory,non-neoplastic,,,",         # 3: not an md5
        f"{H[1]},7,3,psoriasis,inflammatory,non-neoplastic,,,",     # 4: skin type 7
        f"{H[2]},2,?,psoriasis,inflammatory,non-neoplastic,,,",     # 5: unparseable centaur
        f"{H[3]},2,2,,inflammatory,non-neoplastic,,,",              # 6: empty label
        f"{H[4]},-1,6.0,lupus,inflammatory,non-neoplastic,,http://atlasdermatologico.com.br/b.jpg,b",
    ])
    res = ingest.run(catalog, "fitzpatrick17k", p)
    assert (res.rows_read, res.files[0].rows_ingested, res.rows_quarantined) == (7, 2, 5)
    reasons = catalog.read("quarantine").sort("row")["reason"].to_list()
    assert "md5hash is not 32" in reasons[1] and "fitzpatrick_scale is not a skin type" in reasons[2]
    assert "'?'" in reasons[3] and reasons[4] == "empty label"
    a = catalog.read("annotations").filter(pl.col("image_id") == f"fitzpatrick17k:{H[4]}")
    vals = dict(a.filter(pl.col("finding").str.starts_with("fitz")).select("finding", "value").iter_rows())
    assert vals == {"fitzpatrick_scale": None, "fitzpatrick_centaur": 6.0}
    assert dict(catalog.read("images").select("native_id", "site").iter_rows()) == {
        H[0]: "dermaamin.com", H[4]: "atlasdermatologico.com.br"}
    with pytest.raises(IngestError, match=r"fz.csv: row 2 of 7"):
        ingest.run(catalog, "fitzpatrick17k", p, strict=True)
    head21 = ",md5hash,fitzpatrick,label,nine_partition_label,three_partition_label,qc,url,url_alphanum"
    p21 = _csv(tmp_path, "fz21.csv", [
        head21,
        f"0,{H[0]},3,psoriasis,inflammatory,non-neoplastic,,,",
        f"1,{H[5]},3,psoriasis,inflammatory,non-neoplastic,,,",  # 2: not in the catalog
        f"2,{H[4]},-1,lupus,inflammatory,non-neoplastic,,,",
    ])
    res = ingest.run(catalog, "fitzpatrick17k-2021", p21)
    assert (res.rows_read, res.files[0].rows_ingested, res.rows_quarantined) == (3, 2, 1)
    q = catalog.read("quarantine", where="file = 'fz21.csv'").row(0, named=True)
    assert q["row"] == 2 and q["item"] == H[5] and "not in dataset 'fitzpatrick17k'" in q["reason"]
    assert set(catalog.read("sources")["source_id"]) >= {
        "fitzpatrick17k:label@2021-04-16", "fitzpatrick17k:fitzpatrick@2021-04-16"}
    assert catalog.read("versions")["name"].sort().to_list() == [
        "fitzpatrick17k@2021-04-16", "fitzpatrick17k@2022-07-06"]


# --- tubes ------------------------------------------------------------------------------------
RAW_HEAD = (",ImageDir,ImageID,Chest_drain_tube_a1,NSG_tube_a1,Endotracheal_tube_a1,"
            "Tracheostomy_tube_a1,Notes_a1,Chest_drain_tube_a2,NSG_tube_a2,Endotracheal_tube_a2,"
            "Tracheostomy_tube_a2,Notes_a2")


def _seed_padchest(cat: Catalog, ids: list[str]) -> None:
    # A minimal padchest image list written through the real table store (the padchest
    # adapter's own tests cover its CSV); enough for tubes to link to.
    cat.write("images", [{"image_id": f"padchest:{i}", "dataset_id": "padchest", "native_id": i}
                         for i in ids], stage="ingest", partition="padchest")


def test_tubes_raw_invalid_answers_kept_and_bad_rows_quarantined(catalog, tmp_path):
    _seed_padchest(catalog, ["a.png", "b.png"])
    p = _csv(tmp_path, "raw.csv", [
        RAW_HEAD,
        "0,1,a.png,0.0,0.75,INVALID,1.0,upside down ,0.0,0.25,0.0,1.0,",
        "1,1,a.png,0.0,0.0,0.0,0.0,,0.0,0.0,0.0,0.0,",      # 2: duplicate
        "2,1,zzz.png,0.0,0.0,0.0,0.0,,0.0,0.0,0.0,0.0,",    # 3: not in padchest
        "3,1,b.png,0.3,1,,0.5,,1.0,1.0,1.0,1.0,rotated",
    ])
    res = ingest.run(catalog, "tubes-raw", p)
    assert (res.rows_read, res.files[0].rows_ingested, res.rows_quarantined) == (4, 2, 2)
    ann = catalog.read("annotations")
    assert ann.height == 2 * 2 * 4
    bad = ann.filter(pl.col("is_invalid")).sort("raw_value")
    assert bad.select("image_id", "finding", "raw_value", "value", "meaning").rows() == [
        ("padchest:b.png", "Endotracheal_tube", None, None, "not_answered"),
        ("padchest:b.png", "Chest_drain_tube", "0.3", None, "invalid"),
        ("padchest:a.png", "Endotracheal_tube", "INVALID", None, "invalid"),
    ]
    notes = ann.group_by("image_id", "annotator").agg(pl.col("note").unique()).sort("image_id", "annotator")
    assert [(r[0], r[1], r[2]) for r in notes.rows()] == [
        ("padchest:a.png", "a1", ["upside down"]), ("padchest:a.png", "a2", [None]),
        ("padchest:b.png", "a1", [None]), ("padchest:b.png", "a2", ["rotated"]),
    ]
    assert ann.filter(pl.col("raw_value") == "1")["value"].to_list() == [1.0]
    with pytest.raises(IngestError, match=r"raw.csv: row 2 of 4"):
        ingest.run(catalog, "tubes-raw", p, strict=True)
    with pytest.raises(SchemaError, match="Notes_a2"):
        ingest.run(catalog, "tubes-raw", _csv(tmp_path, "r2.csv", [RAW_HEAD.rsplit(",", 1)[0]]))


def test_tubes_aggregated_disagreement_and_bad_values(catalog, tmp_path):
    _seed_padchest(catalog, ["a.png", "b.png"])
    head = ",ImageID,ImageDir,ImagePath,Chest_drain,NSG_tube,Endotracheal_tube,Tracheostomy_tube"
    p = _csv(tmp_path, "agg.csv", [head, "0,a.png,1,x,1,0,-1,0", "1,b.png,1,x,2,0,0,0"])
    res = ingest.run(catalog, "tubes-aggregated", p)
    assert (res.rows_read, res.files[0].rows_ingested, res.rows_quarantined) == (2, 1, 1)
    assert "Chest_drain is not 1, 0 or -1" in catalog.read("quarantine")["reason"][0]
    ann = catalog.read("annotations").sort("finding")
    assert ann.select("finding", "value", "meaning").rows() == [
        ("Chest_drain", 1.0, "positive"), ("Endotracheal_tube", None, "annotators_disagree"),
        ("NSG_tube", 0.0, "negative"), ("Tracheostomy_tube", 0.0, "negative"),
    ]


@pytest.fixture(scope="module")
def tubes(shared_data, tmp_path_factory):
    cat = _lake(tmp_path_factory.mktemp("tubes") / "ws")
    ingest.run(cat, "padchest", shared_data / PADCHEST)
    res = {fmt: ingest.run(cat, fmt, shared_data / p) for fmt, p in [("tubes-raw", RAW), ("tubes-aggregated", AGG)]}
    return cat, res


def test_tubes_real_files(tubes, shared_data):
    cat, res = tubes
    raw, agg = _rows(shared_data / RAW), _rows(shared_data / AGG)
    assert res["tubes-raw"].rows_read == len(raw) == 1_011 and res["tubes-raw"].rows_quarantined == 0
    assert res["tubes-aggregated"].rows_read == len(agg) == 1_011
    a = cat.read("annotations", where="source_id = 'padchest:tubes_raw'")
    assert a.height == 1_011 * 2 * 4 and a["is_invalid"].sum() == 0
    for who in ("a1", "a2"):
        got = a.filter((pl.col("annotator") == who) & pl.col("note").is_not_null())["image_id"].n_unique()
        assert got == sum(bool(r[f"Notes_{who}"].strip()) for r in raw)
    c = cat.read("annotations", where="source_id = 'padchest:tubes_consensus'")
    cols = ["Chest_drain", "NSG_tube", "Endotracheal_tube", "Tracheostomy_tube"]
    assert c.filter(pl.col("meaning") == "annotators_disagree").height == sum(
        r[f] == "-1" for r in agg for f in cols) == 403
    shared = set(cat.read("findings", where="source_id LIKE 'padchest:tubes%'")["shared_finding"])
    assert shared == {"chest_drain", "nsg_tube", "endotracheal_tube", "tracheostomy_tube"}
    # The consensus source's rule, applied to the raw grades in the tables, gives the
    # published consensus for every (image, tube).
    derived = cat.sql("""
        WITH r AS (SELECT image_id, f.shared_finding AS tube, annotator,
                          CASE WHEN value >= 0.75 THEN 1 WHEN value <= 0.25 THEN 0 END AS v
                   FROM annotations JOIN findings f USING (source_id, finding)
                   WHERE source_id = 'padchest:tubes_raw'),
             d AS (SELECT image_id, tube, CASE WHEN count(v) = 2 AND min(v) = max(v)
                          THEN min(v) END AS v FROM r GROUP BY 1, 2)
        SELECT count(*) AS n FROM d JOIN annotations c ON c.image_id = d.image_id
          JOIN findings f ON f.source_id = c.source_id AND f.finding = c.finding
        WHERE c.source_id = 'padchest:tubes_consensus' AND f.shared_finding = d.tube
          AND c.value IS NOT DISTINCT FROM d.v
    """).to_pylist()[0]["n"]
    assert derived == 1_011 * 4
