"""Generic adapter and catalog.imageio on real image and DICOM files made in tmp_path."""

from __future__ import annotations

import csv
import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import pydicom
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from medlake.catalog import Catalog, IngestError, SchemaError, Workspace
from medlake.catalog.imageio import inspect, inspect_many, load_rgb, render_8bit, window
from medlake.cli.main import main
from medlake.pipelines import ingest

RNG = np.random.default_rng(7)
HEADER = ["image_id", "file", "lesion", "patient", "split", "sex", "age", "dx", "pneumo", "capture"]


# --- real files ------------------------------------------------------------------------------
def png(path: Path, w: int = 24, h: int = 16, mode: str = "RGB") -> Path:
    arr = RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def write_dicom(path: Path, *, phi: bool, rows: int = 20, cols: int = 30, mono1: bool = False) -> np.ndarray:
    """An uncompressed 12-bit DICOM with a window, with or without identifying tags."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality, ds.ViewPosition = "PAT-7", "DX", "PA"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", "1.2.3.4.5"
    if phi:
        ds.PatientName, ds.PatientBirthDate, ds.InstitutionName = "Doe^Jane", "19700101", "General"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 1000
    arr = RNG.integers(0, 4096, (rows, cols), dtype=np.uint16)
    ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return arr


def bomb_png(path: Path, w: int = 60_000, h: int = 60_000) -> Path:
    """A tiny PNG whose header declares a huge image (a decompression bomb)."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def good_files(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    f = {"rgb": png(root / "rgb.png"), "grey": png(root / "sub" / "grey.png", mode="L"),
         "pal": png(root / "pal.png", mode="P")}
    Image.fromarray(RNG.integers(0, 65535, (10, 12), dtype=np.uint16)).save(root / "deep.png")
    f["deep"] = root / "deep.png"
    Image.fromarray(RNG.integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(root / "photo.jpg", quality=90)
    f["jpg"] = root / "photo.jpg"
    Image.new("CMYK", (14, 9), (10, 20, 30, 40)).save(root / "cmyk.jpg")
    f["cmyk"] = root / "cmyk.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: shown 20 wide and 40 high
    Image.new("RGB", (40, 20), (200, 10, 10)).save(root / "rot.jpg", exif=exif)
    f["rot"] = root / "rot.jpg"
    write_dicom(root / "phi.dcm", phi=True)
    write_dicom(root / "clean.dcm", phi=False, mono1=True)
    f["phi"], f["clean"] = root / "phi.dcm", root / "clean.dcm"
    return f


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, HEADER)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in HEADER})
    return path


GOOD = [  # (id, file, lesion, split, dx, pneumo)
    ("a1", "rgb.png", "L1", "train", "nv", "1"), ("a2", "sub/grey.png", "L1", "test", "mel", "0"),
    ("a3", "pal.png", "L2", "train", "unknown", "no"), ("a4", "deep.png", "L3", "val", "nv", ""),
    ("a5", "photo.jpg", "L4", "train", "bcc", "yes"), ("a6", "cmyk.jpg", "L5", "train", "nv", "0"),
    ("a7", "rot.jpg", "L5", "", "nv", "1"), ("a8", "phi.dcm", "", "test", "nv", "0"),
    ("a9", "clean.dcm", "", "train", "nv", "0"),
]


def config(tmp: Path, manifest: str = "m.csv") -> Path:
    cfg = {
        "dataset": "mine", "name": "My derm", "modality": "derm", "license": "CC0-1.0",
        "citation": "me", "description": "test data", "images_root": "img", "manifest": manifest,
        "columns": {"id": "image_id", "path": "file", "group": "lesion", "patient": "patient",
                    "split": "split", "sex": "sex", "age": "age"},
        "split_scheme": "original",
        "labels": [
            {"column": "dx", "source": "clinic", "finding": "diagnosis", "kind": "non_expert",
             "value_type": "category", "unknown": ["", "unknown"], "rule": "visual"},
            {"column": "pneumo", "source": "reader", "kind": "expert", "value_type": "binary"},
        ],
        "meta_columns": ["capture"],
    }
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return tmp / "cfg.yaml"


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    files = good_files(tmp_path / "img")
    rows = [{"image_id": i, "file": f, "lesion": g, "split": s, "dx": dx, "pneumo": p, "sex": "F",
             "age": "40", "capture": f"c{n}"} for n, (i, f, g, s, dx, p) in enumerate(GOOD)]
    write_manifest(tmp_path / "m.csv", rows)
    return config(tmp_path), files


