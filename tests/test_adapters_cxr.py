"""Chest X-ray adapters: NIH boxes, Google 2019, RSNA, SIIM-ACR, PadChest, CheXpert, VinDr-CXR.

The real public files (../shared/data/cxr) are ingested once per module; every expected
figure is computed here independently from the same file with the csv module (or cited
from PROVENANCE.md). Bad input is tested on small CSVs written in tmp_path.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from medlake.catalog import Catalog, CatalogError, IngestError, SchemaError, Workspace
from medlake.cli.main import main
from medlake.pipelines import ingest

CXR = {
    "nih-cxr14": "Data_Entry_2017_v2020.csv.gz",
    "nih-bbox": "BBox_List_2017.csv.gz",
    "google2019": "google2019_nih-chest-xray-labels.csv.gz",
    "rsna-pneumonia": "kaggle_stage_2_train_labels.csv.gz",
    "siim-acr": "siim-pneumothorax-train-rle.csv.gz",
    "padchest": "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz",
    "chexpert": "chexpert_train.csv.gz",
    "vindr-cxr": "vinbigdata-train.csv.gz",
}


def rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """The reference reader: header and data rows by the csv module."""
    with gzip.open(path, "rt", newline="") as fh:
        r = csv.reader(fh)
        header = next(r)
        return header, list(r)


def count_rows(path: Path) -> int:
    with gzip.open(path, "rt", newline="") as fh:
        return sum(1 for _ in csv.reader(fh)) - 1


def dicts(path: Path, cols: list[str] | None = None) -> list[dict[str, str]]:
    """Data rows as dicts (only ``cols`` when given, to keep the big files small in memory)."""
    with gzip.open(path, "rt", newline="") as fh:
        r = csv.reader(fh)
        header = next(r)
        keep = [(i, c) for i, c in enumerate(header) if cols is None or c in cols]
        return [{c: row[i] for i, c in keep} for row in r]


@pytest.fixture(scope="module")
def real(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """One lake with every CXR format ingested from the real files; results by format."""
    root = tmp_path_factory.mktemp("cxr") / "ws"
    (root / ".dvc").mkdir(parents=True)
    cat = Catalog(Workspace(root.resolve()))
    results = {fmt: ingest.run(cat, fmt, shared_data / "cxr" / f) for fmt, f in CXR.items()}
    return cat, results, shared_data / "cxr"


def ann(cat: Catalog, source_id: str) -> pl.DataFrame:
    return cat.read("annotations", where=f"source_id = '{source_id}'")


def dense(cat: Catalog, source_id: str) -> pl.DataFrame:
    """Stored rows plus the implicit ones (labels_dense view)."""
    return cat.query("SELECT * FROM labels_dense WHERE source_id = $1", [source_id])


def files_bytes(cat: Catalog) -> dict[str, bytes]:
    return {
        str(p.relative_to(cat.ws.tables_dir)): p.read_bytes()
        for p in sorted(cat.ws.tables_dir.rglob("*.parquet"))
    }


# --- real files -------------------------------------------------------------------------------
def test_every_real_file_is_accounted_for(real):
    _, results, d = real
    for fmt, res in results.items():
        n = count_rows(d / CXR[fmt])
        assert res.files[0].rows_read == n, fmt
        assert res.files[0].rows_ingested + res.files[0].rows_quarantined == n
    # the real files are clean: nothing quarantined (PROVENANCE row counts)
    assert {f: r.rows_quarantined for f, r in results.items()} == dict.fromkeys(CXR, 0)
    assert results["padchest"].rows_read == 160_861
    assert results["chexpert"].rows_read == 223_414
    assert results["vindr-cxr"].rows_read == 67_914
    assert results["siim-acr"].rows_read == 12_954


def test_nih_bbox_real(real):
    cat, _, d = real
    header, data = rows(d / CXR["nih-bbox"])
    assert header[:3] == ["Image Index", "Finding Label", "Bbox [x"]  # the header quirk
    a = ann(cat, "nih-cxr14:bbox_expert")
    assert a.height == len({(r[0], r[1]) for r in data}) == 984
    assert a["image_id"].n_unique() == len({r[0] for r in data}) == 880
    assert set(a["value"].to_list()) == {1.0}
    boxes = Counter(r[1] for r in data)
    got = {f: sum(len(json.loads(v)) for v in g["raw_value"]) for (f,), g in a.group_by("finding")}
    assert got == dict(boxes)
    first = data[0]
    row = a.filter(pl.col("image_id") == f"nih-cxr14:{first[0]}", pl.col("finding") == first[1])
    assert json.loads(row["raw_value"][0])[0] == pytest.approx([float(x) for x in first[2:6]])
    src = cat.read("sources", where="source_id = 'nih-cxr14:bbox_expert'").row(0, named=True)
    assert (src["kind"], src["exhaustive"], src["negatives"]) == ("expert", False, "none")
    f = cat.read("findings", where="source_id = 'nih-cxr14:bbox_expert'")
    assert dict(zip(f["finding"], f["shared_finding"]))["Infiltrate"] == "infiltration"


def test_google2019_real(real):
    cat, _, d = real
    data = dicts(d / CXR["google2019"])
    a = ann(cat, "nih-cxr14:google2019_expert")
    assert a.height == 4 * len(data) == 4 * 4_376
    for f in ["Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass"]:
        assert a.filter(pl.col("finding") == f)["value"].sum() == sum(r[f] == "YES" for r in data)
    s = cat.read("splits", where="scheme = 'google2019'")
    assert dict(Counter(s["split"].to_list())) == dict(Counter(r["Set Id"] for r in data))
    v = cat.read("versions", where="name = 'nih-cxr14@google2019'").row(0, named=True)
    assert v["kind"] == "root" and v["n_images"] == len(data)
    assert json.loads(v["counts"])["split"] == {"test": 1_962, "val": 2_414}


def test_rsna_real(real):
    cat, res, d = real
    data = dicts(d / CXR["rsna-pneumonia"])
    ids = {r["patientId"] for r in data}
    pos_ids = {r["patientId"] for r in data if r["Target"] == "1"}
    im = cat.read("images", where="dataset_id = 'rsna-pneumonia'")
    assert im.height == len(ids) == 26_684
    a = ann(cat, "rsna-pneumonia:expert")
    assert a.height == len(ids) and a["value"].sum() == len(pos_ids)
    n_boxes = sum(len(json.loads(v)) for v in a.filter(pl.col("value") == 1)["raw_value"])
    assert n_boxes == sum(r["Target"] == "1" for r in data) == 9_555
    # the sibling DICOM header dump was picked up by default
    hdr = {r["PatientID"]: r for r in dicts(d / "kaggle_stage_2_train_images_dicom_headers.csv.gz")}
    assert [f.file for f in res["rsna-pneumonia"].files][1].startswith("kaggle_stage_2_train_images")
    assert dict(Counter(im["view"].to_list())) == dict(Counter(r["ViewPosition"] for r in hdr.values()))
    one = im.row(0, named=True)
    assert one["age"] == float(hdr[one["native_id"]]["PatientAge"])
    assert json.loads(one["meta"])["dicom_modality"] == "CR"


def test_siim_real(real):
    cat, _, d = real
    header, data = rows(d / CXR["siim-acr"])
    assert header[1] == " EncodedPixels"
    masks = Counter(r[0] for r in data if r[1].strip() != "-1")
    a = ann(cat, "siim-acr-pneumothorax:expert")
    assert a.height == len({r[0] for r in data}) == 12_047
    pos = a.filter(pl.col("value") == 1)
    assert pos.height == len(masks)
    assert sum(json.loads(v)["masks"] for v in pos["raw_value"]) == sum(masks.values())
    assert set(a.filter(pl.col("value") == 0)["raw_value"].to_list()) == {"-1"}


def test_padchest_real(real):
    cat, res, d = real
    data = dicts(d / CXR["padchest"], ["PatientID", "MethodLabel", "Labels"])
    im = cat.read("images", where="dataset_id = 'padchest'")
    assert im.height == 160_861
    assert im["group_id"].n_unique() == len({r["PatientID"] for r in data}) == 67_625
    # reference parse: ast.literal_eval per row (slow, independent of the adapter's regex)
    labelled = [r for r in data if r["Labels"] != "nan"]
    per_source: dict[str, Counter] = {"physician": Counter(), "rnn": Counter()}
    for r in labelled:
        src = "physician" if r["MethodLabel"] == "Physician" else "rnn"
        per_source[src].update({x.strip() for x in ast.literal_eval(r["Labels"]) if x.strip()})
    cov = cat.read("coverage", where="source_id LIKE 'padchest:%'")
    assert cov.height == len(labelled) == 160_861 - 103
    assert "103 images have no labels" in res["padchest"].summary()
    for src, counts in per_source.items():
        a = ann(cat, f"padchest:{src}")
        assert a.height == sum(counts.values())
        got = dict(zip(*a.group_by("finding").len().to_dict(as_series=False).values()))
        assert got == dict(counts)
    tubes = {"chest drain tube": "chest_drain", "NSG tube": "nsg_tube",
             "endotracheal tube": "endotracheal_tube", "tracheostomy tube": "tracheostomy_tube"}
    f = cat.read("findings", where="source_id = 'padchest:physician'")
    shared = dict(zip(f["finding"], f["shared_finding"]))
    for name, target in tubes.items():
        assert shared[name] == target
        assert per_source["physician"][name] > 0
    src = cat.read("sources", where="dataset_id = 'padchest'").sort("name")
    assert src["kind"].to_list() == ["expert", "report_nlp"]
    assert set(src["negatives"].to_list()) == {"implicit"}


def test_chexpert_real(real):
    cat, _, d = real
    data = dicts(d / CXR["chexpert"], [
        "Frontal/Lateral", "AP/PA", "Pneumothorax", "Pleural Effusion", "Support Devices"])
    im = cat.read("images", where="dataset_id = 'chexpert'")
    assert im.height == 223_414 and im["group_id"].n_unique() == 64_540
    stored = ann(cat, "chexpert:report_nlp")
    assert stored["raw_value"].is_in([""]).sum() == 0  # blanks are implicit, not stored
    a = dense(cat, "chexpert:report_nlp")
    assert a.height == 14 * len(data)
    for f in ["Pneumothorax", "Pleural Effusion", "Support Devices"]:
        g = a.filter(pl.col("finding") == f)
        m = Counter(g["meaning"].to_list())
        ref = Counter(r[f] for r in data)
        assert (m["positive"], m["negative"], m["uncertain"], m["not_mentioned"]) == (
            ref["1.0"], ref["0.0"], ref["-1.0"], ref[""])
        assert g.filter(pl.col("meaning") == "uncertain")["value"].null_count() == ref["-1.0"]
    views = Counter(r["AP/PA"] if r["Frontal/Lateral"] == "Frontal" else "LATERAL" for r in data)
    assert dict(Counter(im["view"].to_list())) == dict(views)


def test_vindr_real(real):
    cat, _, d = real
    data = dicts(d / CXR["vindr-cxr"])
    a = ann(cat, "vindr-cxr:radiologists")
    reads = {(r["image_id"], r["rad_id"]) for r in data}
    assert len({r["image_id"] for r in data}) == 15_000 and len(reads) == 45_000
    assert a.height == 15 * len(reads) and a["annotator"].n_unique() == 17
    for f in ["Cardiomegaly", "Pneumothorax", "No finding"]:
        ref = {(r["image_id"], r["rad_id"]) for r in data if r["class_name"] == f}
        assert a.filter(pl.col("finding") == f)["value"].sum() == len(ref)
    n_boxes = sum(len(json.loads(v)) for v in a.filter(
        (pl.col("value") == 1) & (pl.col("finding") != "No finding"))["raw_value"])
    assert n_boxes == sum(r["class_name"] != "No finding" for r in data)
    f = cat.read("findings", where="source_id = 'vindr-cxr:radiologists'")
    shared = dict(zip(f["finding"], f["shared_finding"]))
    assert shared["Nodule/Mass"] == "nodule_or_mass" and shared["No finding"] == "no_finding"


def test_reingest_is_byte_identical(real):
    cat, _, d = real
    before = files_bytes(cat)
    for fmt, name in CXR.items():
        ingest.run(cat, fmt, d / name)
    after = files_bytes(cat)
    assert before.keys() == after.keys()
    assert [k for k in before if before[k] != after[k]] == []


# --- bad input: small files in tmp_path ------------------------------------------------------
NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position"


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text.strip() + "\n")
    return p


@pytest.fixture
def nih(catalog: Catalog, tmp_path: Path) -> Catalog:
    """A catalog holding a 3-image NIH dataset (a.png, b.png of patient 1; c.png of 2)."""
    p = write(tmp_path, "nih.csv", f"""
{NIH_HEADER}
a.png,No Finding,0,1,50,M,PA
b.png,Effusion,1,1,51,M,PA
c.png,Mass|Nodule,0,2,60,F,AP
""")
    ingest.run(catalog, "nih-cxr14", p)
    return catalog


def reasons(cat: Catalog) -> dict[tuple[str, int], str]:
    q = cat.read("quarantine")
    return {(f, r): why for f, r, why in q.select("file", "row", "reason").iter_rows()}


MISSING_COLUMNS = {
    "nih-bbox": "Image Index,Label,x,y,w,h\na.png,Mass,1,2,3,4",
    "google2019": "Image Index,Fracture,Pneumothorax,Airspace opacity,Set Id\na.png,NO,NO,NO,val",
    "rsna-pneumonia": "patientId,x,y,width,height\nr1,,,,",
    "siim-acr": "ImageId,Pixels\ns1,-1",
    "padchest": "ImageID,PatientID,Labels\np.png,1,['normal']",
    "chexpert": "Path,Sex,Age,Frontal/Lateral\nx/patient1/study1/view1_frontal.jpg,Male,1,Frontal",
    "vindr-cxr": "image_id,class_name,rad_id\nv1,No finding,R1",
}


@pytest.mark.parametrize("fmt", sorted(MISSING_COLUMNS))
def test_missing_columns_name_file_found_and_expected(nih: Catalog, tmp_path: Path, fmt: str):
    p = write(tmp_path, f"bad-{fmt}.csv", MISSING_COLUMNS[fmt])
    with pytest.raises(SchemaError) as e:
        ingest.run(nih, fmt, p)
    msg = str(e.value)
    assert f"bad-{fmt}.csv" in msg and "Found columns" in msg and "Expected" in msg
    header = MISSING_COLUMNS[fmt].splitlines()[0].split(",")
    assert repr(header[-1]) in msg  # the columns found are listed


def test_linked_formats_need_nih_first(catalog: Catalog, tmp_path: Path):
    p = write(tmp_path, "b.csv", "Image Index,Finding Label,Bbox [x,y,w,h],,,\na.png,Mass,1,2,3,4")
    with pytest.raises(CatalogError, match="ingest it first with 'medlake ingest nih-cxr14"):
        ingest.run(catalog, "nih-bbox", p)


def test_bbox_bad_rows(nih: Catalog, tmp_path: Path):
    p = write(tmp_path, "box.csv", """
