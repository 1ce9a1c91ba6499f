"""attach-images: real HAM10000 metadata plus image files made in tmp_path."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from PIL import Image

from medlake.catalog import Catalog, CatalogError, IngestError, Workspace
from medlake.cli.main import main
from medlake.pipelines import attach_images, ingest

PIXELS = ["path", "sha256", "width", "height", "mode", "phi_tags"]


def img(path: Path, w: int, h: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    return path


def tables_bytes(cat: Catalog) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(cat.ws.tables_dir.rglob("*.parquet"))}


@pytest.fixture(scope="module")
def ham_lake(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with the real HAM10000 metadata ingested (once per module)."""
    root = tmp_path_factory.mktemp("ham") / "ws"
    (root / ".dvc").mkdir(parents=True)
    ingest.run(Catalog(Workspace(root.resolve())), "ham10000", shared_data / "ham10000" / "HAM10000_metadata.csv")
    return root


@pytest.fixture
def ham(ham_lake: Path, tmp_path: Path) -> tuple[Catalog, list[str]]:
    root = tmp_path / "ws"
    shutil.copytree(ham_lake, root)
    cat = Catalog(Workspace(root.resolve()))
    ids = sorted(cat.image_ids("ham10000")["native_id"].to_list())
    return cat, ids


@pytest.fixture
def folder(tmp_path: Path, ham) -> Path:
    _, ids = ham
    f = tmp_path / "HAM10000_images"
    img(f / f"{ids[0]}.jpg", 30, 20, 0)
    img(f / f"{ids[1]}.jpg", 31, 21, 1)
    img(f / "part2" / f"{ids[2]}.png", 32, 22, 2)  # recursive, other extension
    img(f / ids[3], 33, 23, 3)  # no extension
    good = img(f / f"{ids[4]}.jpg", 64, 64, 4)
    good.write_bytes(good.read_bytes()[:200])  # truncated
    img(f / "ISIC_9999999.jpg", 10, 10, 5)  # no such id
    (f / "notes.txt").write_text("scanner log\n")  # no such id either
    img(tmp_path / "elsewhere" / f"{ids[5]}.jpg", 10, 10, 6)
    (f / f"{ids[5]}.jpg").symlink_to(tmp_path / "elsewhere" / f"{ids[5]}.jpg")  # escapes
    (f / ".DS_Store").write_text("hidden files are ignored")
    return f


def test_attach_matches_by_id_and_fills_pixels(ham, folder):
    cat, ids = ham
    before = cat.read("images").sort("image_id")
    res = attach_images.run(cat, "ham10000", folder)
    assert (res.files_found, res.matched, res.files_quarantined) == (8, 4, 4)
    assert res.unmatched_ids == 10_015 - 4 and res.first_unmatched_ids[0] == ids[4]
    assert res.reasons == {"matches no image id of the dataset": 2, "truncated or corrupt image": 1,
                           "path resolves outside the images root": 1}
    assert res.first_unmatched_files == ("ISIC_9999999.jpg", "notes.txt")
    after = cat.read("images").sort("image_id")
    assert after.drop(PIXELS).equals(before.drop(PIXELS))  # nothing else changed
    got = {r["native_id"]: r for r in after.filter(pl.col("path").is_not_null()).to_dicts()}
    assert sorted(got) == ids[:4]
    assert got[ids[2]]["path"] == f"part2/{ids[2]}.png" and got[ids[3]]["path"] == ids[3]
    assert (got[ids[1]]["width"], got[ids[1]]["height"], got[ids[1]]["mode"]) == (31, 21, "RGB")
    assert got[ids[0]]["sha256"] == hashlib.sha256((folder / f"{ids[0]}.jpg").read_bytes()).hexdigest()
    assert cat.read("datasets")["images_root"].to_list() == ["../HAM10000_images"]
    q = cat.read("quarantine").filter(pl.col("stage") == "attach-images")
    assert sorted(q["item"].to_list()) == sorted(
        ["ISIC_9999999.jpg", "notes.txt", f"{ids[4]}.jpg", f"{ids[5]}.jpg"])
    assert set(q["file"]) == {"../HAM10000_images"} and set(q["row"]) == {0}
    assert (cat.ws.tables_dir / "images" / "ingest" / "ham10000.parquet").exists()
    assert "8 files found = 4 matched + 4 quarantined" in res.summary()