# --- imageio -----------------------------------------------------------------------------------
def test_inspect_reads_every_mode_and_hashes_the_bytes(data):
    _, f = data
    got = {k: inspect(p) for k, p in f.items()}
    assert all(i.ok for i in got.values()), {k: i.reason for k, i in got.items()}
    for k, p in f.items():
        assert got[k].sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert (got["rgb"].mode, got["grey"].mode, got["pal"].mode, got["cmyk"].mode) == ("RGB", "L", "P", "CMYK")
    assert got["deep"].mode.startswith("I") and (got["deep"].width, got["deep"].height) == (12, 10)
    assert (got["rot"].width, got["rot"].height) == (20, 40)  # EXIF orientation applied
    assert (got["phi"].width, got["phi"].height, got["phi"].mode) == (30, 20, "I;16")
    assert got["phi"].phi_tags == "PatientName,PatientBirthDate,InstitutionName"
    assert got["clean"].phi_tags == ""
    assert (got["phi"].patient_id, got["phi"].study_uid, got["phi"].series_uid) == ("PAT-7", "1.2.3.4", "1.2.3.4.5")
    assert (got["phi"].modality, got["phi"].view) == ("DX", "PA")
    assert inspect_many(list(f.values()), workers=4) == [got[k] for k in f]
    for k, p in f.items():
        rgb = load_rgb(p)
        assert rgb.mode == "RGB" and rgb.size == (got[k].width, got[k].height)