Image Index,Finding Label,Bbox [x,y,w,h],,,
a.png,Mass,10,20,30,40
a.png,Mass,50,60,70,80
a.png,Mass,10,20,30,40
zzz.png,Mass,1,2,3,4
b.png,Nodule,1,two,3,4
c.png,Infiltrate,1,2,3,4
""")
    res = ingest.run(nih, "nih-bbox", p)
    f = res.files[0]
    assert (f.rows_read, f.rows_ingested, f.rows_quarantined) == (6, 3, 3)
    why = reasons(nih)
    assert why[("box.csv", 3)].startswith("duplicate id")
    assert "not in dataset 'nih-cxr14'" in why[("box.csv", 4)]
    assert why[("box.csv", 5)].startswith("unparseable box")
    a = ann(nih, "nih-cxr14:bbox_expert").sort("image_id")
    assert a["image_id"].to_list() == ["nih-cxr14:a.png", "nih-cxr14:c.png"]
    assert json.loads(a["raw_value"][0]) == [[10, 20, 30, 40], [50, 60, 70, 80]]
    with pytest.raises(IngestError, match=r"box.csv: row 3 of 6: duplicate id"):
        ingest.run(nih, "nih-bbox", p, strict=True)


def test_google2019_bad_rows_and_split(nih: Catalog, tmp_path: Path):
    p = write(tmp_path, "g.csv", """