def test_attach_again_is_byte_identical_and_dry_run_writes_nothing(ham, folder):
    cat, _ = ham
    plain = tables_bytes(cat)
    dry = attach_images.run(cat, "ham10000", folder, dry_run=True)
    assert dry.matched == 4 and tables_bytes(cat) == plain and "nothing written" in dry.summary()
    attach_images.run(cat, "ham10000", folder)
    once = tables_bytes(cat)
    attach_images.run(cat, "ham10000", folder)
    assert tables_bytes(cat) == once != plain


def test_strict_stops_at_the_first_bad_file(ham, folder):
    cat, ids = ham
    plain = tables_bytes(cat)
    with pytest.raises(IngestError, match=rf"HAM10000_images: {ids[4]}.jpg: truncated or corrupt image; 4 files in all"):
        attach_images.run(cat, "ham10000", folder, strict=True)
    assert tables_bytes(cat) == plain


def test_cli_attach_images(ham, folder):
    cat, _ = ham
    r = CliRunner().invoke(main, ["attach-images", "ham10000", str(folder), "-w", str(cat.ws.root)])
    assert r.exit_code == 0, r.output
    assert "4 of 10,015 images have a file; 10,011 ids without one" in r.output
    assert "unmatched files (first): ISIC_9999999.jpg, notes.txt" in r.output
    r = CliRunner().invoke(main, ["attach-images", "nope", str(folder), "-w", str(cat.ws.root)])
    assert r.exit_code == 1 and "dataset 'nope' has no images" in r.output and "ham10000" in r.output
    r = CliRunner().invoke(main, ["attach-images", "ham10000", str(folder / "absent"), "-w", str(cat.ws.root)])
    assert r.exit_code == 1 and "no such folder" in r.output


# --- without the real data: a tiny metadata-only generic dataset ---------------------------------
def test_match_rules():
    ids = ["a", "b", "b.png", "x/c", "d"]
    files = ["a.jpg", "sub/a.png", "b.png", "x/c.jpg", "y/c.jpg", "d.png", "d.jpg", "zz.png"]
    matched, rejected = attach_images.match(ids, files)
    # 'b.png' is the exact name of id 'b.png' (beats the stem of id 'b'); 'x/c' by path;
    # 'a.jpg' (path without extension) beats 'sub/a.png' (file stem only)
    assert matched == {"a": "a.jpg", "b.png": "b.png", "x/c": "x/c.jpg"}
    assert rejected == {
        "sub/a.png": attach_images.MANY_FILES,
        "d.png": attach_images.MANY_FILES, "d.jpg": attach_images.MANY_FILES,
        "y/c.jpg": attach_images.NO_ID, "zz.png": attach_images.NO_ID,
    }


def test_attach_to_a_generic_dataset_leaves_other_datasets_alone(catalog: Catalog, tmp_path):
    for ds in ("one", "two"):
        (tmp_path / f"{ds}.csv").write_text("id,dx\nk1,nv\nk2,mel\nk3,nv\n")
        ingest.run(catalog, "generic", tmp_path, dataset_id=ds, manifest=f"{ds}.csv", id="id",
                   label="dx:expert:category")
    assert catalog.read("images")["path"].null_count() == 6
    two = (catalog.ws.tables_dir / "images" / "ingest" / "two.parquet").read_bytes()
    img(tmp_path / "pix" / "k1.png", 5, 6, 1)
    img(tmp_path / "pix" / "k3.png", 7, 8, 3)
    res = attach_images.run(catalog, "one", tmp_path / "pix")
    assert (res.matched, res.unmatched_ids, res.files_quarantined) == (2, 1, 0)
    assert (catalog.ws.tables_dir / "images" / "ingest" / "two.parquet").read_bytes() == two
    im = catalog.read("images", where="dataset_id = 'one'").sort("image_id")
    assert im["path"].to_list() == ["k1.png", None, "k3.png"] and im["width"].to_list() == [5, None, 7]
    roots = dict(zip(*catalog.read("datasets").select("dataset_id", "images_root").to_dict(as_series=False).values()))
    assert roots == {"one": "../pix", "two": None}
    # a second folder replaces the first: ids it lacks lose their old paths
    img(tmp_path / "pix2" / "k2.png", 9, 9, 2)
    attach_images.run(catalog, "one", tmp_path / "pix2")
    im = catalog.read("images", where="dataset_id = 'one'").sort("image_id")
    assert im["path"].to_list() == [None, "k2.png", None]
    with pytest.raises(CatalogError, match="no such folder"):
        attach_images.run(catalog, "one", tmp_path / "missing")