def test_inspect_names_what_is_wrong(tmp_path):
    good = png(tmp_path / "g.png", 64, 64)
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image at all\n")
    bomb_png(tmp_path / "bomb.png")
    (tmp_path / "nopix.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 8)
    write_dicom(tmp_path / "cut.dcm", phi=False, rows=64, cols=64)
    (tmp_path / "cut.dcm").write_bytes((tmp_path / "cut.dcm").read_bytes()[:-3000])
    reasons = {p.name: inspect(p).reason for p in sorted(tmp_path.iterdir())}
    assert reasons == {
        "g.png": None, "trunc.png": "truncated or corrupt image", "zero.png": "zero-byte file",
        "notes.png": "not an image", "bomb.png": "decompression bomb",
        "nopix.dcm": reasons["nopix.dcm"], "cut.dcm": reasons["cut.dcm"],
    }
    assert reasons["cut.dcm"] in ("unreadable DICOM", "undecodable DICOM pixel data")
    assert reasons["nopix.dcm"] in ("unreadable DICOM", "DICOM without pixel data")
    assert inspect(good, max_pixels=100).reason == "decompression bomb"
    assert inspect(tmp_path / "absent.png").reason == "missing file"


def test_dicom_window_matches_pydicom(tmp_path):
    arr = write_dicom(tmp_path / "w.dcm", phi=False)
    ds = pydicom.dcmread(tmp_path / "w.dcm")
    from pydicom.pixels import apply_windowing

    ref = apply_windowing(ds.pixel_array.astype(np.float64), ds)  # float in 0..4095
    ref8 = np.rint(ref / (2**12 - 1) * 255)
    mine = np.asarray(render_8bit(tmp_path / "w.dcm"), dtype=np.float64)
    assert mine.shape == arr.shape
    assert np.abs(mine - ref8).max() <= 1
    assert window(np.array([0.0, 2048.0, 4095.0]), 2048, 1000).tolist() == [0, 128, 255]
    write_dicom(tmp_path / "m1.dcm", phi=False, mono1=True)
    inv = np.asarray(render_8bit(tmp_path / "m1.dcm"), dtype=np.float64)
    m1 = apply_windowing(pydicom.dcmread(tmp_path / "m1.dcm").pixel_array.astype(np.float64), ds)
    assert np.abs(inv - (255 - np.rint(m1 / 4095 * 255))).max() <= 1


# --- YAML-configured ingest --------------------------------------------------------------------
def test_yaml_ingest_records_images_labels_splits(catalog: Catalog, data):
    cfg, f = data
    res = ingest.run(catalog, "generic", cfg)
    assert (res.rows_read, res.rows_quarantined) == (9, 0)
    im = {r["native_id"]: r for r in catalog.read("images").to_dicts()}
    assert sorted(im) == [g[0] for g in GOOD]
    assert im["a2"]["path"] == "sub/grey.png" and im["a2"]["group_id"] == "mine:L1"
    assert im["a1"]["sha256"] == hashlib.sha256(f["rgb"].read_bytes()).hexdigest()
    assert (im["a7"]["width"], im["a7"]["height"]) == (20, 40)
    assert im["a6"]["mode"] == "CMYK" and im["a3"]["mode"] == "P"
    assert im["a8"]["phi_tags"] == "PatientName,PatientBirthDate,InstitutionName"
    assert im["a9"]["phi_tags"] == "" and im["a1"]["phi_tags"] is None
    assert (im["a8"]["patient_id"], im["a8"]["group_id"], im["a8"]["study_id"]) == ("PAT-7", "mine:PAT-7", "1.2.3.4")
    assert im["a8"]["modality"] == "DX" and im["a1"]["modality"] == "derm"
    assert im["a1"]["meta"] == '{"capture":"c0"}' and im["a1"]["age"] == 40.0
    ann = {(r["image_id"], r["source_id"]): r for r in catalog.read("annotations").to_dicts()}
    assert ann[("mine:a1", "mine:clinic")]["category"] == "nv"
    assert ann[("mine:a3", "mine:clinic")]["meaning"] == "unknown"
    assert ann[("mine:a3", "mine:clinic")]["category"] is None
    assert ann[("mine:a5", "mine:reader")]["value"] == 1.0 and ann[("mine:a3", "mine:reader")]["value"] == 0.0
    assert ("mine:a4", "mine:reader") not in ann  # blank cell: not judged
    cov = catalog.read("coverage")
    assert cov.filter(pl.col("source_id") == "mine:reader").height == 8
    assert cov.filter(pl.col("source_id") == "mine:clinic").height == 9
    src = {r["source_id"]: r for r in catalog.read("sources").to_dicts()}
    assert src["mine:reader"]["kind"] == "expert" and src["mine:reader"]["value_type"] == "binary"
    assert catalog.read("splits").height == 8  # a7 has no split
    v = catalog.read("versions").row(0, named=True)
    assert v["name"] == "mine@original" and v["n_images"] == 8
    ds = catalog.read("datasets").row(0, named=True)
    assert ds["images_root"] == "../img" and ds["name"] == "My derm"
    assert any("identifying tags" in m for m in res.messages)


def test_same_input_gives_byte_identical_tables(catalog: Catalog, data, tmp_path):
    cfg, _ = data
    ingest.run(catalog, "generic", cfg)
    first = {p: p.read_bytes() for p in sorted(catalog.ws.tables_dir.rglob("*.parquet"))}
    with open(tmp_path / "m.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    write_manifest(tmp_path / "m.csv", rows[::-1])  # order of the manifest must not matter
    ingest.run(catalog, "generic", cfg)
    second = {p: p.read_bytes() for p in sorted(catalog.ws.tables_dir.rglob("*.parquet"))}
    assert first.keys() == second.keys() and all(first[k] == second[k] for k in first if "versions" not in str(k))
    pl.DataFrame(rows).write_parquet(tmp_path / "m.parquet")
    config(tmp_path, "m.parquet")
    ingest.run(catalog, "generic", cfg)
    images_file = next(k for k in first if "/images/" in str(k))
    assert images_file.read_bytes() == first[images_file]  # Parquet manifest = CSV manifest


# --- bad input -----------------------------------------------------------------------------------
@pytest.fixture
def bad(tmp_path: Path, data) -> Path:
    root = tmp_path / "img"
    good = png(root / "ok.png", 64, 64)
    (root / "trunc.png").write_bytes(good.read_bytes()[:300])
    (root / "zero.png").write_bytes(b"")
    (root / "readme.png").write_text("hello")
    bomb_png(root / "bomb.png")
    png(tmp_path / "outside.png")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    rows = [("b1", "ok.png", "0", "30"), ("b2", "trunc.png", "0", "30"), ("b3", "zero.png", "0", "30"),
            ("b4", "readme.png", "0", "30"), ("b5", "bomb.png", "0", "30"), ("b6", "../outside.png", "0", "30"),
            ("b7", "link.png", "0", "30"), ("b8", str(tmp_path / "outside.png"), "0", "30"),
            ("b9", "gone.png", "0", "30"), ("b1", "ok.png", "1", "30"), ("b10", "ok.png", "maybe", "30"),
            ("b11", "ok.png", "1", "old"), ("", "ok.png", "1", "30"), ("b12", "", "1", "30")]
    write_manifest(tmp_path / "m.csv", [{"image_id": i, "file": f, "pneumo": p, "age": a, "dx": "nv"}
                                        for i, f, p, a in rows])
    return tmp_path / "cfg.yaml"


EXPECTED_BAD = {
    2: "truncated or corrupt image", 3: "zero-byte file", 4: "not an image", 5: "decompression bomb",
    6: "path resolves outside the images root", 7: "path resolves outside the images root",
    8: "absolute path (paths must be relative to the images root)",
    9: "missing file (not found under the images root)", 10: "duplicate id (first occurrence kept): b1",
    11: "unparseable binary value in pneumo: maybe", 12: "unparseable age (age): old", 13: "empty id",
    14: "empty path",
}


def test_every_bad_row_is_quarantined_with_its_reason(catalog: Catalog, bad):
    res = ingest.run(catalog, "generic", bad)
    assert (res.rows_read, res.files[0].rows_ingested, res.rows_quarantined) == (14, 1, 13)
    q = catalog.read("quarantine")
    assert dict(zip(q["row"].to_list(), q["reason"].to_list())) == EXPECTED_BAD
    assert set(q["stage"]) == {"ingest"} and set(q["file"]) == {"m.csv"}
    assert catalog.read("images")["native_id"].to_list() == ["b1"]
    assert "13 quarantined" in res.summary() and "decompression bomb" in res.summary()


def test_strict_names_the_first_bad_row_and_writes_nothing(catalog: Catalog, bad):
    with pytest.raises(IngestError, match=r"m.csv: row 2 of 14: truncated or corrupt image \(trunc.png\); 13 bad rows"):
        ingest.run(catalog, "generic", bad, strict=True)
    assert not catalog.tables.exists("images")


def test_missing_manifest_column_is_a_schema_error(catalog: Catalog, data, tmp_path):
    cfg, _ = data
    text = cfg.read_text().replace("lesion", "lesion_id")
    cfg.write_text(text)
    with pytest.raises(SchemaError) as e:
        ingest.run(catalog, "generic", cfg)
    msg = str(e.value)
    assert "m.csv" in msg and "['lesion_id']" in msg and "Found columns" in msg and "'lesion'" in msg
    cfg.write_text(text.replace("kind: expert", "kind: guru"))
    with pytest.raises(SchemaError, match="kind 'guru' is not one of"):
        ingest.run(catalog, "generic", cfg)


# --- flags-configured ingest through the CLI ------------------------------------------------------
def test_flags_configured_ingest_via_cli(catalog: Catalog, data, tmp_path):
    runner = CliRunner()
    # a folder outside the workspace cannot become a pipeline input: a clear error
    r = runner.invoke(main, ["ingest", "generic", str(tmp_path / "img"), "--dataset", "flagged",
                             "-w", str(catalog.ws.root), "-o", "manifest=../m.csv", "-o", "id=image_id"])
    assert r.exit_code == 1 and "outside the workspace" in r.output and "data/" in r.output
    import shutil

    shutil.copytree(tmp_path / "img", catalog.ws.root / "data/ext/img")
    shutil.copy(tmp_path / "m.csv", catalog.ws.root / "data/ext/m.csv")
    args = ["ingest", "generic", str(catalog.ws.root / "data/ext/img"), "--dataset", "flagged",
            "-w", str(catalog.ws.root),
            "-o", "manifest=../m.csv", "-o", "id=image_id", "-o", "path=file", "-o", "group=lesion",
            "-o", "split=split", "-o", "label=dx:non_expert:category:clinic:diagnosis",
            "-o", "label=pneumo:expert:binary", "-o", "unknown=unknown", "-o", "meta=capture"]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "m.csv: 9 rows read = 9 ingested + 0 quarantined" in r.output
    src = sorted(catalog.read("sources")["source_id"].to_list())
    assert src == ["flagged:clinic", "flagged:pneumo"]
    im = catalog.read("images")
    assert im.height == 9 and set(im["dataset_id"]) == {"flagged"}
    assert catalog.read("datasets")["images_root"].to_list() == ["data/ext/img"]
    entry = catalog.ws.params()["ingest"][-1]  # recorded for 'dvc repro'
    assert entry["path"] == "data/ext/img" and entry["dataset"] == "flagged"
    assert entry["options"]["label"] == ["dx:non_expert:category:clinic:diagnosis",
                                         "pneumo:expert:binary"]
    r = runner.invoke(main, [*args[:7], "-o", "manifest=../m.csv", "-o", "id=image_id", "-o", "colour=red"])
    assert r.exit_code == 1 and "unknown option 'colour'" in r.output
    r = runner.invoke(main, ["ingest", "generic", str(catalog.ws.root / "data/ext/img"),
                             "-w", str(catalog.ws.root), "-o", "manifest=../m.csv", "-o", "id=image_id"])
    assert r.exit_code == 1 and "--dataset" in r.output
    # a manifest given relative to the wrong folder: the message says where it looked
    r = runner.invoke(main, [*args[:7], "-o", "manifest=data/ext/m.csv", "-o", "id=image_id"])
    assert r.exit_code == 1 and "m.csv: manifest not found (looked for " in r.output
    assert "data/ext/img/data/ext/m.csv" in r.output and "from the image folder" in r.output


# --- invariant: rows read = ingested + quarantined, against an independent model ---------------
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["", "k1", "k2", "k3", "k4", "k5"]),
                          st.sampled_from(["", "40", "12.5", "old"]),
                          st.sampled_from(["", "1", "0", "yes", "unknown", "maybe"])),
                min_size=1, max_size=12))
