"""Stage ``duplicates``: candidate pairs, geometric verification, ``pairs`` and ``clusters``.

Candidates come from exact sha256 matches, perceptual-hash neighbours (pHash, and with
``hash_sym`` the mirror-invariant pHash, within ``hamming`` bits, at most the ``hash_k``
nearest per image;
hash values shared by more than ``hash_max_group`` images are skipped),
vector neighbours (the ``k`` nearest by cosine above ``cosine``, found with exact blocked
matrix products, never the full N x N matrix) and shared local features (ORB descriptors
hashed into buckets, :func:`pipelines.verify.orb_pairs`: of each image's low rendition, the
``orb_k`` best per image with ``orb_votes`` shared buckets, method ``orb_low``, bucketed with
its mid rendition, ``orb_mid``; of its 256-px
frame, the ``orb_full_k`` best of each image of ``orb_full_from`` px or more, method ``orb``;
this path finds crops and rotations; images of at most
``small_side`` px are also paired by ORB of low renditions, method ``orb_low``, and thumbnails
of at most 128 px by those renditions stretched, the ``stretch_k`` best), and thumbnails of at
most ``window_side`` px by windows of their tiny colour renditions (:mod:`pipelines.windows`,
the ``window_k`` best, method ``window``), across every dataset of the workspace. Each candidate is verified: ORB features,
matched against the other image and its mirror, a RANSAC affine transform (axis scales within
``max_aspect``), refined by ECC, then the normalised cross-correlation of band-pass detail at
the coarser of the two images' resolutions. A copy shares its detail with its source even
when cropped, resized with any interpolation, rotated, mirrored or relit; a repeat capture of
the same lesion or patient has the same anatomy but different detail, so it fails the
correlation check (``ncc``, rising to ``ncc_coarse`` for thumbnails, where less of that
detail is left; a coarse pair under that line still counts when it beats every other image
either image was compared with by ``distinct_margin``, :func:`distinct`). Two images of one
cluster that were never compared are compared too (:func:`closure_pairs`, ``closure_max``).
Confirmed pairs become clusters (scipy connected components).
External pair lists (CSV: image_a, image_b[, score]) import as their own method.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import click
import numpy as np
import polars as pl
import pyarrow as pa
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from medlake.catalog import Catalog, CatalogError, conform, spec, to_json
from medlake.catalog.embedders import DESCRIPTOR
from medlake.catalog.imageio import image_pool
from medlake.catalog.params import defaults, param, to_dict
from medlake.catalog.storage import open_vectors
from medlake.catalog.tables import temp_dir_path
from medlake.catalog.vectors import near_pairs
from medlake.pipelines import features, verify, windows
from medlake.pipelines.fingerprint import image_files
from medlake.pipelines.stage import Counts, Stage

STAGE = "duplicates"


@dataclass(frozen=True)
class Params:
    """``params.yaml: duplicates``: candidate paths and verification thresholds."""

    hamming: int = param(0, "pHash candidates: at most this many differing bits", min=0, max=64)
    hash_k: int = param(1, "pHash candidates: each image's k nearest hashes (0: path off)", min=0)
    hash_sym: bool = param(False, "pHash candidates also by the mirror-invariant pHash (off: "
                           "ORB's buckets find mirrored copies, and on the generated 5k sets its "
                           "423-481 candidates of its own verified none, ~0.3 ms per image)")
    hash_max_group: int = param(4, "a hash shared by more images makes no candidates (0: no cap)",
                                min=0)
    k: int = param(3, "vector candidates: each image's k nearest vectors (0: path off)", min=0)
    cosine: float = param(0.80, "vector candidates: cosine similarity at least", min=-1, max=1)
    orb_k: int = param(2, "ORB-bucket candidates: the k best of either image", min=0)
    orb_votes: int = param(2, "ORB-bucket candidates: shared buckets at least", min=1)
    orb_full_k: int = param(2, "ORB-bucket candidates of the full-resolution features with "
                            "orb_buckets both: the k best of each image of orb_full_from px or "
                            "more (crops whose aspect or scale changed beyond what the low "
                            "renditions match)", min=1)
    orb_full_from: int = param(384, "orb_buckets both: full-resolution candidates only of images "
                               "of at least this longer side (px; 0: every image)", min=0)
    orb_features: int = param(300, "ORB keypoints per image used for bucketing", min=1)
    orb_seed: int = param(0, "random draw of the ORB buckets' key bits (another seed, another "
                          "hashing of the same descriptors: candidate recall of the generated "
                          "5k set: 0.979 with seed 0, 0.970-0.972 with seeds 1-3)", min=0)
    orb_buckets: Literal["low", "full", "both"] = param(
        "both", "ORB-bucket candidates from the low renditions (48 px, scale-covariant: crops "
        "resized to any size), the full-resolution features (256-px frame), or both (the "
        "full ones' orb_full_k best added)")
    orb_mid: bool = param(True, "ORB-bucket candidates: each image's orb_k best by its low "
                          "rendition and its mid rendition (64 px, ORB at 128; images over 128 "
                          "px) bucketed together, so a crop magnified 1.5-2.5x meets its source "
                          "at the crop's scale; small images' and thumbnails' selections keep "
                          "the low renditions alone (generated 5k sets, seed 1: resized crops "
                          "0.84 -> 0.91, combinations 0.82 -> 0.88; seed 0: 0.93 -> 0.94, 0.91 "
                          "-> 0.93; ratio of CPU to pHash at 5k 22.1 -> 24.1)")
    small_side: int = param(128, "images with at most this longer side (px) also get low-"
                            "rendition candidates among pairs with a small image, and are "
                            "verified by low-rendition matches when full ones fail (0: off)",
                            min=0)
    small_k: int = param(6, "ORB-bucket candidates of small images (small_side): the k best "
                         "among pairs with a small image, ranked among themselves (12 before "
                         "the window candidates covered thumbnails; generated 5k sets, 6 against "
                         "12: 12% fewer candidates, true pairs -2 / +1 / 0 / -1 / +1 on seeds "
                         "0-4, -1 at 3x)", min=0)
    stretch_k: int = param(3, "ORB-bucket candidates of thumbnails (at most 128 px) by their "
                           "low renditions stretched 1.41x and 0.71x (a crop squeezed to a "
                           "square): the k best of each (0: off)", min=0)
    window_k: int = param(4, "window candidates of thumbnails (window_side): the k best images "
                          "by a window of their tiny colour renditions (pipelines.windows: a "
                          "crop squeezed to a few dozen pixels, too small for ORB; 0: off)",
                          min=0)
    window_side: int = param(64, "window candidates: thumbnails of at most this longer side (px)",
                             min=0)
    low_fallback: int = param(2, "verification: a pair of images larger than small_side with "
                              "no full-frame fit is fitted by its low renditions, taken from "
                              "this many times min_inliers inliers (a crop upsampled into the "
                              "256-px frame; generated 5k seed 4: cropped 0.949 -> 0.96, "
                              "~12% more verification CPU per pair; 0: off)", min=0)
    match_features: int = param(300, "strongest keypoints matched in verification", min=1)
    min_inliers: int = param(12, "verification: RANSAC inliers at least", min=4)
    max_aspect: float = param(2.0, "verification: the affine map's two axis scales differ by at "
                              "most this factor (crops resized to a fixed size)", min=1)
    refine_from: float = param(1.5, "verification: refine the RANSAC transform by ECC when the "
                               "common pixel (256-px frame) is at least this (coarse pairs)",
                               min=0)
    ncc: float = param(0.78, "verification: band-pass normalised cross-correlation at least "
                       "(the pair's score; the UI's threshold line)", min=-1, max=1)
    ncc_coarse: float = param(0.95, "verification: NCC needed when the common resolution is "
                              "coarse (thumbnails: a 256-px frame pixel of 4 or more; linear "
                              "from ncc at 1.5)", min=-1, max=1)
    distinct_ncc: float = param(0.80, "verification: a coarse pair (common pixel >= 1.5) under "
                                "the ncc..ncc_coarse line is still accepted from this NCC (linear "
                                "from ncc at 1.5) when it is *distinct*: better by distinct_margin "
                                "than every other image either image was compared with (1: off)",
                                min=-1, max=1)
    distinct_margin: float = param(0.05, "verification: the NCC margin of a distinct coarse pair "
                                   "over each image's best other comparison", min=0, max=2)
    motion_max: float = param(1.7, "verification: a pair at a fine common pixel (under 1.5) that "
                              "passes the NCC line by less than 0.08 is rejected when the local "
                              "motion left under one affine map exceeds this (px; optical flow, "
                              "75th percentile over the most detailed quarter): a repeat "
                              "capture of the same patient, not a copy (motion_unscaled for a "
                              "map at its own size; 0: off)", min=0)
    motion_unscaled: float = param(1.0, "verification: motion_max for a map that resamples "
                                   "neither axis (both within 1.1): a copy at its own size keeps "
                                   "its detail in place (measured: copies 0.14-0.46 px, same-"
                                   "patient captures and other false pairs 1.22 px and more; resized "
                                   "copies reach 1.6; 0: motion_max applies)", min=0)
    still_max: float = param(1.2, "verification: a pair of two images of 384 px or more that "
                             "passes the 256-px frame but not its finer frame (NCC 0.6 up to "
                             "the line there) is still accepted when the local motion left "
                             "under one affine map is at most this (px of the finer frame): a "
                             "copy whose finest detail JPEG or interpolation smoothed, not a "
                             "repeat capture (0: off)", min=0)
    closure_max: int = param(8, "verification: images of one cluster (of at most this many "
                             "images) never compared with each other are compared too, until no "
                             "cluster gains a pair: a copy found through another copy of its "
                             "source, e.g. a squeezed crop ORB's buckets missed (method "
                             "'cluster'; 0: off)", min=0)
    model: str = param(DESCRIPTOR, "vector model of the vector path")
    block: int = param(4096, "rows per block of the exact vector search", min=1)
    workers: int = param(2, "verification threads", min=1)


DEFAULTS: dict[str, Any] = defaults(Params)
CACHE_IMAGES = 1024  # images whose features verification holds at once (~110 KB each),
CACHE_BYTES = 128 << 20  # and at most this many bytes of them (a large image's finer frame,
# made for the second comparison, verify.fine_frame, adds up to 256 KB: fewer are held)


def knn_pairs(vecs: np.ndarray, *, k: int, threshold: float, block: int = 4096) -> np.ndarray:
    """(i, j, cosine) with i < j for each row's ``k`` nearest rows above ``threshold``.

    Exact: blocked matrix products, memory O(block x N), never the full N x N matrix
    (:func:`catalog.vectors.near_pairs`: bfloat16 screening where native, float32 re-scoring).
    """
    return near_pairs(vecs, threshold=threshold, k=k, block=block)


def hash_pairs(hashes: list[str], *, max_bits: int, k: int | None = None) -> np.ndarray:
    """(i, j, hamming), i < j, for hex hashes within ``max_bits`` (blocked popcount).

    With ``k``, only each image's ``k`` nearest hashes count (a pair is kept when it is among
    the ``k`` nearest of either image): look-alike images (all chest X-rays) would otherwise
    make a quadratic number of candidates.
    """
    h = np.array([int(x, 16) for x in hashes], dtype=np.uint64)
    n = len(h)
    out = []
    step = max(1, min(2048, (1 << 21) // max(n, 1)))  # memory O(step x n), <= ~16 MiB
    for s in range(0, n, step):
        # int64 as always: numpy's partition picks among equal distances by dtype
        d = np.bitwise_count(h[s:s + step, None] ^ h[None, :]).astype(np.int64)
        rows = np.arange(s, min(s + step, n))
        d[rows - s, rows] = 999
        if k is not None and k < n - 1:
            near = np.argpartition(d, k - 1, axis=1)[:, :k]
            mask = np.zeros_like(d, dtype=bool)
            np.put_along_axis(mask, near, True, axis=1)
            d = np.where(mask, d, 999)
        i, j = np.nonzero(d <= max_bits)
        out.append(np.stack([i + s, j, d[i, j]], axis=1))
    res = np.concatenate(out) if out else np.zeros((0, 3), dtype=np.int64)
    res = np.stack([res[:, :2].min(axis=1), res[:, :2].max(axis=1), res[:, 2]], axis=1)
    _, first = np.unique(res[:, :2], axis=0, return_index=True)
    return res[np.sort(first)]


def rare_hash_rows(hashes: pl.Series, max_group: int) -> np.ndarray:
    """Row numbers whose hash value is shared by at most ``max_group`` rows (0: every row).

    A hash value that many images share (flat, symmetric or look-alike pictures, e.g. the
    mirror-symmetrised pHash of chest X-rays) says nothing about any one pair of them; like
    the ORB path's ``max_bucket``, such values make no candidates.
    """
    if max_group <= 0:
        return np.arange(len(hashes))
    sizes = hashes.to_frame("h").select(pl.len().over("h"))[:, 0].to_numpy()
    return np.flatnonzero(sizes <= max_group)


def candidates(fp: pl.DataFrame, vecs: np.ndarray | None, p: dict[str, Any], *,
               knn: Callable[..., np.ndarray] | None = None,
               feats: list[Any] | verify.FeatureStore | None = None
               ) -> dict[tuple[int, int], dict]:
    """Candidate pairs (index pairs into ``fp``) with the scores of every method that found them.

    ``knn`` replaces :func:`knn_pairs` (same arguments and result), e.g. the Ray engine's.
    ``feats`` (:func:`pipelines.verify.features` per row of ``fp``, a list or a
    :class:`pipelines.verify.FeatureStore`) adds the ORB-bucket path.
    """
    cand: dict[tuple[int, int], dict] = {}

    def add(i: int, j: int, method: str, **scores: Any) -> None:
        c = cand.setdefault((min(i, j), max(i, j)), {"methods": []})
        c["methods"].append(method)
        c.update(scores)

    groups = fp.with_row_index("i").group_by("sha256").agg(pl.col("i")).filter(pl.col("i").list.len() > 1)
    for idx in groups["i"].to_list():
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                add(idx[a], idx[b], "sha256", hamming=0)
    cols = ("phash", "phash_sym") if p.get("hash_sym", DEFAULTS["hash_sym"]) else ("phash",)
    for col in cols if int(p["hash_k"]) > 0 else ():
        rows = rare_hash_rows(fp[col], int(p.get("hash_max_group", 0)))
        for i, j, d in hash_pairs(fp[col].gather(rows).to_list(), max_bits=int(p["hamming"]),
                                  k=int(p["hash_k"])):
            add(int(rows[i]), int(rows[j]), col, hamming=int(d))
    if vecs is not None and int(p["k"]) > 0:
        for i, j, c in (knn or knn_pairs)(vecs, k=int(p["k"]), threshold=float(p["cosine"]),
                                          block=int(p["block"])):
            add(int(i), int(j), "vector", cosine=float(c))
    if feats is not None:
        orb = {"k": int(p["orb_k"]), "min_votes": int(p["orb_votes"]),
               "per_image": int(p["orb_features"]), "seed": int(p.get("orb_seed", 0))}
        how = p.get("orb_buckets", DEFAULTS["orb_buckets"])
        orb["scratch"] = getattr(feats, "folder", None)
        if isinstance(feats, verify.FeatureStore):
            has_low, sides = feats.has_part("lo"), feats.sides()
        else:
            has_low = all(f is None or "lo" in f for f in feats)
            sides = np.array([-1 if f is None else f["side"] for f in feats], dtype=np.int64)
        full = how in ("full", "both") or not has_low
        big = None
        if how == "both" and has_low:  # the full frames add the orb_full_k best (fewer: ~2 ms
            # of verification per extra candidate, most of them look-alikes) of each image of
            # orb_full_from px or more (its low rendition keeps <= 1/8 of its side); ranked
            # among that image's pairs only, so a set with few such images buckets few entries
            big = sides >= int(p.get("orb_full_from", DEFAULTS["orb_full_from"]))
            full = bool(big.any())
        if full:
            full_k = orb["k"] if big is None else int(p.get("orb_full_k", DEFAULTS["orb_full_k"]))
            for i, j, v in verify.orb_pairs(feats, **{**orb, "k": full_k}, only=big):
                add(int(i), int(j), "orb", votes=int(v))
        if has_low:
            small = (sides >= 0) & (sides <= int(p.get("small_side", 0)))
            # every image; pairs with a small image ranked among themselves (few images: look
            # deeper, small_k); thumbnails also by their stretched renditions (squeezed crops,
            # verify._stretched) as virtual twins: all from one bucketing of the low renditions
            # (with orb_mid, the orb_k best from a second one, of the low and mid renditions)
            small_k = int(p.get("small_k", 3 * orb["k"]))
            main = [(orb["k"], None)] if how in ("low", "both") else []
            select = [(small_k, small)] if small.any() and small_k > 0 else []
            stretched = small & _present(feats, "lx")
            stretch_k = int(p.get("stretch_k", 0))
            extra = (("lx", "lxm"), stretched, stretch_k) if stretched.any() and stretch_k > 0 else None
            kw = {x: v for x, v in orb.items() if x != "k"}
            views: list[verify.View] = []
            if main and p.get("orb_mid", DEFAULTS["orb_mid"]):
                # the orb_k best by the low and mid renditions together; small images' and
                # thumbnails' selections by the low renditions alone (larger images' mid
                # descriptors crowded a thumbnail's list: to_small candidates 0.93 -> 0.88);
                # one keying and sort of the low descriptors serves both
                views.append((("lo", "lom", "mi", "mim"), main, None))
            else:
                select = main + select
            if select or extra:
                views.append((("lo", "lom"), select, extra))
            founds = [a for got in verify.orb_pairs_views(feats, views, **kw, bits=32) for a in got]
            for found in founds:
                for i, j, v in found:
                    c = cand.get((int(i), int(j)), {})
                    add(int(i), int(j), "orb_low", low_votes=max(int(v), c.get("low_votes", 0)))
        window_k = int(p.get("window_k", 0))
        if window_k > 0 and isinstance(feats, verify.FeatureStore) and feats.has_part("c"):
            usable = _present(feats, "c")
            thumbs = (sides >= 0) & (sides <= int(p.get("window_side", DEFAULTS["window_side"])))
            for i, j, score in windows.window_pairs(feats, thumbs, usable, k=window_k):
                c = cand.get((min(i, j), max(i, j)), {})
                add(i, j, "window", window=max(round(score, 4), c.get("window", -1.0)))
    return cand


def _present(feats: list[Any] | verify.FeatureStore, part: str) -> np.ndarray:
    """Per image: its features have ``part``."""
    if isinstance(feats, verify.FeatureStore):
        return feats.present(part)
    return np.array([f is not None and part in f for f in feats], dtype=bool)


def verify_pairs(jobs: list[tuple[str, str, int, int]], p: dict[str, Any], *,
                 cache: dict[int, Any] | None = None, workers: int = 1) -> list[dict[str, Any]]:
    """:func:`pipelines.verify.verify` of each (file_a, file_b, i, j), features cached by index.

    ``cache`` may hold features computed already (index -> :func:`pipelines.verify.features`);
    ``workers`` > 1 verifies in a thread pool (OpenCV releases the GIL).
    """
    cache = {} if cache is None else cache

    def one(job: tuple[str, str, int, int]) -> dict[str, Any]:
        return verify.verify(job[0], job[1], cache=cache, keys=(job[2], job[3]), p=p)

    if workers <= 1:
        return [one(j) for j in jobs]
    with image_pool(), ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, jobs, chunksize=64))


def run(cat: Catalog, params: Params | dict[str, Any] | None = None, *,
        external: Path | str | None = None, echo: Any = None, engine: str = "local",
        address: str | None = None) -> Counts:
    """Find, verify and cluster duplicate pairs across every dataset; write pairs, clusters.

    ``engine="ray"`` runs the vector search and the verification as Ray tasks on the cluster
    at ``address`` (:mod:`pipelines.ray_duplicates`); the result is the same.

    Returns
    -------
    Counts
        ``candidates``, ``verified``, ``clusters`` (with 2+ images), ``external``.
    """
    p = to_dict(DECLARATION.load_params(cat, params))
    fp = cat.read("fingerprints", required=True, hint="run 'medlake fingerprint' first").sort("image_id")
    files = dict(zip(*image_files(cat).select("image_id", "file").get_columns(), strict=True))
    ids = fp["image_id"].to_list()
    vecs = None
    vs = open_vectors(cat.ws) if int(p["k"]) > 0 else None  # k = 0: no vector candidates
    if vs is not None and vs.has(p["model"]):
        got, mat = vs.load(p["model"], ids)
        if len(got) == len(ids):
            vecs = mat
        elif echo:
            echo(f"{len(ids) - len(got):,} images have no {p['model']} vector; run 'medlake embed'")
    # features on disk (a scratch folder in the lake, removed after; a killed run's is removed
    # by the next process that opens the lake), read back through a bounded cache
    scratch = temp_dir_path(cat.ws.lake / "features")
    try:
        # the features fingerprint left (same file bytes, same code) are read from its files,
        # the other images decoded here
        cached, hits = features.FeatureFiles(cat.ws.lake).matched(
            list(zip(ids, fp["sha256"].to_list(), strict=True)))
        with ExitStack() as held, features.FeatureStore(scratch) as store:
            for c in cached:
                held.enter_context(c)
            features.store_features([files[x] for x in ids], store, workers=int(p["workers"]),
                                    cached=hits)
            del hits
            for c in cached:
                c.drop_index()
            knn = None
            verifier = partial(verify_pairs, cache=verify.FeatureCache(store, CACHE_IMAGES, CACHE_BYTES),
                               workers=int(p["workers"]))
            if engine == "ray":
                from medlake.pipelines import ray_duplicates

                knn, verifier = ray_duplicates.engine(address)
            cand = candidates(fp, vecs, p, knn=knn, feats=store)
            identical = [(i, j) for (i, j), c in cand.items() if "sha256" in c["methods"]]
            todo = [(i, j) for (i, j), c in sorted(cand.items()) if "sha256" not in c["methods"]]
            strict: dict[tuple[int, int], dict[str, Any]] = {}
            checked: dict[tuple[int, int], dict[str, Any]] = {}
            while todo:  # the candidates, then each round of closure pairs (closure_pairs)
                strict.update(zip(todo, verifier([(files[ids[i]], files[ids[j]], i, j)
                                                  for i, j in todo], p), strict=True))
                checked = distinct(strict, identical, p, ids)
                todo = closure_pairs(checked, identical, cand, len(ids), int(p["closure_max"]))
                for i, j in todo:
                    cand[(i, j)] = {"methods": ["cluster"]}
            del todo, strict
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    params_json = to_json(p)
    found, n_verified = _pairs_table(cand, checked, ids, params_json)
    del cand, checked
    ext = import_external(cat, external, params_json) if external else []
    pairs = conform("pairs", pa.concat_tables([found, conform("pairs", ext, check_key=False)])
                    if ext else found)
    clusters = cluster(pl.from_arrow(pairs.select(["image_a", "image_b", "verified"]),
                                     rechunk=False), params_json)
    with cat.transaction() as tx:
        tx.write("pairs", pairs, stage=STAGE, partition="all")
        tx.write("clusters", clusters, stage=STAGE, partition="all")
    n_clu = clusters["cluster_id"].n_unique()
    counts = {"candidates": found.num_rows, "verified": n_verified, "clusters": n_clu,
              "external": len(ext)}
    return Counts(STAGE, counts, f"duplicates: {counts['candidates']:,} candidate pairs, "
                  f"{counts['verified']:,} verified, {counts['external']:,} external, "
                  f"{counts['clusters']:,} clusters")


PAIR_CHUNK = 8192  # pairs rows made as Python values at once (_pairs_table), then Arrow


def _pairs_table(cand: dict[tuple[int, int], dict], checked: dict[tuple[int, int], dict[str, Any]],
                 ids: list[str], params_json: str) -> tuple[pa.Table, int]:
    """(the ``pairs`` rows of every candidate, how many are verified): a candidate's methods
    and scores (``cand``) with its verification (``checked``; sha256 copies have none: they
    are identical). Both dicts are emptied as the rows are made, and the rows become Arrow
    columns :data:`PAIR_CHUNK` at a time: at 100k images (~270k candidates) a row per pair
    as Python values cost ~700 MB above the verification's peak."""
    parts, rows, n_verified = [], [], 0
    for i, j in sorted(cand):
        c = cand.pop((i, j))
        res = checked.pop((i, j), None) or {"verified": True, "inliers": None, "ncc": 1.0,
                                            "transform": "identical"}
        ev = res.get("evidence", {})
        if "votes" in c:
            ev = {**ev, "orb_votes": c["votes"]}
        if "low_votes" in c:
            ev = {**ev, "orb_low_votes": c["low_votes"]}
        if "window" in c:
            ev = {**ev, "window": c["window"]}
        n_verified += bool(res["verified"])
        rows.append({"image_a": ids[i], "image_b": ids[j], "method": "+".join(sorted(set(c["methods"]))),
                     "score": res["ncc"], "verified": res["verified"], "hamming": c.get("hamming"),
                     "cosine": c.get("cosine"), "inliers": res["inliers"], "ncc": res["ncc"],
                     "transform": res["transform"], "evidence": to_json(ev), "params": params_json})
        if len(rows) == PAIR_CHUNK:
            parts.append(conform("pairs", rows, check_key=False))
            rows = []
    if rows:
        parts.append(conform("pairs", rows, check_key=False))
    table = pa.concat_tables(parts) if parts else spec("pairs").schema.empty_table()
    return table, n_verified


