"""Stage ``fingerprint``: sha256, perceptual hashes, size, mode and quality flags per image.

Reads every image of the ``images`` table (all datasets), writes one ``fingerprints`` row per
readable image and one ``quarantine`` row (stage ``fingerprint``, the decoder's error) per
unreadable one, per dataset in one transaction: images in = fingerprints + quarantined.
Quality flags follow cleanvision's checks: ``dark``, ``bright``, ``low_contrast``,
``blurry``, ``low_information``, ``tiny``, ``extreme_aspect``, ``grey_as_colour`` and, for
X-ray datasets, ``inverted_xray`` and ``rotated_xray``.

From the same decode it leaves two caches in the lake (not tables, not tracked by DVC): the
descriptor-v1 vectors for ``embed`` (:mod:`catalog.descriptors`) and the image features for
``duplicates`` (:class:`pipelines.features.FeatureFiles`).
"""

from __future__ import annotations

import functools
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import cv2
import imagehash
import numpy as np
import polars as pl
from PIL import Image

from medlake.catalog import Catalog, CatalogError, spec, to_json
from medlake.catalog.params import defaults, param, to_dict
from medlake.catalog import descriptors
from medlake.catalog.embedders import DESCRIPTOR
from medlake.catalog.imageio import ImageReadError, decode, image_pool, sha256_bytes, to_8bit
from medlake.pipelines import features
from medlake.pipelines.stage import Counts, Stage

log = logging.getLogger(__name__)
STAGE = "fingerprint"
_CHUNK = 256  # images per thread-pool batch (their features are written as each batch ends)


@dataclass(frozen=True)
class Params:
    """``params.yaml: fingerprint``: the quality-flag thresholds."""

    dark: float = param(0.12, "flag 'dark' below this mean brightness (0..1)", min=0, max=1)
    bright: float = param(0.90, "flag 'bright' above this mean brightness (0..1)", min=0, max=1)
    low_contrast: float = param(0.05, "flag 'low_contrast' below this grey-level std (0..1)",
                                min=0, max=1)
    blurry: float = param(15.0, "flag 'blurry' below this Laplacian variance", min=0)
    low_information: float = param(3.0, "flag 'low_information' below this entropy (bits)",
                                   min=0, max=16)
    tiny: int = param(64, "flag 'tiny' when the shorter side has fewer pixels", min=0)
    extreme_aspect: float = param(3.0, "flag 'extreme_aspect' above this side ratio", min=1)
    grey_tolerance: float = param(2.0, "an RGB image whose channels differ by at most this is "
                                  "'grey_as_colour'", min=0, max=255)


DEFAULTS: dict[str, Any] = defaults(Params)


def image_files(cat: Catalog, dataset_id: str | None = None, *,
                with_refused: bool = False) -> pl.DataFrame:
    """``image_id, dataset_id, sha256, modality, file`` of every image with a path, through
    the one resolver (:func:`medlake.catalog.paths.image_files`); rows whose path is refused
    (escaping the images root) are left out unless ``with_refused`` (then ``file`` is null
    and ``error`` says why)."""
    from medlake.catalog.paths import image_files as resolved

    df = resolved(cat, dataset_id)
    return df if with_refused else df.filter(pl.col("error").is_null())