Image Index,Fracture,Pneumothorax,Airspace opacity,Nodule or mass,Set Id
a.png,NO,YES,NO,NO,test
b.png,NO,MAYBE,NO,NO,test
c.png,yes,NO,NO,NO,val
c.png,NO,NO,NO,NO,val
q.png,NO,NO,NO,NO,val
""")
    res = ingest.run(nih, "google2019", p)
    assert (res.rows_read, res.rows_quarantined) == (5, 3)
    why = reasons(nih)
    assert why[("g.csv", 2)] == "unparseable Pneumothorax (expected YES or NO): MAYBE"
    assert why[("g.csv", 4)].startswith("duplicate id")
    assert "not in dataset" in why[("g.csv", 5)]
    a = ann(nih, "nih-cxr14:google2019_expert")
    assert a.height == 8 and a["value"].sum() == 2  # lower-case 'yes' is read as YES
    assert nih.read("splits").sort("image_id")["split"].to_list() == ["test", "val"]
    assert nih.read("versions")["name"].to_list() == ["nih-cxr14@google2019"]
    # a fixed file replaces the partition and its quarantine rows
    write(tmp_path, "g.csv", "Image Index,Fracture,Pneumothorax,Airspace opacity,Nodule or mass,"
          "Set Id\na.png,NO,NO,NO,NO,test")
    ingest.run(nih, "google2019", p)
    assert nih.read("quarantine").height == 0 and nih.read("splits").height == 1


def test_rsna_bad_rows_headers_and_mapping(nih: Catalog, tmp_path: Path):
    labels = write(tmp_path, "labels.csv", """
