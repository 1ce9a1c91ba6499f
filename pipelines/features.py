"""Image features for ``duplicates``: one decode per image, kept on disk.

:func:`features` decodes an image once (a large JPEG at a reduced DCT scale) and gives its
equalised grey 256-px frame and ORB keypoints/descriptors of it and its mirror, and of its
*low renditions* (:func:`_low`, :func:`_stretched`): what :mod:`pipelines.verify` buckets
(candidates) and compares (verification). :class:`FeatureStore` keeps many images' features
in one file.

``fingerprint`` decodes every image in full already: it computes each image's features from
that decode (:func:`features_of`; a large JPEG is decoded again at the reduced scale, as
:func:`features` does) and leaves them in the lake's cache (:class:`FeatureFiles`), where
``duplicates`` takes them instead of decoding the file again. The features are the same
either way (tests/test_feature_cache.py), so this is a cache: not tracked by DVC, safe to
delete. Its folder is named after this module's code and the decoders'
(:func:`medlake.catalog.descriptors.code_tag`); an entry is keyed by (image_id, sha256).
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import sys
import threading
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import cv2
import numpy as np
from PIL import Image

from medlake.catalog import descriptors, dicom, imageio
from medlake.catalog.imageio import (ImageReadError, decode, full_size, image_pool, load_8bit,
                                   reduces, to_8bit)
from medlake.catalog.tables import safe_name, temp_dir_path

SIDE = 256
NFEATURES = 300  # ORB keypoints per image (and per mirror image)
# FAST threshold of the 256-px frame's ORB: ORB keeps the 2 x NFEATURES best FAST corners per
# pyramid level before Harris, and these have scores far above it; measured on 1,500 frames of
# the 5k bench set, 98.6% get the very keypoints of threshold 8 (Jaccard 0.997), detection
# ~35% cheaper (fewer weak corners to score). The low renditions keep 8: at 96 px they have
# fewer corners than that per level, and every threshold above 8 changed them.
FAST_THRESHOLD = 12
LOW_SIDE, LOW_GRID = 48, 96  # low rendition: long side reduced to 48 px, ORB at 96 px
MID_SIDE, MID_GRID = 64, 128  # mid rendition: long side reduced to 64 px, ORB at 128 px
STRETCH_SIDE = 128  # images up to this longer side also get low renditions stretched by STRETCH
STRETCH = (2 ** 0.5, 2 ** -0.5)  # width / height factors (undo a crop squeezed to a square)
TINY = 32  # the tiny colour rendition: the whole image area-reduced to TINY x TINY, CIELAB

_LOCAL = threading.local()  # one ORB detector per thread (cv2 objects are not shared safely)


def features(path: str, *, low: bool = True, reduced: bool = True) -> dict[str, Any] | None:
    """Grey 256-px equalised image and ORB keypoints/descriptors of it and its mirror.

    Keypoints are detected once; the mirror's are the same keypoints reflected (position per
    pyramid level, angle ``180 - angle``) with descriptors computed on the mirrored image,
    which is what detecting on the mirror finds (FAST, Harris and the intensity centroid are
    mirror-symmetric) at about a third of the cost. With ``low``, also ``lo``/``lom``: ORB
    of the low rendition and its mirror (:func:`_low`), and ``mi``/``mim``: of the mid
    rendition (:data:`MID_SIDE` px, ORB at :data:`MID_GRID`: ``duplicates.orb_mid`` buckets
    both together, so a crop magnified 1.5-2.5x meets its source at the crop's scale),
    points in the 256-px frame; ``c``: the tiny colour rendition (:func:`tiny`, what
    :mod:`pipelines.windows` searches for a thumbnail's source). ``side``
    is the image's longer side in pixels, ``up`` its upsampling to the 256-px frame (>= 1).
    ``reduced`` (default): a large JPEG is decoded at a reduced DCT scale (>= 512 px on its
    shorter side; :func:`medlake.catalog.imageio.open_image`); False decodes every pixel.
    A large image's finer frame for :func:`verify`'s second comparison is not made here
    (:func:`fine_frame`: only the few images of such pairs need it).
    Returns None when the file cannot be decoded.
    """
    got = _grey(path, reduced)
    return None if got is None else features_of(*got, low=low)


def features_of(grey: np.ndarray, full: tuple[int, int], pixels: np.ndarray | None = None, *,
                low: bool = True) -> dict[str, Any]:
    """:func:`features` of an image already decoded: ``grey`` its 8-bit grey pixels, ``full``
    (h, w) of the whole image, ``pixels`` its 8-bit RGB (or grey) pixels for the tiny colour
    rendition (None: ``grey``'s; :func:`feature_input` or :func:`_grey` give all three)."""
    if not hasattr(_LOCAL, "orb"):
        _LOCAL.orb = cv2.ORB_create(nfeatures=NFEATURES, edgeThreshold=15, patchSize=15,
                                    fastThreshold=FAST_THRESHOLD)
    h, w = full
    eq = _resampled(grey, (h, w), SIDE)
    out = {"g": eq, "up": max(SIDE / max(h, w), 1.0), "side": max(h, w)}  # g: 64 KB per image
    out["n"], out["m"] = _orb_both(_LOCAL.orb, eq)
    out["c"] = tiny(grey if pixels is None else pixels)
    if low:
        out["lo"], out["lom"] = _low(grey, eq.shape, (h, w))
        if max(h, w) > MID_GRID:  # a thumbnail's mid rendition is only its low one enlarged
            out["mi"], out["mim"] = _low(grey, eq.shape, (h, w), side=MID_SIDE, grid=MID_GRID)
        if max(h, w) <= STRETCH_SIDE:  # a thumbnail may be a crop squeezed to its shape
            out["lx"], out["lxm"] = _stretched(grey, eq.shape, (h, w))
    return out


def tiny(pixels: np.ndarray) -> np.ndarray:
    """The tiny colour rendition of 8-bit RGB or grey ``pixels``: the whole image area-reduced
    to :data:`TINY` x :data:`TINY` (its aspect not kept), in 8-bit CIELAB (a grey image's
    chroma is flat), uint8 (TINY, TINY, 3): 3 KB per image."""
    x = np.ascontiguousarray(pixels)
    h, w = x.shape[:2]
    f = min(h, w) // (2 * TINY)
    if f >= 6:  # area-reduced by a whole factor first (~4x cheaper at 600 x 800: OpenCV's
        # INTER_AREA is slow at other factors), the last rows and columns left out
        x = cv2.resize(x[: h - h % f, : w - w % f], (w // f, h // f), interpolation=cv2.INTER_AREA)
    x = cv2.resize(x, (TINY, TINY), interpolation=cv2.INTER_AREA)
    if x.ndim == 2:
        x = cv2.cvtColor(x, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(x[..., :3], cv2.COLOR_RGB2LAB)


Decoded = tuple[np.ndarray, tuple[int, int], np.ndarray]  # grey, (h, w), 8-bit RGB or grey


def _grey(path: str, reduced: bool = True) -> Decoded | None:
    """(8-bit grey pixels, (h, w) of the whole image, 8-bit RGB or grey pixels) of the file as
    :func:`features` decodes it; None when it cannot be decoded."""
    try:  # grey files stay grey (the same values, no RGB copy); a large JPEG is decoded at
        # a DCT scale that keeps >= 512 px on its shorter side (area-reduced to the frame after)
        im = load_8bit(path, min_side=2 * SIDE if reduced else None)
    except (ImageReadError, OSError):
        return None
    return _grey_of(im, im)


def _grey_of(px: Image.Image, im: Image.Image, arr: np.ndarray | None = None) -> Decoded:
    """(8-bit grey pixels of ``px``, (h, w) of the whole image ``im``, ``px``'s pixels): ``px``
    is ``im``'s 8-bit form (:func:`~medlake.catalog.imageio.to_8bit`), ``arr`` its pixels when
    the caller has them (``np.asarray`` of an RGB image copies it: ~1 ms at 1024 x 768)."""
    arr = np.asarray(px) if arr is None else arr
    w, h = full_size(im)
    return (arr if arr.ndim == 2 else cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)), (h, w), arr


def feature_input(data: bytes, path: Path | str, im: Image.Image, px: Image.Image,
                  arr: np.ndarray | None = None) -> Decoded:
    """What :func:`_grey` gives for this file (the pixels :func:`features` starts from), from
    ``fingerprint``'s full decode ``im`` and its 8-bit form ``px`` when they are the same:
    every file but a JPEG large enough to be decoded at a reduced DCT scale
    (:func:`~medlake.catalog.imageio.reduces`), which is decoded again that way from
    ``data`` (cheap: 1/2-1/8 scale). ``arr``: ``np.asarray(px)`` when the caller has it."""
    if reduces(im, 2 * SIDE):
        im = decode(data, path, min_side=2 * SIDE)
        return _grey_of(to_8bit(im), im)
    return _grey_of(px, im, arr)


def _resampled(grey: np.ndarray, full: tuple[int, int], side: int) -> np.ndarray:
    """``grey`` (a decode of an image of (h, w) ``full``) resampled to ``side`` px on its
    longer side (area-reduced, or bilinear up) and equalised."""
    h, w = full
    up = side / max(h, w)
    g = cv2.resize(grey, (max(8, round(w * up)), max(8, round(h * up))), interpolation=cv2.INTER_AREA if up < 1 else cv2.INTER_LINEAR)
    return cv2.equalizeHist(g)


_EMPTY = (np.zeros((0, 2), np.float32), None)


def _orb_both(orb: Any, img: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray | None], ...]:
    """(points, descriptors) of ``img`` and of its mirror, strongest first."""
    kp, des = orb.detectAndCompute(img, None)
    if des is None:
        return _EMPTY, _EMPTY
    mirrored = np.ascontiguousarray(img[:, ::-1])
    response = np.fromiter((k.response for k in kp), np.float64, len(kp))
    first = _strongest(kp, des, response)  # before _reflect moves the keypoints
    kpm, desm = orb.compute(mirrored, _reflect(kp, img.shape[1], orb.getScaleFactor()))
    # compute() only drops keypoints (none, unless one falls off the border by rounding):
    # with all kept, the mirror's keypoints have the same responses in the same order
    same = len(kpm) == len(kp)
    return (_centred(first, img.shape, orb.getScaleFactor()),
            _centred(_strongest(kpm, desm, response if same else None), img.shape,
                     orb.getScaleFactor()))


def _centred(got: tuple[np.ndarray, np.ndarray | None, np.ndarray], shape: tuple[int, ...],
             scale_factor: float) -> tuple[np.ndarray, np.ndarray | None]:
    """(points, descriptors) of :func:`_strongest`, each point moved to where its pixel's
    centre lies in ``img`` (of ``shape``): ORB reports a keypoint found at ``x`` in pyramid
    level ``o`` (``s = scale_factor ** o``, ``round(w / s)`` px wide) at ``x * s``, while that
    level's pixel ``x`` is centred at ``(x + .5) * w / round(w / s) - .5`` of the image (the
    resampling's pixel-centre convention). The difference grows with the level, up to ~1.3
    px at level 7, the same direction in every image: a copy turned by 180 degrees (or flipped
    upside down) had its matches off by up to 4 px (twice that, with rounding) and its map
    with them (generated dermoscopy crop flipped upside down, 83 inliers: NCC 0.51 under
    RANSAC's map, 0.96 under ECC's). Exact: the keypoints of an image and of its 180-degree
    turn coincide to 0 px at every level (tests/test_verify.py)."""
    pts, des, octave = got
    if not len(pts):
        return pts, des
    h, w = shape[:2]
    s = scale_factor ** octave.astype(np.float64)
    fx, fy = w / np.round(w / s), h / np.round(h / s)
    out = np.stack([(pts[:, 0] / s + 0.5) * fx - 0.5, (pts[:, 1] / s + 0.5) * fy - 0.5], 1)
    return np.ascontiguousarray(out, dtype=np.float32), des


def _low(grey: np.ndarray, frame: tuple[int, int], full: tuple[int, int] | None = None,
         aspect: float = 1.0, *, side: int = LOW_SIDE,
         grid: int = LOW_GRID) -> tuple[tuple[np.ndarray, np.ndarray | None], ...]:
    """ORB of the low rendition (long side area-reduced to ``side``, resized to ``grid``;
    :data:`LOW_SIDE` and :data:`LOW_GRID`, or the mid rendition's :data:`MID_SIDE` and
    :data:`MID_GRID`).

    Reducing every image to the same number of pixels is scale-covariant: a crop's
    rendition equals its source's, magnified, which ORB's pyramid absorbs, so a 30-px
    thumbnail and its 256-px source share descriptors here. Points are mapped into the
    image's 256-px frame (``frame``: its shape) so they combine with :func:`verify`'s.
    ``full``: (h, w) of the whole image when ``grey`` was decoded reduced; ``aspect``: the
    rendition's width stretched by this factor before ORB (:func:`_stretched`).
    """
    if not hasattr(_LOCAL, "orb_low"):
        _LOCAL.orb_low = cv2.ORB_create(nfeatures=NFEATURES, edgeThreshold=8, patchSize=15,
                                        fastThreshold=8, nlevels=6)
    h, w = full or grey.shape
    s = side / max(h, w)
    x = grey if s >= 1 else cv2.resize(grey, (max(4, round(w * s)), max(4, round(h * s))),
                                       interpolation=cv2.INTER_AREA)
    wide = x.shape[1] * aspect
    k = grid / max(wide, x.shape[0])
    x = cv2.resize(x, (max(8, round(wide * k)), max(8, round(x.shape[0] * k))),
                   interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    n, m = _orb_both(_LOCAL.orb_low, cv2.equalizeHist(x))
    fx, fy = frame[1] / x.shape[1], frame[0] / x.shape[0]  # pixel centres: (x + .5) * f - .5
    scale = np.float32([fx, fy])
    shift = np.float32([(fx - 1) / 2, (fy - 1) / 2])
    return (n[0] * scale + shift, n[1]), (m[0] * scale + shift, m[1])


def _stretched(grey: np.ndarray, frame: tuple[int, int],
               full: tuple[int, int]) -> tuple[tuple[np.ndarray, np.ndarray | None], ...]:
    """ORB of the low rendition stretched by each of :data:`STRETCH` (and the mirrors), as one
    set each: the renditions' keypoints interleaved by rank (the strongest of each first),
    points in the unstretched 256-px frame.

    A crop resized to a fixed shape (a square thumbnail of a wide crop) is its source squeezed
    along one axis; ORB's descriptors do not survive a squeeze of more than about 1.2, so
    the thumbnail's squeeze is undone approximately by each stretch (measured, generated
    5k set: thumbnails of crops 1.3-1.75 times wider than high matched their source with 10-37
    RANSAC inliers unstretched, 31-97 stretched by 1.41).
    """
    got = [_low(grey, frame, full, a) for a in STRETCH]
    return tuple(_interleave([g[side] for g in got]) for side in (0, 1))


def _interleave(sets: list[tuple[np.ndarray, np.ndarray | None]]
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """(points, descriptors) of several sets, each strongest first, merged rank by rank."""
    sets = [s for s in sets if s[1] is not None and len(s[1])]
    if not sets:
        return _EMPTY
    rank = np.concatenate([np.arange(len(s[1])) for s in sets])
    order = np.argsort(rank, kind="stable")
    return (np.concatenate([s[0] for s in sets])[order],
            np.concatenate([s[1] for s in sets])[order])


def _reflect(kp: Any, width: int, scale_factor: float) -> Any:
    """Keypoints mirrored left-right, exactly as ORB places them on the mirrored image: the
    same keypoint objects, moved (position and angle set in place; ~half the cost of
    building new ones).

    A keypoint of pyramid level ``o`` sits at ``x_o * s`` (``s = scale_factor ** o``) in the
    level of width ``round(width / s)``; its mirror is at ``(round(width / s) - 1 - x_o) * s``,
    its angle ``180 - angle``.
    """
    if not len(kp):
        return kp
    pts = cv2.KeyPoint_convert(kp)
    octave = np.fromiter((k.octave for k in kp), np.int64, len(kp))
    angle = np.fromiter((k.angle for k in kp), np.float64, len(kp))
    s = scale_factor ** octave.astype(np.float64)
    x = ((np.round(width / s) - 1) * s - pts[:, 0]).tolist()
    y = pts[:, 1].astype(np.float64).tolist()
    for k, xi, yi, a in zip(kp, x, y, ((180.0 - angle) % 360.0).tolist(), strict=True):
        k.pt, k.angle = (xi, yi), a
    return kp


def _strongest(kp: Any, des: np.ndarray | None, response: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(points as ORB reports them, descriptors, pyramid levels), strongest response first
    (stable order among equals); ``response``: the keypoints' responses when the caller has
    them."""
    if response is None:
        response = np.array([k.response for k in kp], dtype=np.float64)
    order = np.argsort(-response, kind="stable")
    pts = cv2.KeyPoint_convert(kp) if len(kp) else np.zeros((0, 2), np.float32)
    octave = np.fromiter((k.octave for k in kp), np.int64, len(kp))
    return (np.ascontiguousarray(pts[order], dtype=np.float32).reshape(-1, 2),
            None if des is None else des[order], octave[order])


def features_many(files: list[str], *, workers: int = 2) -> list[dict[str, Any] | None]:
    """:func:`features` of each file, computed in a thread pool (OpenCV releases the GIL)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(features, files))


Extra = tuple[tuple[str, ...], np.ndarray, int]  # (feature sets, a flag per image, k): orb_pairs_many
PARTS = ("g", "n", "m", "lo", "lom", "lx", "lxm", "mi", "mim", "c")  # what FeatureStore keeps
# per image, in order
RAW = {"g": 1, "c": 3}  # parts kept as 8-bit pixels (rows x cols x channels), not points
_INDEX = ("ok", "off", "rows", "cols", "has", "up", "side")  # FeatureStore's arrays per image
_MAGIC = b"MLFEAT01"  # the last 8 bytes of a saved FeatureStore (FeatureStore.save)
WIDE = {"lx": len(STRETCH), "lxm": len(STRETCH)}  # sets of several renditions: per_image x this


def _owned_sets(tags: tuple[str, ...], extra: Extra | None,
                n: int) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """(feature set, owner offset, its index in ``tags``) of an image's descriptors for
    bucketing, and of an image flagged in ``extra`` (its extra sets too, owned by its virtual
    twin ``n + i``, indexed after ``tags``)."""
    plain = [(t, 0, g) for g, t in enumerate(tags)]
    twin = [(t, n, len(tags) + g) for g, t in enumerate(extra[0])] if extra is not None else []
    return plain, plain + twin


def _taken(tag: str, k: int, per_image: int) -> int:
    """How many of a set's ``k`` descriptors are bucketed: ``per_image`` (a set of several
    renditions, :data:`WIDE`: that many times it)."""
    return min(k, per_image * WIDE.get(tag, 1))


class FeatureStore:
    """:func:`features` of many images on disk: memory O(images x a few numbers), not O(pixels).

    One append-only file holds every image's parts (the 256-px grey image, then the points
    and descriptors of ``n``, ``m``, ``lo``, ``lom``, a thumbnail's ``lx``, ``lxm`` and a
    larger image's ``mi``, ``mim``, then the tiny colour rendition ``c``: :data:`PARTS`) as
    raw bytes; small numpy arrays index them. :meth:`get` reads one image back with ``os.pread`` (never a memory map: its resident
    pages would count in the process's memory), bit-identical to what was stored;
    :meth:`descriptors` streams the descriptors of some parts for :func:`orb_pairs`.
    The folder belongs to the caller (the duplicates stage makes a temporary one in the lake
    and removes it).

    A store may also hold images of other stores without copying them (:meth:`adopt`: the
    lake's cache, :class:`FeatureFiles`), read from their files; :meth:`save` turns a store
    into one such file and :meth:`opened` opens one.
    """

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.folder / "features.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._fds = [self._fd]  # the files images are read from (src: an index into this)
        self._end = 0
        self._cap = 0
        self._n = 0
        self._grow(1024)

    def _grow(self, cap: int) -> None:
        n = len(PARTS)
        for name, shape, dtype in (("ok", (cap,), bool), ("off", (cap, n), np.int64),
                                   ("rows", (cap, n), np.int32),  # RAW: height; else points
                                   ("cols", (cap, n), np.int32),  # RAW: width
                                   ("has", (cap, n), bool),  # descriptors present (not None)
                                   ("up", (cap,), np.float64),
                                   ("side", (cap,), np.int64),
                                   ("src", (cap,), np.int16)):
            out = np.zeros(shape, dtype=dtype)
            before = getattr(self, name, None)
            if before is not None:
                out[: len(before)] = before
            setattr(self, name, out)
        self._cap = cap

    def __len__(self) -> int:
        return self._n

    def _slot(self) -> int:
        """The index of a new image (the arrays grown when full)."""
        i = self._n
        if i == self._cap:
            self._grow(2 * self._cap)
        self._n += 1
        return i

    def append(self, f: dict[str, Any] | None) -> None:
        i = self._slot()
        if f is None:
            return
        self.ok[i], self.up[i], self.side[i] = True, f["up"], f["side"]
        chunks = []
        for c, part in enumerate(PARTS):
            self.off[i, c] = self._end + sum(len(b) for b in chunks)
            if part in RAW and part in f:
                g = np.ascontiguousarray(f[part], dtype=np.uint8)
                self.rows[i, c], self.cols[i, c] = g.shape[:2]
                self.has[i, c] = True
                chunks.append(g.tobytes())
            elif part in f:
                pts, des = f[part]
                self.rows[i, c] = len(pts)
                self.has[i, c] = des is not None
                chunks.append(np.ascontiguousarray(pts, dtype=np.float32).tobytes()
                              + (b"" if des is None else np.ascontiguousarray(des).tobytes()))
            else:
                self.rows[i, c] = -1  # part not computed (features(low=False))
        blob = b"".join(chunks)
        self._write(blob, self._end)
        self._end += len(blob)

    def _write(self, data: bytes, at: int) -> None:
        """All of ``data`` written to this store's own file at offset ``at``."""
        view = memoryview(data)
        while view:
            done = os.pwrite(self._fd, view, at)
            view, at = view[done:], at + done

    def adopt(self, other: FeatureStore, j: int) -> None:
        """Append image ``j`` of ``other`` (read from ``other``'s file, never copied: ``other``
        stays open while this store is read)."""
        i = self._slot()
        fd = other._fds[other.src[j]]
        if fd not in self._fds:
            self._fds.append(fd)
        self.src[i] = self._fds.index(fd)
        for name in _INDEX:
            getattr(self, name)[i] = getattr(other, name)[j]

    def drop_index(self) -> None:
        """Free this store's index (memory ~140 bytes per image), keeping its file open for
        the stores that adopted its images; the store itself is empty after."""
        for name in (*_INDEX, "src"):
            setattr(self, name, getattr(self, name)[:0])
        self._n = self._cap = 0

    def save(self, dest: Path, ids: list[str], shas: list[str]) -> None:
        """Make this store's file ``dest`` (moved there, replacing it atomically), with its
        index and the (image_id, sha256) of each image appended: :meth:`opened` reads it.
        The store is closed after; only a store of its own images can be saved."""
        n = self._n
        if len(ids) != n or len(shas) != n or (self.src[:n] != 0).any():
            raise ValueError("FeatureStore.save: one id and sha256 per image of its own")
        buf = io.BytesIO()
        np.savez(buf, **{name: getattr(self, name)[:n] for name in _INDEX},
                 ids=np.array([x.encode() for x in ids], dtype=np.bytes_),
                 shas=np.array([x.encode() for x in shas], dtype=np.bytes_))
        self._write(buf.getvalue() + struct.pack("<Q8s", self._end, _MAGIC), self._end)
        os.fsync(self._fd)
        self.close()
        os.replace(self.folder / "features.bin", dest)

    @classmethod
    def opened(cls, path: Path) -> tuple[FeatureStore, np.ndarray, np.ndarray]:
        """(store, image ids, sha256s) of a file :meth:`save` made, read-only.

        Raises ``ValueError`` when the file is not one (truncated, overwritten, another
        format), ``OSError`` when it cannot be read."""
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < 16:
                raise ValueError("shorter than its footer")
            end, magic = struct.unpack("<Q8s", os.pread(fd, 16, size - 16))
            if magic != _MAGIC or end > size - 16:
                raise ValueError("no feature-file footer")
            with np.load(io.BytesIO(os.pread(fd, size - 16 - end, end)), allow_pickle=False) as z:
                arrays = {name: z[name] for name in (*_INDEX, "ids", "shas")}
        except OSError:
            os.close(fd)
            raise
        except (ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            os.close(fd)
            raise ValueError(f"{path}: not a feature file ({e})") from e
        store = cls.__new__(cls)
        store.folder, store._fd, store._fds, store._end = Path(path).parent, fd, [fd], end
        n = len(arrays["ok"])
        store._n = store._cap = n
        for name in _INDEX:
            setattr(store, name, arrays[name])
        store.src = np.zeros(n, np.int16)
        ids, shas = arrays["ids"], arrays["shas"]
        raw = np.array([RAW.get(x, 0) for x in PARTS])
        extent = np.where(raw > 0, store.rows * store.cols * raw,
                          store.rows * (8 + 32 * store.has)) + store.off
        if (len(ids) != n or len(shas) != n or any(len(arrays[x]) != n for x in _INDEX)
                or (n and int(extent.max(initial=0)) > end)):
            store.close()
            raise ValueError(f"{path}: not a feature file (its index does not fit)")
        return store, ids, shas

    def _part(self, i: int, c: int) -> Any:
        k, at = int(self.rows[i, c]), int(self.off[i, c])
        fd = self._fds[self.src[i]]
        if PARTS[c] in RAW:
            w, ch = int(self.cols[i, c]), RAW[PARTS[c]]
            px = np.frombuffer(os.pread(fd, k * w * ch, at), np.uint8)
            return px.reshape(k, w) if ch == 1 else px.reshape(k, w, ch)
        size = k * 8 + (k * 32 if self.has[i, c] else 0)
        raw = os.pread(fd, size, at) if size else b""
        pts = np.frombuffer(raw, np.float32, count=2 * k).reshape(k, 2).copy()
        des = (np.frombuffer(raw, np.uint8, offset=k * 8).reshape(k, 32).copy()
               if self.has[i, c] else None)
        return pts, des

    def get(self, i: int) -> dict[str, Any] | None:
        """Image ``i``'s features as :func:`features` returned them (None: undecodable)."""
        if not self.ok[i]:
            return None
        out: dict[str, Any] = {"up": float(self.up[i]), "side": int(self.side[i])}
        for c, part in enumerate(PARTS):
            if self.rows[i, c] >= 0:
                out[part] = self._part(i, c)
        for part in RAW:
            if part in out:
                out[part] = out[part].copy()
        return out

    def tiny(self, rows: np.ndarray) -> np.ndarray:
        """The tiny colour renditions (``c``) of images ``rows`` (each present), uint8
        (len(rows), TINY, TINY, 3)."""
        c = PARTS.index("c")
        out = np.empty((len(rows), TINY, TINY, 3), np.uint8)
        for n, i in enumerate(rows):
            out[n] = self._part(int(i), c)
        return out

    def descriptors(self, tags: tuple[str, ...], per_image: int, chunk: int = 1 << 18,
                    extra: Extra | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(owners, descriptors, sets) of ``tags`` (the ``per_image`` strongest of each; of a
        set of several renditions, :data:`WIDE`, that many times ``per_image``), about
        ``chunk`` descriptors at a time, in image order; ``sets``: each descriptor's feature
        set as its index in ``tags`` (uint8). ``extra`` (tags, flags, _): the flagged images'
        descriptors of those tags too, owned by ``len(self) + i`` (sets indexed after ``tags``)."""
        plain, flagged = ([(PARTS.index(t), shift, g) for t, shift, g in sets]
                          for sets in _owned_sets(tags, extra, self._n))
        owners: list[np.ndarray] = []
        descs: list[np.ndarray] = []
        groups: list[np.ndarray] = []
        held = 0
        for i in np.flatnonzero(self.ok[: self._n]):
            for c, shift, g in (flagged if extra is not None and extra[1][i] else plain):
                k = int(self.rows[i, c])
                if k <= 0 or not self.has[i, c]:
                    continue
                use = _taken(PARTS[c], k, per_image)
                raw = os.pread(self._fds[self.src[i]], use * 32, int(self.off[i, c]) + k * 8)
                descs.append(np.frombuffer(raw, np.uint8).reshape(use, 32))
                owners.append(np.full(use, shift + i, dtype=np.int64))
                groups.append(np.full(use, g, dtype=np.uint8))
                held += use
            if held >= chunk:
                yield np.concatenate(owners), np.concatenate(descs), np.concatenate(groups)
                owners, descs, groups, held = [], [], [], 0
        if held:
            yield np.concatenate(owners), np.concatenate(descs), np.concatenate(groups)

    def has_part(self, part: str) -> bool:
        """Every decodable image has ``part`` (``lo``: the low renditions were computed)."""
        ok = self.ok[: self._n]
        return bool(self.present(part)[ok].all())

    def present(self, part: str) -> np.ndarray:
        """Per image: it has ``part`` (``lx``: a thumbnail's stretched renditions)."""
        return self.ok[: self._n] & (self.rows[: self._n, PARTS.index(part)] >= 0)

    def sides(self) -> np.ndarray:
        """Each image's longer side in pixels (-1: undecodable)."""
        return np.where(self.ok[: self._n], self.side[: self._n], -1)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def store_features(files: list[str], store: FeatureStore, *, workers: int = 2,
                   chunk: int = 256,
                   cached: list[tuple[FeatureStore, int] | None] | None = None) -> FeatureStore:
    """:func:`features` of each file appended to ``store`` in order, ``chunk`` files at a time
    (a thread pool per chunk: never more than a chunk of images in memory; under
    :func:`~medlake.catalog.imageio.image_pool`, as verification). ``cached``: per file,
    (store, index) of its features found already (:meth:`FeatureFiles.matched`), adopted
    instead of decoding the file; None where they must be computed."""
    with image_pool(), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for s in range(0, len(files), chunk):
            part = range(s, min(s + chunk, len(files)))
            todo = [i for i in part if cached is None or cached[i] is None]
            made = dict(zip(todo, pool.map(features, [files[i] for i in todo]), strict=True))
            for i in part:
                if i in made:
                    store.append(made[i])
                else:
                    store.adopt(*cached[i])  # type: ignore[index, misc]
    return store


FEATURES = "features-v1"  # the cache folder's name, before its code tag


class FeatureFiles:
    """The features ``fingerprint`` leaves for ``duplicates`` in a workspace's lake:
    ``lake/cache/features-v1-<code_tag>/<dataset>.features``, one file per dataset
    (:meth:`FeatureStore.save`: the features, their index and each image's (image_id,
    sha256)), replaced whole by each fingerprint run of that dataset.

    About 100 KB per image (the 64-KB frame and ~300 ORB points of each set), as the
    duplicates stage's own scratch store: read from here, that store holds only the images
    not found (:meth:`FeatureStore.adopt`), so the stage needs no more disk than before.
    """

    def __init__(self, lake: Path) -> None:
        self.lake = Path(lake)
        self.root = self.lake / "cache"
        self.folder = self.root / f"{FEATURES}-{_code_tag()}"

    def _dest(self, dataset_id: str) -> Path:
        return self.folder / f"{safe_name(dataset_id)}.features"

    def writer(self, dataset_id: str) -> FeatureWriter:
        """A writer of the dataset's file (:class:`FeatureWriter`)."""
        return FeatureWriter(self, dataset_id)

    def remove(self, dataset_id: str) -> None:
        """Remove the dataset's file (none of its images has features any more)."""
        self._dest(dataset_id).unlink(missing_ok=True)

    def matched(self, keys: list[tuple[str, str]]
                ) -> tuple[list[FeatureStore], list[tuple[FeatureStore, int] | None]]:
        """(the stores opened, per key (image_id, sha256): (store, index) of its features,
        None when not here). The stores are the caller's to close, after the last read of
        a store that adopted from them. A file that cannot be read is skipped (its images
        are decoded by the caller)."""
        hits: list[tuple[FeatureStore, int] | None] = [None] * len(keys)
        if not keys or not self.folder.is_dir():
            return [], hits
        want = np.array([((sha or "") + "/" + i).encode() for i, sha in keys],  # no sha: a miss
                        dtype=np.bytes_)
        open_: list[FeatureStore] = []
        for f in sorted(self.folder.glob("*.features")):
            try:
                store, ids, shas = FeatureStore.opened(f)
            except (OSError, ValueError):
                continue
            have = np.char.add(np.char.add(shas, b"/"), ids)  # sha256 first: 64 hex, no "/"
            order = np.argsort(have, kind="stable")
            have = have[order]
            pos = np.minimum(np.searchsorted(have, want), max(len(have) - 1, 0))
            found = [k for k in np.flatnonzero(have[pos] == want) if hits[k] is None] if len(have) else []
            for k in found:
                hits[k] = (store, int(order[pos[k]]))
            if found:
                open_.append(store)
            else:
                store.close()
        return open_, hits


class FeatureWriter:
    """Features of one dataset's images, written to a scratch folder in the lake (removed by
    the next process that opens the lake when this one is killed) and moved into
    :class:`FeatureFiles` by :meth:`commit`; :meth:`discard` drops them."""

    def __init__(self, files: FeatureFiles, dataset_id: str) -> None:
        self.files, self.dest = files, files._dest(dataset_id)
        self.tmp = temp_dir_path(files.lake / "features")
        self.store = FeatureStore(self.tmp)
        self.ids: list[str] = []
        self.shas: list[str] = []

    def add(self, image_id: str, sha256: str, f: dict[str, Any]) -> None:
        self.store.append(f)
        self.ids.append(image_id)
        self.shas.append(sha256)

    def commit(self) -> None:
        """Replace the dataset's file with these features; remove other code tags' folders."""
        descriptors.remove_other_tags(self.files.folder, FEATURES)
        self.files.folder.mkdir(parents=True, exist_ok=True)
        try:
            self.store.save(self.dest, self.ids, self.shas)
        finally:
            self.discard()

    def discard(self) -> None:
        self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _code_tag() -> str:
    """:func:`medlake.catalog.descriptors.code_tag` of this module and the decoders'."""
    return descriptors.code_tag(FEATURES, (sys.modules[__name__], imageio, dicom))
