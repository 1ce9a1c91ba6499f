"""descriptor-v1 vectors computed by fingerprint from its own decode (catalog.descriptors):
the vectors embed would compute by decoding again, used by embed instead of a second decode,
and never used when they could be stale."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from medlake.catalog import Catalog, Workspace, descriptors, imageio
from medlake.catalog.vectors import VectorStore
from medlake.pipelines import embed, fingerprint, ingest

from test_reduced_decode import _picture


def _files(folder: Path) -> list[Path]:
    """Files of every decode path a descriptor input takes."""
    big = _picture(900, 700, seed=1)
    out = {
        "big.jpg": (big, {"quality": 90}),  # decoded reduced (1/2) for the descriptor
        "huge.jpg": (_picture(1400, 1100, seed=2), {"quality": 70}),  # 1/4
        "small.jpg": (_picture(300, 200, seed=3), {}),  # in full: shorter side under 256
        "grey.jpg": (big.convert("L"), {}),
        "cmyk.jpg": (big.convert("CMYK"), {}),
        "rgb.png": (big, {}),
        "grey16.png": (Image.fromarray(np.asarray(big.convert("L"), np.uint16) * 257), {}),
        "rgba.png": (big.convert("RGBA"), {}),
        "palette.png": (big.convert("P"), {}),
    }
    paths = []
    for name, (im, kw) in out.items():
        paths.append(folder / name)
        im.save(paths[-1], **kw)
    rot = big.copy()  # EXIF orientation 6 (turned 90 degrees): decoded, then turned
    exif = rot.getexif()
    exif[0x0112] = 6
    paths.append(folder / "exif6.jpg")
    rot.save(paths[-1], exif=exif)
    from pydicom.data import get_testdata_file

    for name in ("CT_small.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_gdcm.dcm"):
        src = get_testdata_file(name)
        if src:
            paths.append(folder / name)
            shutil.copy(src, paths[-1])
    return paths


def test_fingerprint_decode_gives_the_vector_embed_computes(tmp_path):
    files = _files(tmp_path)
    assert len(files) >= 12
    for f in files:
        data = f.read_bytes()
        im = imageio.decode(data, f)
        px = imageio.to_8bit(im)
        got = descriptors.descriptor(data, f, im, px)
        prep = embed.preparer(embed.make_embedder("descriptor-v1"))
        want = prep(prep.load(str(f)))
        assert np.array_equal(got, want), f.name
        # fingerprint hands over the pixel array it made for its own metrics
        assert np.array_equal(descriptors.descriptor(data, f, im, px, np.asarray(px)), want), f.name
    # the reduced decode is taken where embed takes it (else the check above proves little)
    big = imageio.decode(files[0].read_bytes(), files[0])
    assert descriptors.descriptor_input(files[0].read_bytes(), files[0], big,
                                        imageio.to_8bit(big)).size == (225, 175)  # 1/4


def _lake(root: Path) -> Catalog:
    from medlake.demo.synthetic import generate

    (root / ".dvc").mkdir(parents=True)
    generate(root / "syn", n_captures=16, seed=4, image_scale=2.0)  # JPEGs over 256 px too
    cat = Catalog(Workspace(root))
    for m in ("derm", "cxr"):
        ingest.run(cat, "generic", root / "syn" / f"{m}.yaml")
    return cat


def test_embed_uses_fingerprints_vectors_and_stores_the_same(tmp_path):
    cat = _lake((tmp_path / "a").resolve())
    n = fingerprint.run(cat)["fingerprinted"]
    cache = descriptors.DescriptorCache(cat.ws.lake)
    assert sorted(p.stem for p in cache.folder.glob("*.parquet")) == ["synth-cxr", "synth-derm"]
    # the same workspace without the cache: embed decodes every file
    other = tmp_path / "b"
    shutil.copytree(cat.ws.root, other, ignore=shutil.ignore_patterns("cache"))
    ref = embed.run(Catalog(Workspace(other)), workers=0)
    assert ref["embedded"] == n
    # with the cache embed needs no file: the images are gone, every vector comes from it
    shutil.rmtree(cat.ws.root / "syn" / "images")
    res = embed.run(cat, workers=0)
    assert res["embedded"] == n and res["unreadable"] == 0
    ids, mat = VectorStore(cat.ws.vectors_dir).load("descriptor-v1")
    ref_ids, ref_mat = VectorStore(Workspace(other).vectors_dir).load("descriptor-v1")
    assert ids == ref_ids and len(ids) == n
    assert np.array_equal(mat, ref_mat)


def test_stale_or_foreign_vectors_are_not_used(tmp_path, monkeypatch):
    cat = _lake((tmp_path / "a").resolve())
    fingerprint.run(cat)
    cache = descriptors.DescriptorCache(cat.ws.lake)
    fp = cat.read("fingerprints", columns=["image_id", "sha256", "dataset_id"]).sort("image_id")
    # a changed file (another sha256) and another image id: both misses, decoded by embed
    ids, shas = fp["image_id"].to_list(), fp["sha256"].to_list()
    wanted = {(ids[0], "0" * 64): 0, ("synth-derm:nope", shas[1]): 1, (ids[2], shas[2]): 2}
    got = [p for pos, _ in cache.find(wanted) for p in pos]
    assert got == [2]
    # vectors of other code (another tag) are never read, and are removed by the next write
    monkeypatch.setattr(descriptors, "code_tag", lambda: "000000000000")
    assert list(descriptors.DescriptorCache(cat.ws.lake).find({(ids[2], shas[2]): 0})) == []
    descriptors.DescriptorCache(cat.ws.lake).write("x", [ids[2]], [shas[2]], np.ones((1, 128)))
    assert [p.name for p in cache.root.glob("descriptor-v1-*")] == ["descriptor-v1-000000000000"]
    # a damaged cache file is skipped: embed decodes and stores every vector
    monkeypatch.undo()
    fingerprint.run(cat)
    for f in cache.folder.glob("*.parquet"):
        f.write_bytes(f.read_bytes()[:200])
    res = embed.run(cat, workers=0)
    assert res["embedded"] == len(fp) and res["unreadable"] == 0


def test_fingerprint_leaves_no_vectors_for_another_model(tmp_path):
    cat = _lake((tmp_path / "a").resolve())
    (cat.ws.root / "params.yaml").write_text("embed:\n  model: ViT-B-32\n")
    fingerprint.run(cat)
    assert not list((cat.ws.lake / "cache").glob("descriptor-v1-*"))
    assert list((cat.ws.lake / "cache").glob("features-v1-*/*.features"))  # duplicates' ones


def test_a_dataset_without_readable_images_leaves_no_file(tmp_path):
    cache = descriptors.DescriptorCache(tmp_path / "lake")
    cache.write("d", ["d:1"], ["a" * 64], [np.ones(128, np.float32)])
    assert [p.name for p in cache.folder.iterdir()] == ["d.parquet"]
    got = list(cache.find({("d:1", "a" * 64): 0}))
    assert [pos for pos, _ in got] == [[0]] and np.array_equal(got[0][1], np.ones((1, 128)))
    cache.write("d", [], [], [])  # every image of the dataset quarantined now
    assert list(cache.folder.iterdir()) == [] and list(cache.find({("d:1", "a" * 64): 0})) == []


def test_a_failed_descriptor_leaves_the_image_to_embed(tmp_path, monkeypatch):
    """The vector is a cache: when it cannot be computed the image is still fingerprinted,
    and embed decodes it."""
    cat = _lake((tmp_path / "a").resolve())
    real = descriptors.descriptor

    def fails_for_cxr(data, path, im, px, arr=None):
        if "cxr" in str(path):
            raise ValueError("injected")
        return real(data, path, im, px, arr)

    monkeypatch.setattr(descriptors, "descriptor", fails_for_cxr)
    res = fingerprint.run(cat)
    assert res["quarantined"] == 0
    cache = descriptors.DescriptorCache(cat.ws.lake)
    assert [p.stem for p in cache.folder.glob("*.parquet")] == ["synth-derm"]
    out = embed.run(cat, workers=0)
    assert out["embedded"] == res["fingerprinted"] and out["unreadable"] == 0
