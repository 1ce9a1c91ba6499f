"""DICOM as users have it: pydicom's whole test corpus through the generic adapter, plus
focused checks of photometric handling, rescale, windowing, preamble-less files, malformed
values, the multi-frame policy and the fingerprint stage on compressed DICOM.

The corpus battery uses the files bundled with pydicom (``test_files`` and ``charset_files``)
and those of pydicom's download-only files already in its cache; set
``MEDLAKE_FETCH_PYDICOM_DATA=1`` to download the rest first (needs network).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pydicom
import pytest
import yaml
from PIL import Image
from pydicom.data import data_manager
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from medlake.catalog import Catalog, CatalogError, Workspace, dicom
from medlake.catalog.imageio import inspect, load_rgb, open_image, render_8bit
from medlake.pipelines import fingerprint, ingest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns on its odd files

NOT_DICOM_SUFFIXES = {".txt", ".json", ".dump", ".gz", ".icc"}
REASONS = {"not an image", "unreadable DICOM", "DICOM without pixel data", "undecodable DICOM pixel data"}
# transfer syntaxes the installed plugins must decode (all present in pydicom's bundled files)
MUST_DECODE = {
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5",
}


# --- pydicom's corpus --------------------------------------------------------------------------
def pydicom_corpus() -> tuple[list[tuple[str, Path]], list[str]]:
    """``([(name, file)], [download-only names not available])`` of pydicom's test data.

    Equivalent to ``get_testdata_files() + get_charset_files()`` without their network
    access: the bundled folders, plus the download-only files already in pydicom's cache
    (all of them after ``fetch_data_files()`` when MEDLAKE_FETCH_PYDICOM_DATA=1).
    """
    root = Path(data_manager.DATA_ROOT)
    if os.environ.get("MEDLAKE_FETCH_PYDICOM_DATA") == "1":
        pydicom.data.fetch_data_files()
    out = [(str(p.relative_to(root)), p) for sub in ("test_files", "charset_files")
           for p in sorted((root / sub).rglob("*")) if p.is_file() and p.suffix != ".py"]
    cache = Path(data_manager.get_data_dir())
    missing = []
    for name in sorted(data_manager.get_url_map()):
        f = cache / name
        if f.is_file() and data_manager._check_data_hash(f):
            out.append((f"download/{name}", f))
        else:
            missing.append(name)
    return out, missing


def pydicom_view(p: Path) -> dict[str, object]:
    """What pydicom itself makes of a file (the independent model for the battery)."""
    try:
        ds = pydicom.dcmread(p, force=True)
    except Exception:  # noqa: BLE001 - the model only needs to know that pydicom failed
        return {"read": False, "pixels": False, "decodes": False}
    marked = p.read_bytes()[128:132] == b"DICM"
    if not marked and not any(pydicom.datadict.dictionary_has_tag(e.tag) for e in ds):
        return {"read": False, "pixels": False, "decodes": False}  # forced parse of non-DICOM bytes
    pixels = any(k in ds for k in dicom.PIXEL_KEYWORDS)
    try:
        arr = ds.pixel_array
        decodes, shape = True, arr.shape
    except Exception:  # noqa: BLE001 - idem
        decodes, shape = False, None
    return {"read": True, "pixels": pixels, "decodes": decodes, "shape": shape, "ds": ds}


def manifest(root: Path, paths: dict[str, str], dataset: str = "pyd") -> Path:
    """A generic-adapter YAML + CSV naming ``{id: relative path}`` under ``root/img``."""
    with open(root / "m.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "file"])
        w.writerows(sorted(paths.items()))
    cfg = {"dataset": dataset, "name": dataset, "modality": "mixed", "images_root": "img",
           "manifest": "m.csv", "columns": {"id": "image_id", "path": "file"}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root / "cfg.yaml"


def new_catalog(root: Path) -> Catalog:
    ws = root / "ws"
    (ws / ".dvc").mkdir(parents=True)
    return Catalog(Workspace(ws.resolve()))


@pytest.fixture(scope="module")
def battery(tmp_path_factory: pytest.TempPathFactory):
    files, missing = pydicom_corpus()
    root = tmp_path_factory.mktemp("corpus")
    ids: dict[str, str] = {}
    src: dict[str, Path] = {}
    for n, (name, f) in enumerate(files):
        rel = name
        (root / "img" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, root / "img" / rel)
        ids[f"f{n:04d}"] = rel
        src[f"f{n:04d}"] = f
    cat = new_catalog(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ingest.run(cat, "generic", manifest(root, ids))
    return cat, res, ids, src, missing


def test_corpus_every_file_is_ingested_or_quarantined_with_its_reason(battery):
    cat, res, ids, src, _ = battery
    images = {r["native_id"]: r for r in cat.read("images").to_dicts()}
    q = {r["item"]: r for r in cat.read("quarantine").to_dicts()}
    # rows in = ingested + quarantined, and every file is exactly one of the two
    assert res.rows_read == len(ids) == res.files[0].rows_ingested + res.rows_quarantined
    assert len(images) == res.files[0].rows_ingested and len(q) == res.rows_quarantined
    by_path = {v: k for k, v in ids.items()}
    assert {by_path[item] for item in q} | set(images) == set(ids)
    assert not ({by_path[item] for item in q} & set(images))
    for item, row in q.items():
        r = row["reason"]
        assert r in REASONS or r.startswith("malformed DICOM value "), (item, r)
    decodable = 0
    for native, rel in ids.items():
        p = src[native]
        view = pydicom_view(p)
        reason = q[rel]["reason"] if rel in q else None
        if p.suffix in NOT_DICOM_SUFFIXES or p.name.startswith("README") or p.name == "FileInfo.txt":
            assert reason == "not an image", (rel, reason)
            continue
        if view["decodes"]:  # whatever pydicom decodes with the installed plugins is ingested
            decodable += 1
            assert native in images, (rel, reason, q.get(rel, {}).get("detail"))
            row = images[native]
            ds = view["ds"]
            assert (row["height"], row["width"]) == (int(ds.Rows), int(ds.Columns)), rel
            meta = json.loads(row["meta"])["dicom"]
            assert meta["frames"] == max(int(ds.get("NumberOfFrames", 1) or 1), 1)
            assert meta["frame"] == 0 and meta["frame_policy"] == "first"
        elif view["read"] and not view["pixels"]:
            assert reason == "DICOM without pixel data", (rel, reason)
        elif native not in images:
            assert reason in ("unreadable DICOM", "undecodable DICOM pixel data") or reason.startswith(
                "malformed DICOM value "), (rel, reason)
    assert decodable >= 50  # pydicom 3.0 bundles 100 such files: the check is not vacuous


def test_corpus_known_files(battery):
    cat, *_ = battery
    q = {Path(r["item"]).name: r for r in cat.read("quarantine").to_dicts()}
    images = {Path(r["path"]).name: r for r in cat.read("images").to_dicts()}
    assert q["badVR.dcm"]["reason"] == "malformed DICOM value NumberOfFrames='1A'"
    assert q["MR_truncated.dcm"]["reason"] == "undecodable DICOM pixel data"
    assert "less than expected" in q["MR_truncated.dcm"]["detail"]
    assert q["JPEG2000-embedded-sequence-delimiter.dcm"]["reason"] == "undecodable DICOM pixel data"
    assert q["no_meta.dcm"]["reason"] == "unreadable DICOM"  # a stray byte before the first element
    assert q["test-SR.dcm"]["reason"] == "DICOM without pixel data"
    assert q["zipMR.gz"]["reason"] == "not an image"
    # preamble-less datasets are read (these have no pixels, so they are named for that)
    assert q["ExplVR_BigEndNoMeta.dcm"]["reason"] == "DICOM without pixel data"
    assert q["rtstruct.dcm"]["reason"] == "DICOM without pixel data"
    # every standard still-image transfer syntax in the corpus was decoded
    syntaxes = {json.loads(r["meta"])["dicom"]["transfer_syntax"] for r in images.values()}
    assert MUST_DECODE <= syntaxes
    # 12-bit JPEG Extended (GDCM's own reader; pydicom's plugins refuse it)
    assert "JPGExtended.dcm" in images and images["JPGExtended.dcm"]["mode"] == "I;16"
    assert images["examples_ybr_color.dcm"]["mode"] == "RGB"
    assert json.loads(images["examples_ybr_color.dcm"]["meta"])["dicom"]["frames"] == 30
    assert images["examples_palette.dcm"]["mode"] == "RGB"


def test_download_only_pydicom_files(battery):
    *_, missing = battery
    if missing:
        pytest.skip(f"{len(missing)} of pydicom's download-only test files are not cached "
                    "(pydicom.data.fetch_data_files needs network; MEDLAKE_FETCH_PYDICOM_DATA=1 fetches them)")


def test_12bit_jpeg_extended_matches_pydicom_reference():
    data = Path(pydicom.data.get_testdata_file("JPGExtended.dcm")).read_bytes()
    img = dicom.decode(data, max_pixels=10**8)
    assert img.pixels.shape == (1024, 256) and img.pixels.dtype == np.uint16
    assert (img.pixels[420, 140], img.pixels[230, 120]) == (244, 95)  # pydicom's reference values


# --- focused: files built here ---------------------------------------------------------------
def make_ds(arr: np.ndarray, *, photometric: str = "MONOCHROME2", bits: int = 12, signed: bool = False,
            **tags: object) -> Dataset:
    """An uncompressed Secondary Capture dataset holding ``arr`` (frames, rows, cols[, 3])."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "OT", "P1"
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2") and arr.shape[-1] == 3
    ds.Rows, ds.Columns = arr.shape[-3:-1] if colour else arr.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    alloc = 8 if bits <= 8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = alloc, bits, bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    frames = arr.shape[0] if arr.ndim == (4 if colour else 3) else 1
    if frames > 1:
        ds.NumberOfFrames = frames
    for k, v in tags.items():
        setattr(ds, k, v)
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[(alloc, signed)]
    ds.PixelData = np.ascontiguousarray(arr, dtype=dtype).tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def grey(h: int = 16, w: int = 24, top: int = 4095, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, top + 1, (h, w)).astype(np.uint16)


