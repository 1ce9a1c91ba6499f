"""Issue 14, memory: the duplicates stage keeps image features on disk (FeatureStore), reads
them back through a bounded cache, and buckets ORB descriptors in parts; results are the
same as holding everything in memory."""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import polars as pl
import pytest
from images_helpers import _synth_lake  # noqa: F401  (session fixture synth_lake)
from PIL import Image

from medlake.catalog.storage import open_vectors
from medlake.catalog.tables import recover
from medlake.pipelines import duplicates, features, fingerprint, verify


def _pictures(tmp_path, n: int = 6) -> list[str]:
    rng = np.random.default_rng(3)
    paths = []
    for i in range(n):
        h, w = [(200, 256), (256, 171), (60, 60), (256, 256), (31, 44), (120, 300)][i % 6]
        small = (rng.random((max(4, h // 8), max(4, w // 8), 3)) * 255).astype(np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    flat = tmp_path / "flat.png"
    Image.new("L", (64, 64), 128).save(flat)  # no keypoints at all: descriptors None
    return [*paths[:3], str(bad), *paths[3:], str(flat)]


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if set(a) != set(b) or a["up"] != b["up"] or a["side"] != b["side"]:
        return False
    for raw in ("g", "c"):
        if (raw in a) != (raw in b):
            return False
        if raw in a and (not np.array_equal(a[raw], b[raw]) or a[raw].dtype != b[raw].dtype):
            return False
    for part in set(a) - {"g", "c", "up", "side"}:
        (pa, da), (pb, db) = a[part], b[part]
        if not (np.array_equal(pa, pb) and pa.dtype == pb.dtype):
            return False
        if (da is None) != (db is None) or (da is not None and not np.array_equal(da, db)):
            return False
    return True


@pytest.mark.parametrize("low", [True, False])
def test_store_round_trips_features_exactly(tmp_path, low):
    files = _pictures(tmp_path)
    want = [verify.features(f, low=low) for f in files]
    assert want[3] is None and want[-1]["n"][1] is None  # the unreadable and the flat image
    with verify.FeatureStore(tmp_path / "store") as store:
        for f in want:
            store.append(f)
        assert len(store) == len(want)
        for i, f in enumerate(want):
            assert _same(store.get(i), f), i
        assert store.has_part("lo") is low
        assert store.sides().tolist() == [-1 if f is None else f["side"] for f in want]


def test_store_features_streams_in_order(tmp_path):
    files = _pictures(tmp_path) * 3
    with verify.FeatureStore(tmp_path / "store") as store:
        features.store_features(files, store, workers=2, chunk=4)
        for i, f in enumerate(files):
            assert _same(store.get(i), verify.features(f)), i


def _reference_orb_pairs(descs: list[list[np.ndarray | None]], *, k, min_votes, tables, bits,
                         per_image, max_bucket, seed) -> set[tuple[int, int, int]]:
    """The algorithm written plainly: a dict of buckets per table, votes per pair."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(256, size=bits, replace=False) for _ in range(tables)]
    votes: dict[tuple[int, int], int] = {}
    for pk in picks:
        buckets: dict[int, set[int]] = {}
        for i, sets in enumerate(descs):
            for d in sets:
                if d is None:
                    continue
                for row in d[:per_image]:
                    bitsv = np.unpackbits(row)
                    key = sum(int(bitsv[b]) << n for n, b in enumerate(pk))
                    buckets.setdefault(key, set()).add(i)
        for members in buckets.values():
            if 2 <= len(members) <= max_bucket:
                m = sorted(members)
                for x in range(len(m)):
                    for y in range(x + 1, len(m)):
                        votes[(m[x], m[y])] = votes.get((m[x], m[y]), 0) + 1
    good = {p: v for p, v in votes.items() if v >= min_votes}
    ranked: dict[int, list[tuple[int, tuple[int, int]]]] = {}
    for p, v in good.items():
        for img in p:
            ranked.setdefault(img, []).append((v, p))
    keep = set()
    for img, lst in ranked.items():
        # ties as the implementation breaks them: pairs (img, x) before pairs (x, img), by x
        order = sorted(lst, key=lambda t: (-t[0], (0, t[1][1]) if t[1][0] == img else (1, t[1][0])))
        keep |= {p for _, p in order[:k]}
    return {(i, j, good[(i, j)]) for i, j in keep}


def test_orb_pairs_in_parts_equal_one_sort_and_a_plain_reference(tmp_path, monkeypatch):
    """Random descriptors with planted shared ones: the store-fed bucketing, sorted in parts
    and counted in shards, gives exactly the one-shard result and the plain dict-of-buckets
    reference (votes, each image's k best, ties broken the same way)."""
    rng = np.random.default_rng(11)
    n = 40
    common = rng.integers(0, 256, size=(30, 32), dtype=np.uint8)
    feats = []
    for i in range(n):
        d = rng.integers(0, 256, size=(25, 32), dtype=np.uint8)
        if i % 3:  # two thirds share some of the common descriptors (copies)
            d[: 6 + i % 7] = common[i % 5: i % 5 + 6 + i % 7]
        dm = None if i == 7 else rng.integers(0, 256, size=(10, 32), dtype=np.uint8)
        pts = np.zeros((len(d), 2), np.float32)
        feats.append(None if i == 13 else {
            "g": np.zeros((8, 8), np.uint8), "up": 1.0, "side": 8, "n": (pts, d),
            "m": (np.zeros((0 if dm is None else 10, 2), np.float32), dm)})
    kw = {"k": 3, "min_votes": 2, "tables": 6, "bits": 12, "per_image": 20, "max_bucket": 8,
          "seed": 2}
    whole = verify.orb_pairs(feats, **kw)
    assert len(whole) > 10
    with verify.FeatureStore(tmp_path / "store") as store:
        for f in feats:
            store.append(f)
        monkeypatch.setattr(verify, "PART_ENTRIES", 97)  # many parts per table
        monkeypatch.setattr(verify, "_READ", 50)
        monkeypatch.setattr(verify, "SHARD_DESCRIPTORS", 60)  # pair codes in many shards
        parts = verify.orb_pairs(store, **kw, scratch=tmp_path)
        monkeypatch.setattr(verify, "DENSE_VOTES", 0)  # votes counted by sorting, not bincount
        sorted_votes = verify.orb_pairs(store, **kw, scratch=tmp_path)
        monkeypatch.setattr(verify, "_MASKED_SHARDS", 0)  # pairs split by a sort, not masks
        sorted_shards = verify.orb_pairs(store, **kw, scratch=tmp_path)
    assert np.array_equal(whole, parts) and np.array_equal(whole, sorted_votes)
    assert np.array_equal(whole, sorted_shards)
    ref = _reference_orb_pairs([[None, None] if f is None else [f["n"][1], f["m"][1]]
                                for f in feats], **kw)
    assert {tuple(map(int, r)) for r in whole} == ref
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".orb.tmp-")]
    # several selections from one bucketing == one call per selection
    small = np.arange(n) % 4 == 1
    base = {x: v for x, v in kw.items() if x != "k"}
    many = verify.orb_pairs_many(feats, [(3, None), (6, small), (2, ~small)], **base)
    alone = [verify.orb_pairs(feats, k=k, only=o, **base)
             for k, o in ((3, None), (6, small), (2, ~small))]
    assert len(many[1]) > 5 and all(np.array_equal(a, b) for a, b in zip(many, alone, strict=True))


@pytest.mark.parametrize("store_fed", [False, True])
def test_orb_views_equal_one_bucketing_per_view(tmp_path, monkeypatch, store_fed):
    """orb_pairs_views: views of overlapping feature sets (low + mid, low alone with twins,
    mid alone with few flagged images) from one keying and one sort per atom give each view
    exactly what orb_pairs_many gives for it alone, in parts and shards too; two views
    with extra sets are refused."""
    rng = np.random.default_rng(3)
    n = 36
    common = rng.integers(0, 256, size=(40, 32), dtype=np.uint8)

    def part(i: int, k: int, planted: int) -> tuple[np.ndarray, np.ndarray]:
        d = rng.integers(0, 256, size=(k, 32), dtype=np.uint8)
        if i % 3:  # copies share some common descriptors, different ones per set
            d[: 4 + i % 5] = common[planted + i % 6: planted + i % 6 + 4 + i % 5]
        return np.zeros((k, 2), np.float32), d

    feats = []
    for i in range(n):
        f = {"g": np.zeros((8, 8), np.uint8), "up": 1.0, "side": 64,
             "lo": part(i, 12, 0), "lom": part(i, 12, 2)}
        if i % 4:  # some images have no mid rendition
            f |= {"mi": part(i, 10, 20), "mim": part(i, 10, 25)}
        if i % 5 == 1:
            f |= {"lx": part(i, 30, 5), "lxm": part(i, 30, 8)}
        feats.append(None if i == 9 else f)
    flags = np.array([f is not None and "lx" in f for f in feats])
    few = np.arange(n) == 7
    small = np.arange(n) % 3 == 0
    views = [(("lo", "lom", "mi", "mim"), [(2, None)], None),
             (("lo", "lom"), [(4, small), (2, None)], (("lx", "lxm"), flags, 3)),
             (("mi", "mim"), [(3, few)], None)]
    kw = {"min_votes": 2, "tables": 6, "bits": 12, "per_image": 10, "max_bucket": 8, "seed": 4}
    monkeypatch.setattr(verify, "PART_ENTRIES", 150)
    monkeypatch.setattr(verify, "SHARD_DESCRIPTORS", 200)
    src: Any = feats
    if store_fed:
        src = verify.FeatureStore(tmp_path / "store")
        for f in feats:
            src.append(f)
    got = verify.orb_pairs_views(src, views, **kw, scratch=tmp_path)
    alone = [verify.orb_pairs_many(src, select, tags=tags, extra=extra, **kw, scratch=tmp_path)
             for tags, select, extra in views]
    assert [len(g) for g in got] == [1, 3, 1]
    for g, a in zip(got, alone, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(g, a, strict=True))
    assert len(got[0][0]) > 10 and len(got[1][2]) > 0 and len(got[2][0]) > 0
    # the views differ: the joint bucketing is not the low one
    assert not np.array_equal(got[0][0], got[1][1])
    with pytest.raises(ValueError, match="at most one"):
        verify.orb_pairs_views(src, [views[1], (("mi",), [(2, None)], (("lx",), flags, 1))], **kw)
    if store_fed:
        src.close()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".orb.tmp-")]


def test_feature_cache_is_bounded_and_reads_the_store(tmp_path):
    files = _pictures(tmp_path)
    with verify.FeatureStore(tmp_path / "store") as store:
        features.store_features(files, store)
        cache = verify.FeatureCache(store, size=3)
        assert all(i in cache for i in range(len(files))) and len(cache) == 0
        errors = []

        def read(i: int) -> None:
            try:
                for _ in range(20):
                    assert _same(cache[i % len(files)], store.get(i % len(files)))
            except AssertionError as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=read, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(cache) <= 3
        cache["other"] = {"x": 1}  # what verify() computes for a key the store lacks
        assert "other" in cache and len(cache) <= 3
        with pytest.raises(KeyError):
            cache[len(files) + 5]
        # bounded by bytes too: the arrays held never pass max_bytes (one entry at least)
        one = verify._nbytes(store.get(0))
        assert one > 60_000  # the 256-px grey image and the ORB sets
        small = verify.FeatureCache(store, size=100, max_bytes=int(2.5 * one))
        for i in range(len(files)):
            assert _same(small[i], store.get(i))
            assert small.held <= 2.5 * one and len(small) >= 1
        assert len(small) < len(files)  # some were dropped for their bytes, not their number
        assert small.held == sum(verify._nbytes(small[k]) for k in list(small._lru))


def _scratch(cat) -> list[str]:
    return [p.name for p in cat.ws.lake.iterdir() if p.name.startswith(".features.")]


def test_duplicates_leaves_no_scratch_and_equals_in_memory_features(synth_lake, monkeypatch):
    """The stage through the store finds the pairs a run over in-memory features finds, and
    removes its scratch folder, also when it fails half-way."""
    cat = synth_lake
    fingerprint.run(cat)
    res = duplicates.run(cat)
    assert res["verified"] > 0 and not _scratch(cat)
    got = cat.read("pairs").drop("params").sort("image_a", "image_b")

    fp = cat.read("fingerprints").sort("image_id")
    files = dict(zip(*fingerprint.image_files(cat).select("image_id", "file").get_columns(),
                     strict=True))
    ids = fp["image_id"].to_list()
    feats = features.features_many([files[x] for x in ids])
    p = duplicates.DEFAULTS
    vecs, vs = None, open_vectors(cat.ws)  # as the run: the vector path when embed ran
    if vs.has(p["model"]):
        have_ids, mat = vs.load(p["model"], ids)
        vecs = mat if len(have_ids) == len(ids) else None
    cand = duplicates.candidates(fp, vecs, p, feats=feats)
    todo = sorted(c for c, v in cand.items() if "sha256" not in v["methods"])
    checked = duplicates.verify_pairs([(files[ids[i]], files[ids[j]], i, j) for i, j in todo], p,
                                      cache=dict(enumerate(feats)))
    want = {(ids[i], ids[j]): r["verified"] for (i, j), r in zip(todo, checked, strict=True)}
    got = got.filter(~pl.col("method").str.contains("sha256"))
    assert dict(zip(zip(got["image_a"], got["image_b"], strict=True), got["verified"],
                    strict=True)) == want

    def boom(*a, **k):
        raise RuntimeError("injected after the features were stored")

    monkeypatch.setattr(duplicates, "candidates", boom)
    with pytest.raises(RuntimeError):
        duplicates.run(cat)
    assert not _scratch(cat)


def test_a_dead_runs_scratch_folder_is_removed_when_the_lake_opens(tmp_path):
    lake = tmp_path / "lake"
    (lake / "tables").mkdir(parents=True)
    dead = 2**22 + 12345  # above pid_max's default: no such process
    left = lake / f".features.tmp-{dead}-0123abcd"
    (left / "x").mkdir(parents=True)
    mine = lake / f".features.tmp-{os.getpid()}-0123abcd"
    mine.mkdir()
    recover(lake / "tables")
    assert not left.exists() and mine.exists()
