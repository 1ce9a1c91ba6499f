"""ORB features for ``duplicates``: candidate retrieval by hashed descriptors, and verification.

Retrieval (:func:`orb_pairs`): every image's ORB descriptors (of the image and of its mirror)
are bucketed by random 28-bit subsets (locality-sensitive hashing of binary descriptors);
images sharing many buckets are candidates. Copies share local detail even when cropped,
rotated, mirrored or rescaled, which global descriptors and perceptual hashes lose.

Verification (:func:`verify`): ORB + RANSAC similarity, then fine-detail correlation.
A near duplicate is one picture changed by a similarity transform (crop, resize, rotation,
mirror) and a monotonic intensity change (JPEG, relighting): after alignment its band-pass
detail correlates with its source. A repeat capture of the same lesion or patient has the
same anatomy but its own noise, hairs, markers and pose, so the correlation stays low.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import cv2
import numpy as np

from medlake.catalog.imageio import ImageReadError, load_rgb

SIDE = 256
NFEATURES = 300  # ORB keypoints per image (and per mirror image)
_LOCAL = threading.local()  # one ORB detector per thread (cv2 objects are not shared safely)


def features(path: str) -> dict[str, Any] | None:
    """Grey 256-px equalised image and ORB keypoints/descriptors of it and its mirror.

    Keypoints are detected once; the mirror's are the same keypoints reflected (position per
    pyramid level, angle ``180 - angle``) with descriptors computed on the mirrored image,
    which is what detecting on the mirror finds (FAST, Harris and the intensity centroid are
    mirror-symmetric) at about a third of the cost. Returns None when the file cannot be
    decoded.
    """
    if not hasattr(_LOCAL, "orb"):
        _LOCAL.orb = cv2.ORB_create(nfeatures=NFEATURES, edgeThreshold=15, patchSize=15,
                                    fastThreshold=8)
    try:
        rgb = np.asarray(load_rgb(path))
    except (ImageReadError, OSError):
        return None
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = grey.shape
    up = SIDE / max(h, w)
    g = cv2.resize(grey, (max(8, round(w * up)), max(8, round(h * up))), interpolation=cv2.INTER_AREA if up < 1 else cv2.INTER_LINEAR)
    eq = cv2.equalizeHist(g)
    out = {"g": eq, "up": max(up, 1.0)}  # uint8 (64 KB per image); float32 only while in use
    orb = _LOCAL.orb
    kp, des = orb.detectAndCompute(eq, None)
    out["n"] = _strongest(kp, des)
    if des is None:
        out["m"] = (np.zeros((0, 2), np.float32), None)
        return out
    mirrored = np.ascontiguousarray(eq[:, ::-1])
    kpm, desm = orb.compute(mirrored, _reflect(kp, eq.shape[1], orb.getScaleFactor()))
    out["m"] = _strongest(kpm, desm)
    return out


def _reflect(kp: Any, width: int, scale_factor: float) -> list[cv2.KeyPoint]:
    """Keypoints mirrored left-right, exactly as ORB places them on the mirrored image.

    A keypoint of pyramid level ``o`` sits at ``x_o * s`` (``s = scale_factor ** o``) in the
    level of width ``round(width / s)``; its mirror is at ``(round(width / s) - 1 - x_o) * s``.
    """
    out = []
    for k in kp:
        s = scale_factor ** k.octave
        out.append(cv2.KeyPoint((round(width / s) - 1) * s - k.pt[0], k.pt[1], k.size,
                                (180.0 - k.angle) % 360.0, k.response, k.octave, k.class_id))
    return out


def _strongest(kp: Any, des: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(points, descriptors), strongest response first (stable order among equals)."""
    order = np.argsort([-k.response for k in kp], kind="stable")
    return (np.float32([kp[i].pt for i in order]).reshape(-1, 2),
            None if des is None else des[order])