patientId,x,y,width,height,Target
r1,,,,,0
r2,1,2,3,4,1
r2,5,6,7,8,1
r3,,,,,1
r4,,,,,2
r5,,,,,0
r5,,,,,0
r6,,,,,0
r6,1,1,1,1,1
""")
    hdr = write(tmp_path, "hdr.csv", """
PatientID,PatientAge,PatientSex,ViewPosition,Modality
r1,41,F,PA,CR
r2,old,M,AP,CR
rx,30,M,AP,CR
""")
    mp = write(tmp_path, "map.csv", "rsna_id,nih_image\nr1,c.png\nr2,gone.png\nnope,a.png\nr1,a.png")
    res = ingest.run(nih, "rsna-pneumonia", labels, headers=str(hdr), mapping=str(mp))
    counts = {f.file: (f.rows_read, f.rows_ingested, f.rows_quarantined) for f in res.files}
    assert counts == {"labels.csv": (9, 5, 4), "hdr.csv": (3, 1, 2), "map.csv": (4, 2, 2)}
    why = reasons(nih)
    assert why[("labels.csv", 4)] == "Target 1 without a numeric box (x,y,width,height)"
    assert why[("labels.csv", 5)] == "unparseable Target (expected 0 or 1): 2"
    assert why[("labels.csv", 7)].startswith("duplicate id")
    assert why[("labels.csv", 8)] == "Target 0 for an id that also has boxes"
    assert why[("hdr.csv", 2)] == "unparseable PatientAge: old"
    assert why[("hdr.csv", 3)] == "names a patientId that is not in the labels file"
    im = {r["native_id"]: r for r in nih.read("images", where="dataset_id='rsna-pneumonia'").iter_rows(named=True)}
    assert sorted(im) == ["r1", "r2", "r5", "r6"]
    assert im["r1"]["group_id"] == "nih-cxr14:2" and im["r1"]["age"] == 41.0  # c.png's patient
    assert json.loads(im["r1"]["meta"])["nih_image"] == "c.png"
    assert im["r2"]["group_id"] == "rsna-pneumonia:r2"  # mapped NIH image not in the catalog
    a = {r["image_id"]: r for r in ann(nih, "rsna-pneumonia:expert").iter_rows(named=True)}
    assert json.loads(a["rsna-pneumonia:r2"]["raw_value"]) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert a["rsna-pneumonia:r6"]["value"] == 1.0
    with pytest.raises(IngestError, match="unknown|no option"):
        ingest.run(nih, "rsna-pneumonia", labels, colour="red")
    with pytest.raises(IngestError, match="mapping file"):
        ingest.run(nih, "rsna-pneumonia", labels, mapping=str(tmp_path / "absent.csv"))


def test_siim_masks_merge_and_bad_rows(catalog: Catalog, tmp_path: Path):
    p = write(tmp_path, "rle.csv", """