def _clusters(checked: dict[tuple[int, int], dict[str, Any]], identical: list[tuple[int, int]],
              n: int) -> tuple[np.ndarray, dict[int, list[int]]]:
    """(component label of each of ``n`` images, the images of each component with 2+) of
    the verified pairs in ``checked`` and the sha256 copies ``identical``."""
    edges = np.array([k for k, r in checked.items() if r["verified"]] + identical,
                     dtype=np.int64).reshape(-1, 2)
    comp = _labels(edges[:, 0], edges[:, 1], n)
    members: dict[int, list[int]] = {}
    for x in np.unique(edges).tolist():
        members.setdefault(int(comp[x]), []).append(x)
    return comp, members


def _labels(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes joined by the edges (a[k], b[k])."""
    g = coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    return connected_components(g, directed=False)[1]


def distinct(checked: dict[tuple[int, int], dict[str, Any]], identical: list[tuple[int, int]],
             p: dict[str, Any], ids: list[str]) -> dict[tuple[int, int], dict[str, Any]]:
    """Coarse pairs under the ``ncc_coarse`` line accepted when they are distinct.

    At a coarse common resolution (thumbnails) the NCC needed rises towards ``ncc_coarse``
    because images that merely look alike (every chest X-ray at 30 px) agree almost as well
    as a copy. That is a property of the collection, and each pair carries its own evidence
    of it: every other image either of its two images was verified against. A coarse pair
    (common pixel >= ``COARSE_FROM``) with NCC of at least the ``distinct_ncc`` line is
    accepted when its NCC beats each image's best other comparison by ``distinct_margin``
    (an image-level ratio test: a thumbnail matched by one source clearly better than by
    anything else). Comparisons with images already verified as copies of the *other*
    image (its cluster by the strict rule, sha256 copies included) are not competitors;
    copies of the image itself are (a thumbnail has one source capture).

    The one exception to the last rule: a pair whose only competitors are copies of its own
    images (a source with verified copies matches each of them better than a new copy of
    it) is accepted when it is *consistent* with those copies: every copy of either image
    was compared with the other image and reached the distinct line there less the margin.
    A thumbnail whose source was verified but never compared with the new partner stays
    rejected (a thumbnail has one source).

    A second exception: three (or more) coarse copies of one source, each pair under the
    line, rival each other within the margin, so none would pass. A pair is accepted when
    every rival within the margin *corroborates* it: was compared with both of its images
    and reached the distinct line less the margin with each (a third copy), the other rivals
    being beaten by the margin as usual (``evidence.distinct.corroborated_by``).

    Pairs decided by the strict rule are unchanged and the result does not depend on the
    order of pairs. ``evidence.distinct`` records the margin and the competing image (or
    none), for the first exception the number of copies it was checked against, for the
    second the corroborating images.
    """
    floor = {**p, "ncc_coarse": p.get("distinct_ncc", 1.0)}
    margin = float(p.get("distinct_margin", 0.0))
    comp, members = _clusters(checked, identical, len(ids))
    seen: dict[int, list[tuple[int, float]]] = {}
    for (i, j), r in checked.items():
        if r.get("ncc") is not None:
            seen.setdefault(i, []).append((j, r["ncc"]))
            seen.setdefault(j, []).append((i, r["ncc"]))

    def rivals(i: int, j: int, copies: bool) -> list[tuple[float, int]]:
        """(NCC, image) of every comparison either image had with an image that is neither
        the other one nor a verified copy of it (nor, unless ``copies``, a verified copy of
        itself)."""
        return [(n, c) for x, y in ((i, j), (j, i)) for c, n in seen.get(x, [])
                if c != y and comp[c] != comp[y] and (copies or comp[c] != comp[x])]

    def rival(i: int, j: int, copies: bool,
              but: set[int] | frozenset[int] = frozenset()) -> tuple[float, int] | None:
        """The best of :func:`rivals`, none of ``but``."""
        got = [(n, c) for n, c in rivals(i, j, copies) if c not in but]
        return max(got) if got else None

    def agrees(c: int, x: int) -> bool:
        """c was compared with x and reached the distinct line less the margin there."""
        r = checked.get((min(c, x), max(c, x)))
        return (r is not None and r.get("ncc") is not None and r["ncc"] >= verify.threshold(
            (r.get("evidence") or {}).get("pixel", 0.0), floor) - margin)

    def corroborating(i: int, j: int, ncc: float) -> set[int] | None:
        """The rivals of (i, j) within the margin when every one of them agrees with both i
        and j (three copies of one source, each under the ncc_coarse line, rival each
        other: none would pass alone), else None."""
        close = {c for n, c in rivals(i, j, True) if ncc - n < margin}
        return close if close and all(agrees(c, i) and agrees(c, j) for c in close) else None

    def consistent(x: int, y: int) -> int | None:
        """How many copies of x ``y`` was checked against, or None when one of them was
        not compared with y or fell under the distinct line (less the margin) there."""
        n = 0
        for c in members.get(int(comp[x]), []):
            if c == x:
                continue
            if not agrees(c, y):
                return None
            n += 1
        return n

    out = dict(checked)
    for (i, j), r in checked.items():
        ev = r.get("evidence") or {}
        if (r["verified"] or r.get("ncc") is None or ev.get("pixel", 0) < verify.COARSE_FROM
                or ev.get("moved") or (ev.get("fine") or {}).get("moved")):
            continue  # fine pairs, and pairs a motion check rejected, keep their verdict
        need = verify.threshold(ev["pixel"], floor)
        if r["ncc"] < need:
            continue
        extra: dict[str, Any] = {}
        best = rival(i, j, True)
        if best is not None and r["ncc"] - best[0] < margin:
            # beaten only by copies of its own images? then it must agree with those copies
            best = rival(i, j, False)
            checks = [consistent(i, j), consistent(j, i)]
            if (best is not None and r["ncc"] - best[0] < margin) or None in checks:
                # or only by images that agree with both of its images: a third copy
                close = corroborating(i, j, r["ncc"])
                if close is None:
                    continue
                best, extra = rival(i, j, True, close), {"corroborated_by": sorted(
                    ids[c] for c in close)}
            else:
                extra = {"copies_checked": sum(checks)}
        out[(i, j)] = {**r, "verified": True, "evidence": {
            **ev, "distinct": {"threshold": round(need, 3),
                               "margin": None if best is None else round(r["ncc"] - best[0], 4),
                               "rival": None if best is None else ids[best[1]], **extra}}}
    return out


def closure_pairs(checked: dict[tuple[int, int], dict[str, Any]], identical: list[tuple[int, int]],
                  compared: dict[tuple[int, int], Any], n: int, max_size: int) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of images in one cluster that were never compared.

    A cluster joins images through verified pairs (and sha256 copies, ``identical``); two of
    its images need not have been candidates of each other: a crop squeezed to a square may
    share too few ORB buckets with its source and still be found as a copy of another copy
    of it. Comparing such pairs directly gives each its own verdict (a chain of copies is
    no proof that its ends are copies: the pair must pass on its own). Only clusters of at
    most ``max_size`` images (a few pairs each; none when under 3), and of each set of
    byte-identical images only the first (the others' comparisons would be the same).
    ``compared``: the pairs already compared (or candidates), skipped.
    """
    if max_size < 3:
        return []
    members = _clusters(checked, identical, n)[1]
    twins = {j for _, j in identical}  # a sha256 group's pairs are (first, other) and more
    out = []
    for group in members.values():
        if 3 <= len(group) <= max_size:
            firsts = [x for x in group if x not in twins]
            out += [(a, b) for a, b in itertools.combinations(firsts, 2) if (a, b) not in compared]
    return sorted(out)


def cluster(pairs: pl.DataFrame, params_json: str) -> pl.DataFrame:
    """Connected components of verified pairs: one row per image in a cluster of 2+."""
    ok = pairs.filter(pl.col("verified"))
    ids = sorted(set(ok["image_a"].to_list()) | set(ok["image_b"].to_list()))
    if not ids:
        return pl.from_arrow(spec("clusters").schema.empty_table())
    pos = {x: n for n, x in enumerate(ids)}
    a = np.array([pos[x] for x in ok["image_a"]])
    b = np.array([pos[x] for x in ok["image_b"]])
    label = _labels(a, b, len(ids))
    members: dict[int, list[str]] = {}
    for x, lab in zip(ids, label, strict=True):
        members.setdefault(int(lab), []).append(x)
    rows = []
    for m in members.values():
        cid = "dup:" + min(m)  # stable: named after its smallest image id
        ds = sorted({x.split(":", 1)[0] for x in m})
        rows += [{"image_id": x, "cluster_id": cid, "size": len(m), "datasets": ",".join(ds),
                  "params": params_json} for x in m]
    return pl.DataFrame(rows).sort("image_id")


def import_external(cat: Catalog, path: Path | str, params_json: str) -> list[dict[str, Any]]:
    """Rows of an external pair list (CSV image_a, image_b[, score]) as method 'external:<file>'."""
    path = Path(path)
    try:
        df = pl.read_csv(path, infer_schema_length=0)
    except (OSError, pl.exceptions.PolarsError) as e:
        raise CatalogError(f"duplicates: cannot read external pair list {path} ({e})") from e
    if not {"image_a", "image_b"} <= set(df.columns):
        raise CatalogError(f"{path.name}: needs columns image_a, image_b (and optionally score); "
                           f"it has {df.columns}")
    known = set(cat.read("images", columns=["image_id"])["image_id"].to_list())
    unknown = [x for x in df["image_a"].to_list() + df["image_b"].to_list() if x not in known]
    if unknown:
        raise CatalogError(f"{path.name}: {len(unknown)} image ids are not in the catalog "
                           f"(first: '{unknown[0]}'); use ids of the form dataset:native_id")
    score = df["score"].cast(pl.Float64).to_list() if "score" in df.columns else [None] * len(df)
    return [{"image_a": min(a, b), "image_b": max(a, b), "method": f"external:{path.name}",
             "score": s, "verified": True, "transform": "external", "evidence": "{}",
             "params": params_json}
            for a, b, s in zip(df["image_a"], df["image_b"], score, strict=True) if a != b]


DECLARATION = Stage(
    name=STAGE, params=Params, run=run,
    reads=("fingerprints", "images", "datasets", "embeddings"), writes=("pairs", "clusters"),
    help="Find near-duplicate pairs across every dataset, verify them and cluster them.\n\n"
         "Candidates come from sha256, perceptual hashes, ORB buckets and vector neighbours; "
         "each is checked by local-feature matching with geometric verification.",
    options=(
        click.option("--external", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     default=None, help="CSV of known pairs (image_a, image_b[, score])."),
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
                     show_default=True, help="ray: search and verification as Ray tasks."),
        click.option("--address", default=None, help="Ray head HOST:PORT (default: RAY_ADDRESS)."),
    ),
    example="medlake duplicates --ncc 0.8",
)


if __name__ == "__main__":
    from medlake.cli.main import run_stage

    run_stage("duplicates")