def test_monochrome1_is_inverted(tmp_path):
    arr = grey()
    m2 = np.asarray(render_8bit(save(make_ds(arr), tmp_path / "m2.dcm")), dtype=int)
    m1 = np.asarray(render_8bit(save(make_ds(arr, photometric="MONOCHROME1"), tmp_path / "m1.dcm")), dtype=int)
    assert m2.min() == 0 and m2.max() == 255  # no window: the value range
    assert (m1 == 255 - m2).all()
    # with a window too: inverted after windowing
    kw = {"WindowCenter": 1500, "WindowWidth": 800}
    w2 = np.asarray(render_8bit(save(make_ds(arr, **kw), tmp_path / "w2.dcm")), dtype=int)
    w1 = np.asarray(render_8bit(save(make_ds(arr, photometric="MONOCHROME1", **kw), tmp_path / "w1.dcm")), dtype=int)
    assert (w1 == 255 - w2).all() and (w2 == 0).any() and (w2 == 255).any()
    assert json.loads(inspect(tmp_path / "w1.dcm").dicom_meta)["photometric"] == "MONOCHROME1"


def hand_window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) straight from the standard, to 0..255."""
    y = np.where(x <= c - 0.5 - (w - 1) / 2, 0.0,
                 np.where(x > c - 0.5 + (w - 1) / 2, 255.0, ((x - (c - 0.5)) / (w - 1) + 0.5) * 255))
    return np.rint(y).astype(int)


def test_rescale_slope_intercept_then_window(tmp_path):
    stored = (grey(top=2047) * 2).astype(np.uint16)  # even values: halves are exact
    c, w = 40.0, 400.0  # a CT soft-tissue window in Hounsfield units
    a = save(make_ds(stored, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=c, WindowWidth=w), tmp_path / "a.dcm")
    b = save(make_ds(stored // 2, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=c, WindowWidth=w), tmp_path / "b.dcm")
    ra, rb = (np.asarray(render_8bit(p), dtype=int) for p in (a, b))
    assert (ra == hand_window(stored.astype(float) - 1024, c, w)).all()
    assert (ra == rb).all()
    # without the rescale the same window would see raw values: a different picture
    raw = save(make_ds(stored, WindowCenter=c, WindowWidth=w), tmp_path / "raw.dcm")
    assert not (np.asarray(render_8bit(raw), dtype=int) == ra).all()


def test_windowing_first_window_functions_and_voi_lut(tmp_path):
    arr = grey()
    multi = save(make_ds(arr, WindowCenter=[2048, 1000], WindowWidth=[1000, 200]), tmp_path / "multi.dcm")
    assert (np.asarray(render_8bit(multi), dtype=int) == hand_window(arr.astype(float), 2048, 1000)).all()
    # SIGMOID and LINEAR_EXACT follow pydicom's apply_windowing, scaled from 0..4095
    from pydicom.pixels import apply_windowing

    for func in ("SIGMOID", "LINEAR_EXACT"):
        ds = make_ds(arr, WindowCenter=2048, WindowWidth=1000, VOILUTFunction=func)
        ref = np.rint(apply_windowing(arr.astype(float), ds) / 4095 * 255)
        mine = np.asarray(render_8bit(save(ds, tmp_path / f"{func}.dcm")), dtype=float)
        assert np.abs(mine - ref).max() <= 1, func
    # a VOI LUT sequence wins over the window (as pydicom's apply_voi_lut prefers it)
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.add_new("LUTData", "US", [min(v * 16, 65535) for v in range(4096)][::-1])  # an inverting LUT
    ds = make_ds(arr, WindowCenter=2048, WindowWidth=1000)
    ds.VOILUTSequence = [lut]
    out = np.asarray(render_8bit(save(ds, tmp_path / "lut.dcm")), dtype=int)
    lut_vals = np.asarray(lut.LUTData, dtype=float)
    expect = np.rint((lut_vals[arr] - lut_vals.min()) / (lut_vals.max() - lut_vals.min()) * 255)
    assert np.abs(out - expect).max() <= 1
    # an unusable window (width 0) falls back to the value range instead of failing
    zero = save(make_ds(arr, WindowCenter=2048, WindowWidth=0), tmp_path / "zero.dcm")
    assert inspect(zero).ok and np.asarray(render_8bit(zero)).max() == 255


def test_ybr_full_becomes_rgb(tmp_path):
    from pydicom.pixels import convert_color_space

    rgb = np.random.default_rng(5).integers(0, 256, (12, 20, 3)).astype(np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    p = save(make_ds(ybr, photometric="YBR_FULL", bits=8), tmp_path / "ybr.dcm")
    info = inspect(p)
    assert info.ok and info.mode == "RGB" and (info.width, info.height) == (20, 12)
    assert np.abs(np.asarray(load_rgb(p), dtype=int) - rgb).max() <= 3


def test_file_without_preamble(tmp_path):
    arr = grey()
    ds = make_ds(arr, WindowCenter=2048, WindowWidth=1000)
    full = save(ds, tmp_path / "full.dcm")
    img = tmp_path / "img"
    img.mkdir()
    # 1. the file meta group is there, the 128-byte preamble and 'DICM' are not
    (img / "nopre.dcm").write_bytes(full.read_bytes()[132:])
    # 2. a bare dataset (no file meta at all), implicit VR, under a name without extension
    bare = Dataset()
    bare.update(ds)
    bare.save_as(img / "bare", implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert (img / "bare").read_bytes()[128:132] != b"DICM"
    # 3. not DICOM: text named .dcm, and a PNG named .dcm (read by its content)
    (img / "notes.dcm").write_text('{"0008": "this is JSON, not DICOM"}\n' * 10)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(img / "png.dcm", format="PNG")
    cat = new_catalog(tmp_path)
    res = ingest.run(cat, "generic", manifest(tmp_path, {"n": "nopre.dcm", "b": "bare", "t": "notes.dcm",
                                                         "p": "png.dcm"}))
    assert (res.rows_read, res.rows_quarantined) == (4, 1)
    q = cat.read("quarantine").to_dicts()
    assert [(r["item"], r["reason"]) for r in q] == [("notes.dcm", "unreadable DICOM")]
    im = {r["native_id"]: r for r in cat.read("images").to_dicts()}
    want = np.asarray(render_8bit(full))
    for k in ("n", "b"):
        assert (im[k]["width"], im[k]["height"], im[k]["mode"]) == (24, 16, "I;16")
        assert (np.asarray(render_8bit(img / im[k]["path"])) == want).all()
    assert json.loads(im["b"]["meta"])["dicom"]["transfer_syntax_guessed"] is True
    assert im["p"]["mode"] == "L" and im["p"]["meta"] is None
    assert inspect(img / "notes.dcm").detail.startswith("named like DICOM")


def test_malformed_value_is_a_quarantine_row_and_the_ingest_goes_on(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    arr = grey()
    save(make_ds(arr), img / "good.dcm")
    raw = save(make_ds(np.stack([arr, arr])), tmp_path / "two.dcm").read_bytes()
    elem = b"\x28\x00\x08\x00IS\x02\x002 "  # (0028,0008) NumberOfFrames IS '2 '
    assert raw.count(elem) == 1
    (img / "badframes.dcm").write_bytes(raw.replace(elem, elem[:-2] + b"1A"))
    raw = save(make_ds(arr, WindowCenter="2048", WindowWidth="1000"), tmp_path / "w.dcm").read_bytes()
    elem = b"\x28\x00\x51\x10DS\x04\x001000"  # (0028,1051) WindowWidth DS '1000'
    assert raw.count(elem) == 1
    (img / "badwidth.dcm").write_bytes(raw.replace(elem, elem[:-4] + b"wide"))
    cat = new_catalog(tmp_path)
    res = ingest.run(cat, "generic", manifest(tmp_path, {"g": "good.dcm", "f": "badframes.dcm", "w": "badwidth.dcm"}))
    assert (res.rows_read, res.files[0].rows_ingested, res.rows_quarantined) == (3, 1, 2)
    reasons = {r["item"]: r["reason"] for r in cat.read("quarantine").to_dicts()}
    assert reasons == {"badframes.dcm": "malformed DICOM value NumberOfFrames='1A'",
                       "badwidth.dcm": "malformed DICOM value WindowWidth='wide'"}
    # the other readers name it the same way instead of raising something else
    from medlake.catalog.imageio import ImageReadError

    for fn in (load_rgb, render_8bit, open_image):
        with pytest.raises(ImageReadError, match=r"malformed DICOM value NumberOfFrames='1A'"):
            fn(img / "badframes.dcm")


def test_multi_frame_policy(tmp_path, monkeypatch):
    frames = np.stack([np.full((8, 10), v, np.uint16) for v in (0, 1000, 2000, 3000)])
    frames[:, 0, 0] = 4095  # each frame spans 0..4095 somewhere, so value 'v' renders distinctly
    frames[:, 0, 1] = 0
    p = save(make_ds(frames), tmp_path / "cine.dcm")
    monkeypatch.delenv(dicom.FRAME_ENV, raising=False)
    expect = {k: int(np.rint(v / 4095 * 255)) for k, v in zip(range(4), (0, 1000, 2000, 3000), strict=True)}
    info = inspect(p)
    assert json.loads(info.dicom_meta) == {"frames": 4, "frame": 0, "frame_policy": "first",
                                              "transfer_syntax": ExplicitVRLittleEndian, "photometric": "MONOCHROME2"}
    assert np.asarray(render_8bit(p))[4, 4] == expect[0]
    for policy, index in (("middle", 1), ("last", 3), ("2", 2), ("9", 3)):
        monkeypatch.setenv(dicom.FRAME_ENV, policy)
        meta = json.loads(inspect(p).dicom_meta)
        assert (meta["frame"], meta["frame_policy"]) == (index, policy)
        assert np.asarray(render_8bit(p))[4, 4] == expect[index]
    monkeypatch.setenv(dicom.FRAME_ENV, "brightest")
    with pytest.raises(CatalogError, match="frame policy"):
        inspect(p)
    monkeypatch.delenv(dicom.FRAME_ENV)
    assert dicom.decode(p.read_bytes(), max_pixels=10**6, frame="last").frame == 3
    # the policy and the frame are kept in the image row, next to the manifest's meta columns
    (tmp_path / "img").mkdir()
    shutil.copy(p, tmp_path / "img" / "cine.dcm")
    cat = new_catalog(tmp_path)
    ingest.run(cat, "generic", manifest(tmp_path, {"c": "cine.dcm"}))
    meta = json.loads(cat.read("images")["meta"][0])
    assert meta["dicom"]["frames"] == 4 and meta["dicom"]["frame"] == 0


def test_fingerprint_reads_compressed_dicom(tmp_path):
    names = ["MR_small_jp2klossless.dcm", "693_J2KI.dcm", "examples_jpeg2k.dcm", "SC_rgb_jpeg_gdcm.dcm",
             "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "JPGExtended.dcm"]
    root = (tmp_path / "ws").resolve()
    (root / ".dvc").mkdir(parents=True)
    (root / "imgs").mkdir()
    for n in names:
        shutil.copy(pydicom.data.get_testdata_file(n), root / "imgs" / n)
    cat = Catalog(Workspace(root))
    with cat.transaction() as tx:
        tx.write("datasets", [{"dataset_id": "d", "name": "d", "modality": "mr", "images_root": "imgs"}],
                 stage="ingest", partition="d")
        tx.write("images", [{"image_id": f"d:{n}", "dataset_id": "d", "native_id": n, "path": n} for n in names],
                 stage="ingest", partition="d")
    fingerprint.run(cat)
    q = cat.read("quarantine")
    q = q.filter(pl.col("stage") == "fingerprint") if q.height else q
    assert q.height == 0, q.to_dicts()
    fp = {r["image_id"]: r for r in cat.read("fingerprints").to_dicts()}
    assert set(fp) == {f"d:{n}" for n in names}
    for n in names:
        info = inspect(root / "imgs" / n)
        r = fp[f"d:{n}"]
        assert (r["width"], r["height"], r["format"]) == (info.width, info.height, "DICOM"), n
        assert r["mode"] == ("RGB" if info.mode == "RGB" else "L")
    assert fp["d:MR_small_jp2klossless.dcm"]["phash"] != fp["d:examples_jpeg2k.dcm"]["phash"]


def test_enhanced_functional_groups_give_the_frame_its_rescale_and_window(tmp_path, monkeypatch):
    arr = grey()
    ds = make_ds(np.stack([arr, arr]))
    per = []
    for intercept in (0, -1000):
        pvt, voi, item = Dataset(), Dataset(), Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 1, intercept, "US"
        voi.WindowCenter, voi.WindowWidth = 2048 + intercept, 1000
        item.PixelValueTransformationSequence, item.FrameVOILUTSequence = [pvt], [voi]
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = per
    p = save(ds, tmp_path / "enh.dcm")
    want = hand_window(arr.astype(float), 2048, 1000)  # each frame's window follows its rescale
    monkeypatch.delenv(dicom.FRAME_ENV, raising=False)
    assert (np.asarray(render_8bit(p), dtype=int) == want).all()
    monkeypatch.setenv(dicom.FRAME_ENV, "last")
    assert (np.asarray(render_8bit(p), dtype=int) == want).all()


def test_a_broken_lookup_table_is_quarantined_not_raised(tmp_path):
    ds = make_ds(grey())
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]  # and no LUTData
    ds.ModalityLUTSequence = [lut]
    p = save(ds, tmp_path / "lut.dcm")
    info = inspect(p)
    assert info.reason == "undecodable DICOM pixel data" and info.detail.startswith("rendering:")
    from medlake.catalog.imageio import ImageReadError

    with pytest.raises(ImageReadError, match="undecodable DICOM pixel data"):
        load_rgb(p)