def features_many(files: list[str], *, workers: int = 2) -> list[dict[str, Any] | None]:
    """:func:`features` of each file, computed in a thread pool (OpenCV releases the GIL)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(features, files))


@contextmanager
def opencv_single_threaded() -> Iterator[None]:
    """OpenCV's own thread pool off inside the block (restored after).

    When our thread pool already runs one pair per core, OpenCV's parallel loops on small
    images only add threads that spin: about 5% more CPU time per verified pair (measured
    on 5k images, same run).
    """
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def _bits(desc: np.ndarray, picks: list[np.ndarray], chunk: int = 32768) -> np.ndarray:
    """Integer keys (n, tables) of packed 256-bit descriptors from the bits at each ``picks``.

    Key bit ``n`` of a table is descriptor bit ``picks[t][n]`` (bits numbered from the most
    significant bit of byte 0). The keys come from one float32 matrix product per chunk of
    unpacked bits, 16 key bits per output column (exact: sums of distinct powers of two below
    2**16), the columns then shifted into place as integers.
    """
    piece = 16
    cols = [(t, lo) for t, pk in enumerate(picks) for lo in range(0, len(pk), piece)]
    weights = np.zeros((desc.shape[1] * 8, len(cols)), dtype=np.float32)
    for c, (t, lo) in enumerate(cols):
        sel = picks[t][lo:lo + piece]
        weights[sel, c] = 2.0 ** np.arange(len(sel))
    out = np.zeros((len(desc), len(picks)), dtype=np.int64)
    for s in range(0, len(desc), chunk):
        part = (np.unpackbits(desc[s:s + chunk], axis=1).astype(np.float32) @ weights).astype(np.int64)
        for c, (t, lo) in enumerate(cols):
            out[s:s + chunk, t] |= part[:, c] << lo
    return out


def orb_pairs(feats: list[dict[str, Any] | None], *, k: int = 5, min_votes: int = 4,
              tables: int = 16, bits: int = 28, per_image: int = 300,
              max_bucket: int = 32, seed: int = 0) -> np.ndarray:
    """Candidate pairs (i, j, votes), i < j, from shared ORB-descriptor buckets.

    Each of ``tables`` hash tables keys every descriptor (``per_image`` strongest of the image
    and of its mirror) by ``bits`` random bits; two images get one vote per bucket they share
    (buckets with more than ``max_bucket`` images are ignored: flat, common patterns). A pair
    is kept when it has ``min_votes`` votes and is among the ``k`` best of either image.
    Memory is O(descriptors); pairs come only from shared buckets, never all N x N.
    """
    n = len(feats)
    owners, descs = [], []
    for i, f in enumerate(feats):
        for tag in ("n", "m"):
            d = None if f is None else f[tag][1]
            if d is not None and len(d):
                descs.append(d[:per_image])
                owners.append(np.full(min(len(d), per_image), i, dtype=np.int64))
    if not descs:
        return np.zeros((0, 3), dtype=np.int64)
    desc, owner = np.concatenate(descs), np.concatenate(owners)
    rng = np.random.default_rng(seed)
    keys = _bits(desc, [rng.choice(256, size=bits, replace=False) for _ in range(tables)])
    shift = max(1, int(n).bit_length())
    code_t = np.uint32 if n * n < 2**32 else np.int64  # pair codes i * n + j; 32 bits sort faster
    keys = np.ascontiguousarray(keys.T)  # one contiguous row per table
    codes = []
    for t in range(tables):
        both = np.sort((keys[t] << shift) | owner)  # by key, then owner (one int64 sort)
        both = both[np.r_[True, both[1:] != both[:-1]]]  # one vote per image and bucket
        ks = both >> shift
        same = ks[1:] == ks[:-1]
        shared = np.r_[same, False] | np.r_[False, same]  # buckets of 2+ images only
        ks, os_ = ks[shared], (both[shared] & ((1 << shift) - 1)).astype(code_t)
        starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
        sizes = np.diff(np.r_[starts, len(ks)])
        for s in np.unique(sizes[(sizes >= 2) & (sizes <= max_bucket)]):
            members = os_[starts[sizes == s][:, None] + np.arange(s)]
            a, b = np.triu_indices(int(s), 1)
            codes.append(members[:, a].ravel() * code_t(n) + members[:, b].ravel())
    if not codes:
        return np.zeros((0, 3), dtype=np.int64)
    every = np.concatenate(codes)
    every.sort()  # in place; counting runs equals numpy.unique(return_counts=True) without copies
    edge = np.flatnonzero(np.r_[True, every[1:] != every[:-1]])
    uniq, votes = every[edge].astype(np.int64), np.diff(np.r_[edge, len(every)])
    good = votes >= min_votes
    i, j, v = uniq[good] // n, uniq[good] % n, votes[good]
    # rank of each pair among each image's candidates (by votes, descending)
    both_i, both_v = np.r_[i, j], np.r_[v, v]
    order = np.lexsort((-both_v, both_i))
    grp_start = np.r_[0, np.flatnonzero(np.diff(both_i[order])) + 1]
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - np.repeat(grp_start, np.diff(np.r_[grp_start, len(order)]))
    keep = (rank[: len(i)] < k) | (rank[len(i):] < k)
    return np.stack([i[keep], j[keep], v[keep]], axis=1)


def _bandpass(g: np.ndarray, s1: float) -> np.ndarray:
    return cv2.GaussianBlur(g, (0, 0), s1) - cv2.GaussianBlur(g, (0, 0), 3 * s1)


def _band(f: dict[str, Any], s1: float, mirror: bool) -> np.ndarray:
    """Band-pass of a cached image (and of its mirror), kept in the cache per sigma."""
    key = ("bp", round(s1, 3), mirror)
    if key not in f:  # a benign race between threads computes the same array twice
        g = f["g"].astype(np.float32)
        f[key] = _bandpass(np.ascontiguousarray(g[:, ::-1]) if mirror else g, s1)
    return f[key]


def _match(pb: np.ndarray, db: np.ndarray, pa: np.ndarray, da: np.ndarray,
           ratio: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Point pairs (b, a) of descriptors passing Lowe's ratio test (2 nearest by Hamming)."""
    dist, idx = cv2.batchDistance(db, da, -1, normType=cv2.NORM_HAMMING, K=2)
    good = dist[:, 0] < ratio * dist[:, 1]
    return pb[good], pa[idx[good, 0]]