ImageId, EncodedPixels
s1,-1
s2,1 2 10 3
s2,40 2
s2,40 2
s3, 5 x
s4,-1
s4,7 3
""")
    res = ingest.run(catalog, "siim-acr", p)
    f = res.files[0]
    assert (f.rows_read, f.rows_ingested, f.rows_quarantined) == (7, 4, 3)
    why = reasons(catalog)
    assert why[("rle.csv", 4)].startswith("duplicate id")
    assert why[("rle.csv", 5)].startswith("unparseable EncodedPixels")
    assert why[("rle.csv", 6)] == "-1 (no pneumothorax) for an image with masks"
    a = {r["image_id"].split(":")[1]: r for r in ann(catalog, "siim-acr-pneumothorax:expert").iter_rows(named=True)}
    assert {k: (v["value"], v["raw_value"]) for k, v in a.items()} == {
        "s1": (0.0, "-1"), "s2": (1.0, '{"masks": 2}'), "s4": (1.0, '{"masks": 1}')}
    with pytest.raises(IngestError, match="rle.csv: row 4 of 7"):
        ingest.run(catalog, "siim-acr", p, strict=True)


def test_padchest_bad_rows(catalog: Catalog, tmp_path: Path):
    cols = ("ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,"
            "Projection,MethodLabel,Labels")
    p = write(tmp_path, "pc.csv", f"""
{cols}
i1.png,0,20140915,s1,p1,1930.0,F,PA,Physician,"['normal']"
i2.png,0,20140915,s1,p1,1930.0,F,L,RNN_model,"['', ' chest drain tube', 'pleural effusion', 'pleural effusion']"
i3.png,1,20150101,s2,p2,None,M,PA,RNN_model,nan
i4.png,1,20150101,s2,p2,1950.0,M,PA,RNN_model,normal
i1.png,1,20150101,s2,p2,1950.0,M,PA,Physician,"['normal']"
i5.png,1,20150101,s2,p2,1950.0,M,PA,Guess,"['normal']"
i6.png,1,2015-01-01,s2,p2,1950.0,M,PA,Physician,"['normal']"
""")
    res = ingest.run(catalog, "padchest", p)
    assert (res.rows_read, res.files[0].rows_ingested, res.rows_quarantined) == (7, 3, 4)
    why = reasons(catalog)
    assert why[("pc.csv", 4)].startswith("unparseable Labels")
    assert why[("pc.csv", 5)].startswith("duplicate id")
    assert why[("pc.csv", 6)].startswith("unknown MethodLabel")
    assert why[("pc.csv", 7)].startswith("unparseable StudyDate_DICOM")
    a = ann(catalog, "padchest:rnn")
    assert sorted(a["finding"].to_list()) == ["chest drain tube", "pleural effusion"]
    cov = catalog.read("coverage").sort("image_id")
    assert cov["image_id"].to_list() == ["padchest:i1.png", "padchest:i2.png"]  # i3: no labels
    im = catalog.read("images").sort("image_id")
    assert im["age"].to_list() == [84.0, 84.0, None]
    assert im["study_date"][0] == "2014-09-15"
    with pytest.raises(IngestError, match=r"pc.csv: row 4 of 7: unparseable Labels"):
        ingest.run(catalog, "padchest", p, strict=True)


def test_chexpert_bad_rows(catalog: Catalog, tmp_path: Path):
    from medlake.pipelines.adapters.chexpert import FINDINGS

    head = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(FINDINGS)
    blank14 = "," * 13
    p = write(tmp_path, "train.csv", f"""
{head}
C/train/patient1/study1/view1_frontal.jpg,Male,60,Frontal,PA,1.0{blank14[:-1]},-1.0
C/train/patient1/study2/view1_lateral.jpg,Female,61,Lateral,,{blank14}
C/train/patient1/study2/view1_lateral.jpg,Female,61,Lateral,,{blank14}
C/train/patient2/study1/view1_frontal.jpg,Male,60,Frontal,AP,2.0{blank14}
not-a-chexpert-path.jpg,Male,60,Frontal,AP,{blank14}
""")
    res = ingest.run(catalog, "chexpert", p)
    assert (res.rows_read, res.rows_quarantined) == (5, 3)
    why = reasons(catalog)
    assert why[("train.csv", 3)].startswith("duplicate id")
    assert why[("train.csv", 4)] == (
        "unparseable label (expected 1.0, 0.0, -1.0 or blank): No Finding=2.0")
    assert why[("train.csv", 5)].startswith("Path does not look like")
    a = dense(catalog, "chexpert:report_nlp")
    assert a.height == 28
    first = a.filter(pl.col("image_id").str.contains("study1"))
    m = dict(zip(first["finding"], first["meaning"]))
    assert m["No Finding"] == "positive" and m["Support Devices"] == "uncertain"
    assert m["Edema"] == "not_mentioned"
    im = catalog.read("images").sort("image_id")
    assert im["view"].to_list() == ["PA", "LATERAL"] and im["group_id"].n_unique() == 1


def test_vindr_bad_rows(catalog: Catalog, tmp_path: Path):
    p = write(tmp_path, "vin.csv", """
