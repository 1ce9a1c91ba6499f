"""A new user's workspace as a DVC data registry (issue #12): real git, real DVC, a local
directory remote, no mocks. HAM10000 + the DermaMNIST split from ../shared/data, the HAM10000
correction recipe, the generated pipeline, ``medlake publish``; a consumer without medlake
pulls and imports the version. And the privacy gate before publishing."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import yaml
from test_dvc_e2e import bare_dvc, git_user, medlake
from versions_helpers import sh, tree_digest

from medlake.catalog.versions import load_version

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
HAM = SHARED / "ham10000" / "HAM10000_metadata.csv"
SPLIT = SHARED / "dermamnist" / "dermamnist_split_info.csv"
V = "lake/versions/ham10000-corrected"


@pytest.mark.skipif(not (HAM.is_file() and SPLIT.is_file()),
                    reason="../shared/data with HAM10000 and the DermaMNIST split is absent")
def test_new_user_publishes_ham10000_corrected_and_a_consumer_pulls_it(tmp_path) -> None:
    medlake("init", "ws", "--remote", str(tmp_path / "remote"), cwd=tmp_path)
    ws = tmp_path / "ws"
    git_user(ws)
    # a real_data root that resolves from this workspace (the recipe's pair list is 'real:')
    params = ws / "params.yaml"
    params.write_text(params.read_text().replace("real_data: ../shared/data",
                                                 f"real_data: {SHARED}"))
    medlake("ingest", "ham10000", str(HAM), cwd=ws)
    medlake("ingest", "dermamnist", str(SPLIT), cwd=ws)
    shutil.copy(REPO / "recipes/ham10000-corrected.yaml", ws / "recipes/")
    out = medlake("materialize", "ham10000-corrected", cwd=ws)
    assert "train 8,215, val 573, test 1,227" in out
    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    assert "materialize" in stages and "ingest" in stages
    assert yaml.safe_load(params.read_text())["ingest"] == [
        {"format": "ham10000", "path": "real:ham10000/HAM10000_metadata.csv"},
        {"format": "dermamnist", "path": "real:dermamnist/dermamnist_split_info.csv"}]
    sh("git", "add", "-A", cwd=ws)
    sh("git", "commit", "-qm", "my audit", cwd=ws)
    out = medlake("publish", "ham10000-corrected", cwd=ws)
    assert "ham10000-corrected@v1" in out
    assert "up to date" in bare_dvc("status", cwd=ws)
    # consumer 1: a clone without medlake pulls the version by path, byte for byte
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(ws), str(clone), cwd=tmp_path)
    bare_dvc("pull", V, cwd=clone)
    assert tree_digest(clone / V) == tree_digest(ws / V)
    m = load_version(clone / V)
    assert dict(m.group_by("split").len().iter_rows()) == {"train": 8215, "val": 573, "test": 1227}
    # consumer 2: dvc import by tag into another repository
    other = tmp_path / "other"
    other.mkdir()
    sh("git", "init", "-q", cwd=other)
    git_user(other)
    bare_dvc("init", "-q", cwd=other)
    (other / "data").mkdir()
    bare_dvc("import", str(ws), V, "-o", "data/ham10000-corrected", "--rev",
             "ham10000-corrected@v1", cwd=other)
    assert tree_digest(other / "data/ham10000-corrected") == tree_digest(ws / V)


def _dicom(path: Path, *, phi: bool, marked: bool) -> None:
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[path.name])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = path.stem, "DX"
    if phi:
        ds.PatientName = "Doe^Jane"
    if marked:
        ds.PatientIdentityRemoved, ds.DeidentificationMethod = "YES", "test: synthetic"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 16, 16, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = (np.arange(256, dtype=np.uint8).reshape(16, 16)).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_privacy_gate_refuses_identifying_tags_unless_acknowledged(tmp_path) -> None:
    medlake("init", "ws", "--remote", str(tmp_path / "remote"), cwd=tmp_path)
    ws = tmp_path / "ws"
    git_user(ws)
    img = ws / "data/cxr"
    img.mkdir(parents=True)
    rows = [("a", True, True), ("b", False, True), ("c", False, False)]
    for name, phi, marked in rows:
        _dicom(img / f"{name}.dcm", phi=phi, marked=marked)
    with open(ws / "data/manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "file", "split"])
        for name, _, _ in rows:
            w.writerow([name, f"{name}.dcm", "train"])
    (ws / "data/cxr.yaml").write_text(yaml.safe_dump({
        "dataset": "mycxr", "manifest": "manifest.csv", "images_root": "cxr",
        "columns": {"id": "id", "path": "file", "split": "split"}, "split_scheme": "orig"}))
    medlake("ingest", "generic", "data/cxr.yaml", cwd=ws)
    recipe = ws / "recipes/mycxr-v.yaml"
    recipe.write_text("dataset: mycxr\nparent: mycxr@orig\n")
    sh("git", "add", "-A", cwd=ws)
    sh("git", "commit", "-qm", "x", cwd=ws)
    import subprocess

    from versions_helpers import BIN

    r = subprocess.run([str(BIN / "medlake"), "publish", "mycxr-v", "--no-push"], cwd=ws,
                       capture_output=True, text=True, check=False,
                       env={**__import__("os").environ,
                            "PATH": f"{BIN}:{__import__('os').environ['PATH']}"})
    assert r.returncode == 1
    assert "refused: 1 of 3 images carry identifying DICOM tags" in r.stderr
    assert "1 of 3 DICOM images lack the de-identification markers" in r.stderr
    assert "privacy: {acknowledged" in r.stderr
    assert sh("git", "tag", cwd=ws).strip() == ""  # nothing tagged
    recipe.write_text(recipe.read_text() + "privacy: {acknowledged: \"internal use, IRB 42\"}\n")
    out = medlake("publish", "mycxr-v", "--no-push", cwd=ws)
    assert "mycxr-v@v1" in out
    sheet = (ws / "lake/versions/mycxr-v/DATASHEET.md").read_text()
    assert "1 images carry identifying DICOM tags" in sheet
    assert "internal use, IRB 42" in sheet