def verify(file_a: str, file_b: str, *, cache: dict[Any, Any], keys: tuple[Any, Any],
           p: dict[str, Any]) -> dict[str, Any]:
    """``verified``, ``inliers``, ``ncc``, ``transform`` (e.g. 'mirror,rot=-7,scale=0.45')."""
    for k, f in zip(keys, (file_a, file_b), strict=True):
        if k not in cache:
            cache[k] = features(f)
    fa, fb = cache[keys[0]], cache[keys[1]]
    none = {"verified": False, "inliers": 0, "ncc": None, "transform": ""}
    if fa is None or fb is None or fb["n"][1] is None:
        return {**none, "evidence": {"error": "unreadable image"}}
    best = None
    top = int(p.get("match_features", NFEATURES))  # the strongest keypoints take part
    pb, db = fb["n"][0][:top], fb["n"][1][:top]
    for tag in ("n", "m"):
        pa, da = fa[tag][0][:top], (None if fa[tag][1] is None else fa[tag][1][:top])
        if da is None or len(da) < 2 or len(db) < 2:
            continue
        src, dst = _match(pb, db, pa, da)
        if len(src) < max(4, int(p["min_inliers"])):
            continue
        M, inl = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=4.0)
        n_in = int(inl.sum()) if inl is not None else 0
        if M is not None and (best is None or n_in > best[1]):
            best = (tag, n_in, M)
    if best is None:
        return none
    tag, n_in, M = best
    scale = float(np.sqrt(abs(np.linalg.det(M[:, :2]))))
    angle = float(np.degrees(np.arctan2(M[1, 0], M[0, 0])))
    desc = f"{'mirror,' if tag == 'm' else ''}rot={angle:+.0f},scale={scale:.2f}"
    res = {"verified": False, "inliers": n_in, "ncc": None, "transform": desc}
    if n_in < int(p["min_inliers"]) or not 0.2 < scale < 5:
        return res
    h, w = fa["g"].shape
    warped = cv2.warpAffine(fb["g"].astype(np.float32), M, (w, h), flags=cv2.INTER_LINEAR,
                            borderValue=0)
    mask = cv2.warpAffine(np.ones_like(fb["g"], dtype=np.uint8), M, (w, h), flags=cv2.INTER_NEAREST)
    mask = cv2.erode(mask, np.ones((7, 7), np.uint8)) > 0
    if mask.sum() < 0.1 * h * w:
        return res
    s1 = max(1.0, 0.7 * max(fa["up"], fb["up"] / max(scale, 1e-3)))
    xa, xb = _band(fa, s1, tag == "m")[mask], _bandpass(warped, s1)[mask]
    xa, xb = xa - xa.mean(), xb - xb.mean()
    ncc = float((xa * xb).sum() / max(np.sqrt((xa**2).sum() * (xb**2).sum()), 1e-9))
    return {**res, "ncc": ncc, "verified": ncc >= float(p["ncc"]),
            "evidence": {"inliers": n_in, "ncc": round(ncc, 4), "band_sigma": round(s1, 2)}}