def test_rows_in_equal_rows_out_plus_quarantined(tmp_path_factory, rows):
    tmp = tmp_path_factory.mktemp("inv")
    (tmp / ".dvc").mkdir()
    cat = Catalog(Workspace(tmp))
    (tmp / "m.csv").write_text("id,age,pos\n" + "".join(f"{i},{a},{p}\n" for i, a, p in rows))
    opts = {"manifest": "m.csv", "id": "id", "age": "age", "label": "pos:expert:binary", "unknown": "unknown"}
    res = ingest.run(cat, "generic", tmp, dataset_id="inv", **opts)
    seen, want, judged = set(), [], 0
    for i, a, p in rows:
        first = i and i not in seen
        seen.add(i)
        if first and a != "old" and p != "maybe":
            want.append(i)
            judged += p != ""  # a blank cell: not judged, no annotation row
    assert res.rows_read == len(rows) == res.files[0].rows_ingested + res.rows_quarantined
    assert sorted(cat.read("images")["native_id"].to_list()) == sorted(want)
    assert cat.read("quarantine").height == len(rows) - len(want)
    assert cat.read("annotations").height == judged
    before = {p: p.read_bytes() for p in sorted(cat.ws.tables_dir.rglob("*.parquet"))}
    ingest.run(cat, "generic", tmp, dataset_id="inv", **opts)
    assert {p: p.read_bytes() for p in sorted(cat.ws.tables_dir.rglob("*.parquet"))} == before