image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max
v1,No finding,14,R1,,,,
v1,Cardiomegaly,3,R2,10,10,50,40
v1,Cardiomegaly,3,R2,60,10,90,40
v1,Cardiomegaly,3,R2,60,10,90,40
v1,Aortic enlargement,3,R3,1,1,5,5
v1,Nodule/Mass,8,R3,1,1,,5
v1,Alien,99,R3,1,1,5,5
v1,Pneumothorax,12,R3,1,1,5,5
""")
    res = ingest.run(catalog, "vindr-cxr", p)
    assert (res.rows_read, res.files[0].rows_ingested, res.rows_quarantined) == (8, 4, 4)
    why = reasons(catalog)
    assert why[("vin.csv", 4)].startswith("duplicate id")
    assert why[("vin.csv", 5)].startswith("class_id does not match class_name")
    assert why[("vin.csv", 6)].startswith("finding without a valid box")
    assert why[("vin.csv", 7)] == "unknown class_name: Alien"
    a = ann(catalog, "vindr-cxr:radiologists")
    assert a.height == 3 * 15
    pos = a.filter(pl.col("value") == 1).sort("annotator")
    assert pos.select("annotator", "finding").rows() == [
        ("R1", "No finding"), ("R2", "Cardiomegaly"), ("R3", "Pneumothorax")]
    assert json.loads(pos["raw_value"][1]) == [[10, 10, 50, 40], [60, 10, 90, 40]]


def test_cli_ingest_google2019_and_errors(nih: Catalog, tmp_path: Path):
    ws = str(nih.ws.root)
    p = write(tmp_path, "g.csv", """
Image Index,Fracture,Pneumothorax,Airspace opacity,Nodule or mass,Set Id
a.png,NO,YES,NO,NO,test
zz.png,NO,NO,NO,NO,val
""")
    r = CliRunner().invoke(main, ["ingest", "google2019", str(p), "-w", ws])
    assert r.exit_code == 0, r.output
    assert "g.csv: 2 rows read = 1 ingested + 1 quarantined" in r.output
    assert "names an image that is not in dataset 'nih-cxr14'" in r.output
    r = CliRunner().invoke(main, ["ingest", "google2019", str(p), "-w", ws, "--strict"])
    assert r.exit_code == 1 and "Error: g.csv: row 2 of 2" in r.output
    r = CliRunner().invoke(main, ["ingest", "google2019", str(p), "-w", ws, "-o", "x=1"])
    assert r.exit_code == 1 and "takes no option" in r.output
    r = CliRunner().invoke(main, ["ingest", "--list"])
    for fmt in CXR:
        assert fmt in r.output