def quality(im: Image.Image, *, xray: bool, p: dict[str, Any],
            pixels: np.ndarray | None = None) -> tuple[dict[str, float], list[str]]:
    """Metrics (brightness, contrast, sharpness, entropy; 0..1 or raw) and the flags they raise.

    ``pixels`` (the image as 8-bit pixels, when the caller has them) saves a conversion: RGB,
    or 2-D grey for a grey image (its RGB form's grey values are the grey values).
    """
    px = np.asarray(im.convert("RGB")) if pixels is None else pixels
    h, w = px.shape[:2]
    small = cv2.resize(px, (min(w, 256), min(h, 256)), interpolation=cv2.INTER_AREA)
    grey = small if small.ndim == 2 else cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    counts = np.bincount(grey.ravel(), minlength=256)
    hist = counts / grey.size
    nz = hist[hist > 0]
    level = np.arange(256) / 255
    mean = float(hist @ level)  # the grey levels' std from their histogram (256 terms)
    lap = cv2.Laplacian(grey, cv2.CV_32F)  # integers (|x| <= 1020): exact in float32
    m = {"brightness": _median(counts), "contrast": float(np.sqrt(hist @ (level - mean) ** 2)),
         "sharpness": float(cv2.meanStdDev(lap)[1][0, 0] ** 2),
         "entropy": float(-(nz * np.log2(nz)).sum())}
    flags = []
    if m["brightness"] < p["dark"]:
        flags.append("dark")
    if m["brightness"] > p["bright"]:
        flags.append("bright")
    if m["contrast"] < p["low_contrast"]:
        flags.append("low_contrast")
    if m["sharpness"] < p["blurry"]:
        flags.append("blurry")
    if m["entropy"] < p["low_information"]:
        flags.append("low_information")
    if min(w, h) < p["tiny"]:
        flags.append("tiny")
    if max(w, h) / max(min(w, h), 1) > p["extreme_aspect"]:
        flags.append("extreme_aspect")
    if im.mode not in ("L", "LA", "I", "I;16", "F", "1") and _channel_spread(small) <= p["grey_tolerance"]:
        flags.append("grey_as_colour")
    if xray:
        g = grey.astype(np.float64) / 255
        bw = max(2, min(g.shape) // 10)
        border = np.concatenate([g[:bw].ravel(), g[-bw:].ravel(), g[:, :bw].ravel(), g[:, -bw:].ravel()])
        centre = g[g.shape[0] // 4: 3 * g.shape[0] // 4, g.shape[1] // 4: 3 * g.shape[1] // 4]
        if border.mean() > centre.mean() + 0.1:  # air (borders) should be dark
            flags.append("inverted_xray")
        col, row = g.mean(axis=0), g.mean(axis=1)  # the spine is a vertical bright band
        def peak(prof: np.ndarray) -> float:
            n = prof.size
            return float(prof[n // 3: 2 * n // 3].max() - np.median(prof))
        if peak(row) > 1.5 * peak(col) + 0.02:
            flags.append("rotated_xray")
    return m, flags


def _channel_spread(px: np.ndarray) -> float:
    """The largest |channel - first channel| over the pixels of ``px`` (0 for a grey image,
    one plane): OpenCV's L-infinity norms of the planes, ~10x numpy's int16 difference image."""
    planes = cv2.split(px)
    return max((cv2.norm(c, planes[0], cv2.NORM_INF) for c in planes[1:]), default=0.0)


def _median(counts: np.ndarray) -> float:
    """``numpy.percentile(grey / 255, 50)`` from the counts of the 256 grey values.

    The two middle order statistics come from the cumulative counts instead of a sort; they
    are combined with numpy's own linear-interpolation formula, so the value is identical.
    """
    cum, n = np.cumsum(counts), int(counts.sum())
    lo, hi = (n - 1) // 2, n // 2  # 0-based ranks of the middle values
    a = float(np.searchsorted(cum, lo, side="right")) / 255
    b = float(np.searchsorted(cum, hi, side="right")) / 255
    return a if lo == hi else b - (b - a) * 0.5


def hexstr(h: imagehash.ImageHash) -> str:
    """``str(h)`` without imagehash's per-bit Python string building (~0.15 ms per hash).

    imagehash writes the flattened bits, most significant first, as one hexadecimal number
    padded to ``ceil(bits / 4)`` digits; for a whole number of bytes that is exactly the hex
    of the big-endian packed bits. Other sizes fall back to imagehash.
    """
    bits = np.asarray(h.hash, dtype=bool).ravel()
    return np.packbits(bits).tobytes().hex() if bits.size % 8 == 0 else str(h)


PHASH_SIDE = 32  # imagehash.phash's reduction: hash_size 8 x highfreq_factor 4
HASH_SIZES = ((PHASH_SIDE, PHASH_SIDE), (9, 8), (8, 8))  # (w, h): phash, dhash, average_hash
_PRECISION = 22  # Pillow's fixed-point weights for 8-bit images: 32 - 8 - 2 bits
_ROWS = 512  # source rows per block of the matrix products (bounds the float64 copy)


@functools.lru_cache(maxsize=64)
def _lanczos_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out x n_in) float64: Pillow's fixed-point LANCZOS weights for reducing one axis of
    ``n_in`` pixels to ``n_out`` (``precompute_coeffs`` and ``normalize_coeffs_8bpc`` of its
    Resample.c, in the same double-precision operations: the same integers).

    Vectorised (a 1024-px axis: ~0.9 ms for the three hash sizes, ~10 ms as a Python loop);
    the one order-dependent step, the sum that normalises each row, is Pillow's left-to-right
    sum (a cumulative sum). ``np.sin`` gave the same doubles as libm's ``sin`` (which Pillow
    calls) on 200,000 random arguments; the tests compare the results with Pillow itself. At
    most 64 axes are kept (up to ~1 MB each for a 4,000-px axis).
    """
    scale = float(n_in) / n_out
    fs = max(scale, 1.0)
    support, ss = 3.0 * fs, 1.0 / fs
    center = (np.arange(n_out) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # C's (int) cast
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), n_in) - xmin
    k = np.arange(math.ceil(support) * 2 + 1)
    used = k[None, :] < xmax[:, None]
    t = ((k[None, :] + xmin[:, None]) - center[:, None] + 0.5) * ss
    with np.errstate(invalid="ignore", divide="ignore"):  # sinc(0) = 1, set below
        a, b = t * math.pi, (t / 3) * math.pi
        w = np.where(t == 0.0, 1.0, np.sin(a) / a) * np.where(t == 0.0, 1.0, np.sin(b) / b)
    w = np.where(used & (t >= -3.0) & (t < 3.0), w, 0.0)
    ww = np.cumsum(w, axis=1)[:, -1]  # Pillow's sum, term by term from the left (accumulate)
    w = np.where(ww[:, None] != 0.0, w / np.where(ww == 0.0, 1.0, ww)[:, None], w)
    fixed = np.where(w < 0, -0.5 + w * (1 << _PRECISION), 0.5 + w * (1 << _PRECISION))
    out = np.zeros((n_out, n_in))
    rows, cols = np.nonzero(used)
    out[rows, xmin[rows] + cols] = np.trunc(fixed[rows, cols])  # C's (int) cast
    return out


def _clip8(acc: np.ndarray) -> np.ndarray:
    """Pillow's rounding of fixed-point sums to 8 bits: (sum + half) >> bits, clipped."""
    return np.clip(np.floor((acc + (1 << (_PRECISION - 1))) / (1 << _PRECISION)), 0, 255)


_MATRIX_FROM = 1 << 18  # pixels (512 x 512) from which the matrix path pays even for new sizes
_SEEN: set[int] = set()  # side lengths met by lanczos_reductions (bounded by _seen)


def _seen(sides: tuple[int, int]) -> None:
    if len(_SEEN) > 4096:  # a bound, not a cache: forgetting only sends images to Pillow
        _SEEN.clear()
    _SEEN.update(sides)


def _rows_first(px: np.ndarray, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Pillow's two LANCZOS passes of ``px`` (2-D uint8) to each ``(w, h)`` of ``sizes``, the
    pass along each row first: one product for all sizes' first pass ([rows x sum(w)], block
    by block of :data:`_ROWS` source rows), then each size's pass along the columns."""
    rows, cols = px.shape
    cw = np.concatenate([_lanczos_weights(cols, w) for w, _ in sizes]).T
    part = np.concatenate([_clip8(px[r:r + _ROWS].astype(np.float64) @ cw)
                           for r in range(0, rows, _ROWS)])
    out, col = [], 0
    for w, h in sizes:
        t = part[:, col:col + w]
        col += w
        out.append((t if h == rows else _clip8(_lanczos_weights(rows, h) @ t)).astype(np.uint8))
    return out


def lanczos_reductions(grey: Image.Image, sizes: tuple[tuple[int, int], ...] = HASH_SIZES
                       ) -> list[np.ndarray]:
    """``np.asarray(grey.resize(size, LANCZOS))`` for each ``(w, h)`` of ``sizes``, the same
    bytes, from one pass over the pixels.

    Pillow resamples 8-bit images in two separable passes of integer weights, rounding to 8 bits
    after each; Pillow 13 runs the vertical pass first when ``h_in - h > 2 (w_in - w)``
    (measured on 1,450 random reductions, all equal; ``test_lanczos_reductions_are_pillows``
    checks it on tall, wide and square images, either side of the rule). Here each pass is a matrix product in float64,
    exact because every term is an integer below 2**53, and the passes of all sizes that
    start on the same axis share one product: at 640-1024 px the three hash reductions took
    ~7 ms as three Pillow resizes and ~2.7 ms here. A size that enlarges either axis, or
    equals the image, goes to Pillow; so does a small image (under :data:`_MATRIX_FROM`
    pixels) whose side lengths were not met before: building an axis's weights (~0.7 ms at
    256 px) costs more than Pillow's resizes there, and pays off from the second image of
    that size.
    """
    img_h, img_w = grey.height, grey.width
    known = img_w in _SEEN and img_h in _SEEN
    _seen((img_w, img_h))
    pillow = not known and img_w * img_h < _MATRIX_FROM
    out: list[np.ndarray | None] = [None] * len(sizes)
    first: dict[str, list[int]] = {"h": [], "v": []}
    for i, (w, h) in enumerate(sizes):
        if pillow or w > img_w or h > img_h or (w, h) == (img_w, img_h):
            out[i] = np.asarray(grey.resize((w, h), Image.Resampling.LANCZOS))
        else:
            first["v" if img_h - h > 2 * (img_w - w) else "h"].append(i)
    px = np.asarray(grey)
    for axis, ids in first.items():
        if not ids:
            continue
        if axis == "h":
            got = _rows_first(px, [sizes[i] for i in ids])
        else:  # the vertical pass first: the horizontal-first passes of the transposed image
            got = [np.ascontiguousarray(g.T)
                   for g in _rows_first(px.T, [(h, w) for w, h in (sizes[i] for i in ids)])]
        for i, g in zip(ids, got, strict=True):
            out[i] = g
    return out  # type: ignore[return-value]


def _dct_low(pixels: np.ndarray) -> np.ndarray:
    """imagehash.phash's 8 x 8 lowest frequencies of the 2-D DCT of its reduced image."""
    import scipy.fftpack  # as imagehash itself does

    return scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)[:8, :8]


def _above_median(dct: np.ndarray) -> str:
    """The hash imagehash.phash makes of ``dct`` (each coefficient above their median), as
    :func:`hexstr` writes it."""
    return hexstr(imagehash.ImageHash(dct > np.median(dct)))


def small_hashes(grey: Image.Image) -> dict[str, str]:
    """``phash``, ``phash_sym``, ``dhash`` and ``ahash`` of ``grey`` (8-bit grey) from its
    three reductions (:func:`lanczos_reductions`): pHash, dHash and aHash are imagehash's
    (``str(imagehash.phash(grey))`` etc.).

    ``phash_sym`` is the pHash of the 32 x 32 LANCZOS reduction averaged with its own mirror
    image: the same for an image and its left-right mirror (Pillow resamples 8-bit images in
    integer arithmetic with mirror-symmetric weights, so the reduction of a mirror is the
    mirror of the reduction, exactly). Its DCT is even along x: the odd x-frequencies are set
    to exactly 0 (not left to the transform's rounding), so those bits are 0 and the others
    are the image's. Averaging the reduction instead of the whole image saves a second
    full-resolution resize and the mirrored copy (interleaved runs at 640-1024 px:
    ~20.3 -> ~17.2 ms per image for the stage).
    """
    small, d, a = lanczos_reductions(grey)
    sym = _dct_low((small.astype(np.float64) + small[:, ::-1]) / 2)
    sym[:, 1::2] = 0.0
    return {"phash": _above_median(_dct_low(small)), "phash_sym": _above_median(sym),
            "dhash": hexstr(imagehash.ImageHash(d[:, 1:] > d[:, :-1])),
            "ahash": hexstr(imagehash.ImageHash(a > np.mean(a)))}


def whash(grey: Image.Image, hash_size: int = 8) -> str:
    """``str(imagehash.whash(grey))`` (Haar, lowest frequency removed) without the wavelet passes.

    With Haar filters on a power-of-two square, removing the deepest LL coefficient subtracts
    the mean, and the LL band ``k`` levels down is each ``2**k`` block's sum over ``2**k``: an
    increasing function of the block's integer pixel sum. So the hash bit (LL above the
    median of the LL band) is "block sum above the median block sum", decided exactly on
    integers. Only when the two middle sums tie can imagehash's floating-point rounding go
    either way; then imagehash itself computes it.
    """
    scale = max(2 ** int(np.log2(min(grey.size))), hash_size)
    block = scale // hash_size
    px = np.asarray(grey.resize((scale, scale), Image.Resampling.LANCZOS), dtype=np.int64)
    sums = px.reshape(hash_size, block, hash_size, block).sum(axis=(1, 3))
    order = np.sort(sums, axis=None)
    mid = sums.size // 2
    if order[mid - 1] == order[mid]:
        return hexstr(imagehash.whash(grey, hash_size=hash_size))
    return hexstr(imagehash.ImageHash(sums >= order[mid]))


def _one(row: dict[str, Any], p: dict[str, Any], root: Path, *,
         vector: bool = False, feats: bool = False) -> dict[str, Any]:
    """The fingerprint row of one image (``error`` and ``detail`` when it cannot be read);
    with ``vector``, also its descriptor-v1 vector (``_vector``, for embed's cache); with
    ``feats``, its duplicates features (``_features``, :class:`pipelines.features.FeatureFiles`)."""
    if row.get("error"):  # refused by the path resolver
        return {"error": row["error"], "detail": f"{row.get('path')}: {row['error']}"}
    try:
        path = Path(row["file"])
        if not path.is_file():
            raise ImageReadError(row["file"], "missing file")
        data = path.read_bytes()
        im = decode(data, path)  # decoded once; load_rgb would decode the file again
        px = to_8bit(im)  # RGB, or grey for a grey file (the same hashes and metrics)
    except (ImageReadError, OSError) as e:
        return {"error": getattr(e, "reason", "unreadable file"), "detail": str(e)}
    arr = np.asarray(px)  # once: an RGB image's array is a copy (~1 ms at 1024 x 768)
    vec = None
    if vector:  # a cache for embed: a failure here only leaves embed to decode the file
        try:
            vec = descriptors.descriptor(data, path, im, px, arr)
        except Exception:  # embed decodes the file again and reports what it finds
            log.debug("descriptor of %s left to embed", path, exc_info=True)
    got = None
    if feats:  # a cache for duplicates: a failure here only leaves duplicates to decode it
        try:
            got = features.features_of(*features.feature_input(data, path, im, px, arr))
        except Exception:  # duplicates decodes the file again and reports what it finds
            log.debug("features of %s left to duplicates", path, exc_info=True)
    grey = px.convert("L")  # every imagehash hash starts with convert("L"): do it once
    hashes = small_hashes(grey)
    xray = str(row.get("modality") or "").lower() in ("cxr", "xr", "dx", "cr", "x-ray", "xray")
    metrics, flags = quality(im, xray=xray, p=p, pixels=arr)
    return {
        "image_id": row["image_id"], "dataset_id": row["dataset_id"], "sha256": sha256_bytes(data),
        "width": px.width, "height": px.height, "mode": im.mode, "format": im.format or "",
        "bytes": len(data), "phash": hashes["phash"], "dhash": hashes["dhash"],
        "ahash": hashes["ahash"], "whash": whash(grey), "phash_sym": hashes["phash_sym"],
        **metrics, "flags": ",".join(flags),
        "params": to_json(p), **({} if vec is None else {"_vector": vec}),
        **({} if got is None else {"_features": got}),
    }


def run(cat: Catalog, params: Params | dict[str, Any] | None = None, *,
        dataset_id: str | None = None, workers: int = 2, echo: Any = None) -> Counts:
    """Fingerprint every image (of one dataset, or all) and publish per dataset.

    Parameters
    ----------
    cat : Catalog
    dataset_id : str, optional
        Only this dataset (default: every dataset with images).
    params : Params or dict, optional
        Thresholds; default ``params.yaml: fingerprint``.
    workers : int
        Threads decoding in parallel (Pillow and numpy release the GIL).

    Returns
    -------
    Counts
        ``{"images": n, "fingerprinted": n, "quarantined": n}``.
    """
    p = to_dict(DECLARATION.load_params(cat, params))
    files = image_files(cat, dataset_id, with_refused=True)
    if dataset_id and files.is_empty():
        raise CatalogError(f"fingerprint: dataset '{dataset_id}' has no images with a path")
    rows = files.to_dicts()
    # embed's descriptor-v1 vectors from this decode (catalog.descriptors), when embed uses it
    vector = cat.ws.param("embed.model", DESCRIPTOR) == DESCRIPTOR
    cache = features.FeatureFiles(cat.ws.lake)
    writers: dict[str, features.FeatureWriter] = {}  # duplicates' features, per dataset
    try:
        results = _fingerprinted(rows, lambda r: _one(r, p, cat.ws.root, vector=vector, feats=True),
                                 workers, cache, writers)
        return _publish(cat, rows, results, vector, cache, writers, echo)
    finally:
        for w in writers.values():  # committed ones are gone already
            w.discard()


def _fingerprinted(rows: list[dict[str, Any]], one: Any, workers: int,
                   cache: features.FeatureFiles, writers: dict[str, features.FeatureWriter]
                   ) -> list[dict[str, Any]]:
    """``one(row)`` of every row on a thread pool, :data:`_CHUNK` rows at a time; each
    result's ``_features`` goes to its dataset's writer as it comes (never held)."""
    results = []
    with image_pool(), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for s in range(0, len(rows), _CHUNK):
            part = rows[s:s + _CHUNK]
            for r, res in zip(part, pool.map(one, part), strict=True):
                f = res.pop("_features", None)
                if f is not None:
                    ds = r["dataset_id"]
                    if ds not in writers:
                        writers[ds] = cache.writer(ds)
                    writers[ds].add(r["image_id"], res["sha256"], f)
                results.append(res)
    return results


def _publish(cat: Catalog, rows: list[dict[str, Any]], results: list[dict[str, Any]],
             vector: bool, cache: features.FeatureFiles,
             writers: dict[str, features.FeatureWriter], echo: Any) -> Counts:
    """Write the tables, then the caches (descriptors for embed, features for duplicates)."""
    counts = {"images": len(rows), "fingerprinted": 0, "quarantined": 0}
    by_ds: dict[str, tuple[list, list, list]] = {}
    for r, res in zip(rows, results, strict=True):
        good, bad, vecs = by_ds.setdefault(r["dataset_id"], ([], [], []))
        if "error" in res:
            bad.append({"stage": STAGE, "dataset_id": r["dataset_id"], "file": r["path"], "row": 0,
                        "item": r["image_id"], "reason": res["error"], "detail": res["detail"]})
        else:
            vecs.append(res.pop("_vector", None))
            good.append(res)
    with cat.transaction() as tx:
        for ds, (good, bad, _) in sorted(by_ds.items()):
            tx.write("fingerprints", good or spec("fingerprints").schema.empty_table(), stage=STAGE, partition=ds)
            tx.write("quarantine", bad or spec("quarantine").schema.empty_table(), stage=STAGE, partition=ds)
            counts["fingerprinted"] += len(good)
            counts["quarantined"] += len(bad)
            if echo:
                echo(f"{ds}: {len(good):,} fingerprinted, {len(bad):,} quarantined")
    if vector:  # after the tables are published (a cache: embed decodes what it lacks)
        cache_d = descriptors.DescriptorCache(cat.ws.lake)
        for ds, (good, _, vecs) in sorted(by_ds.items()):
            have = [(r, v) for r, v in zip(good, vecs, strict=True) if v is not None]
            cache_d.write(ds, [r["image_id"] for r, _ in have], [r["sha256"] for r, _ in have],
                          [v for _, v in have])
    for ds in sorted(by_ds):  # after the tables too; a dataset without any: its file removed
        if ds in writers:
            writers.pop(ds).commit()
        else:
            cache.remove(ds)
    if counts["fingerprinted"] + counts["quarantined"] != counts["images"]:
        raise CatalogError("fingerprint: rows in != rows out + quarantined (a bug; please report)")
    return Counts(STAGE, counts, f"fingerprint: {counts['images']:,} images, "
                  f"{counts['fingerprinted']:,} fingerprinted, {counts['quarantined']:,} quarantined")


DECLARATION = Stage(
    name=STAGE, params=Params, run=run,
    reads=("images", "datasets"), writes=("fingerprints", "quarantine"),
    help="Fingerprint every image: sha256, perceptual hashes, size, mode and quality flags.\n\n"
         "Unreadable images go to the quarantine table (stage 'fingerprint') with the "
         "decoder's reason. From the same decode it also computes the image features "
         "'medlake duplicates' reads (lake/cache/features-v1-*, ~100 KB per image; safe to "
         "delete: duplicates then decodes the files itself).",
    options=(click.option("--dataset", "dataset_id", help="Only this dataset (default: all)."),
             click.option("--workers", type=int, default=2, show_default=True,
                          help="Threads decoding images in parallel.")),
    example="medlake fingerprint --dark 0.08",
)


if __name__ == "__main__":
    from medlake.cli.main import run_stage

    run_stage("fingerprint")
