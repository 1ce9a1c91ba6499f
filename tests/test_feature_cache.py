"""Duplicates' image features computed by fingerprint from its own decode
(pipelines.features.FeatureFiles): the features duplicates would compute by decoding again,
adopted by duplicates instead of a second decode, never read when they could be stale, and
never a reason for a run to fail or leave files behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from medlake.catalog import Catalog, imageio
from medlake.pipelines import duplicates, features, fingerprint

from test_descriptor_cache import _files, _lake
from test_feature_store import _same


def test_fingerprint_decode_gives_the_features_duplicates_computes(tmp_path):
    files = _files(tmp_path)
    thumb = tmp_path / "thumb.png"  # <= STRETCH_SIDE: the stretched renditions too
    Image.open(files[0]).resize((96, 64)).save(thumb)
    files.append(thumb)
    assert len(files) >= 13
    for f in files:
        data = f.read_bytes()
        im = imageio.decode(data, f)
        px = imageio.to_8bit(im)
        got = features.features_of(*features.feature_input(data, f, im, px))
        assert _same(got, features.features(str(f))), f.name
        # fingerprint hands over the pixel array it made for its own metrics
        shared = features.features_of(*features.feature_input(data, f, im, px, np.asarray(px)))
        assert _same(shared, got), f.name
        assert ("lx" in got) == (max(im.size) <= features.STRETCH_SIDE), f.name
    # the reduced decode is taken where features() takes it (else the check above proves little)
    huge = next(f for f in files if f.name == "huge.jpg")
    im = imageio.decode(huge.read_bytes(), huge)
    grey, full, _ = features.feature_input(huge.read_bytes(), huge, im, imageio.to_8bit(im))
    assert full == (1100, 1400) and grey.shape == (550, 700)  # decoded at 1/2


def _pairs(cat: Catalog) -> pl.DataFrame:
    return cat.read("pairs").drop("params").sort("image_a", "image_b")


def _counting(monkeypatch) -> list[str]:
    """The files duplicates decodes for its features (features.features, as store_features
    calls it)."""
    seen: list[str] = []
    real = features.features

    def counted(path, *a, **k):
        seen.append(path)
        return real(path, *a, **k)

    monkeypatch.setattr(features, "features", counted)
    return seen


def _cache_files(cat: Catalog) -> list[Path]:
    return sorted((cat.ws.lake / "cache").glob(f"{features.FEATURES}-*/*.features"))


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> Catalog:
    cat = _lake(tmp_path_factory.mktemp("featcache") / "ws")
    fingerprint.run(cat)
    return cat


def test_duplicates_adopts_fingerprints_features_and_finds_the_same_pairs(lake, monkeypatch):
    cat = lake
    n = cat.read("fingerprints").height
    stored = _cache_files(cat)
    assert [f.stem for f in stored] == ["synth-cxr", "synth-derm"]
    assert sum(len(features.FeatureStore.opened(f)[1]) for f in stored) == n
    decoded = _counting(monkeypatch)
    res = duplicates.run(cat)
    assert decoded == [] and res["verified"] > 0  # every image's features came from the cache
    with_cache = _pairs(cat)
    for f in stored:  # without the cache: every image decoded, the very same pairs
        f.unlink()
    duplicates.run(cat)
    assert len(decoded) == n
    assert _pairs(cat).equals(with_cache)
    fingerprint.run(cat)  # puts the files back for the other tests
    assert _cache_files(cat) == stored


def test_images_without_features_in_the_cache_are_decoded(lake, monkeypatch):
    """One dataset's file gone (fingerprinted by older code, say): only its images are decoded,
    and the pairs across the two datasets are the same."""
    cat = lake
    want = (duplicates.run(cat), _pairs(cat))
    derm = next(f for f in _cache_files(cat) if f.stem == "synth-derm")
    derm.unlink()
    decoded = _counting(monkeypatch)
    got = (duplicates.run(cat), _pairs(cat))
    fp = cat.read("fingerprints")
    assert len(decoded) == fp.filter(pl.col("dataset_id") == "synth-derm").height > 0
    assert got[0].counts == want[0].counts and got[1].equals(want[1])
    fingerprint.run(cat, dataset_id="synth-derm")
    assert derm.exists()


def test_a_damaged_or_foreign_feature_file_is_never_read(lake, monkeypatch, tmp_path):
    cat = lake
    want = _pairs(cat)
    stored = _cache_files(cat)
    keep = {f: f.read_bytes() for f in stored}
    try:
        stored[0].write_bytes(keep[stored[0]][: len(keep[stored[0]]) // 2])  # truncated
        stored[1].write_bytes(b"\0" * 64)  # not a feature file
        for f in stored:
            with pytest.raises(ValueError, match="not a feature file"):
                features.FeatureStore.opened(f)
        decoded = _counting(monkeypatch)
        duplicates.run(cat)
        assert len(decoded) == cat.read("fingerprints").height
        assert _pairs(cat).equals(want)
    finally:
        for f, data in keep.items():
            f.write_bytes(data)
    # a file of other code (another tag's folder) is not looked at, and fingerprint removes it
    other = cat.ws.lake / "cache" / f"{features.FEATURES}-000000000000"
    other.mkdir()
    (other / "synth-cxr.features").write_bytes(keep[stored[0]])
    assert features.FeatureFiles(cat.ws.lake).folder != other
    fingerprint.run(cat, dataset_id="synth-cxr")
    assert not other.exists()


def test_a_changed_file_gets_new_features_and_its_old_ones_are_not_read(lake, tmp_path):
    cat = lake
    fp = cat.read("fingerprints").sort("image_id")
    row = fp.row(0, named=True)
    files = dict(zip(*fingerprint.image_files(cat).select("image_id", "file").get_columns(),
                     strict=True))
    path = Path(files[row["image_id"]])
    before = path.read_bytes()
    try:
        rng = np.random.default_rng(7)
        Image.fromarray((rng.random((40, 50)) * 255).astype(np.uint8)).resize((200, 160)).save(
            path, format=Image.open(path).format)
        cache = features.FeatureFiles(cat.ws.lake)
        opened, hits = cache.matched([(row["image_id"], row["sha256"])])
        assert hits[0] is not None  # the entry of the file as fingerprinted ...
        for s in opened:
            s.close()
        fingerprint.run(cat)  # ... replaced when the file is fingerprinted again
        new = cat.read("fingerprints").filter(pl.col("image_id") == row["image_id"]).row(0, named=True)
        assert new["sha256"] != row["sha256"]
        opened, hits = cache.matched([(row["image_id"], row["sha256"]),
                                      (row["image_id"], new["sha256"])])
        assert hits[0] is None and hits[1] is not None
        assert cache.matched([(row["image_id"], None)])[1] == [None]  # no sha256: a miss
        assert _same(hits[1][0].get(hits[1][1]), features.features(str(path)))
        for s in opened:
            s.close()
    finally:
        path.write_bytes(before)
        fingerprint.run(cat)


def test_a_failed_fingerprint_run_leaves_its_feature_files_as_they_were(lake, monkeypatch):
    cat = lake
    stored = {f: f.stat().st_mtime_ns for f in _cache_files(cat)}

    def boom(*a, **k):
        raise RuntimeError("injected before the tables are published")

    monkeypatch.setattr(fingerprint, "_publish", boom)
    with pytest.raises(RuntimeError, match="injected"):
        fingerprint.run(cat)
    assert {f: f.stat().st_mtime_ns for f in _cache_files(cat)} == stored
    assert not [p for p in cat.ws.lake.iterdir() if p.name.startswith(".features.")]
