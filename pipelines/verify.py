"""ORB features for ``duplicates``: candidate retrieval by hashed descriptors, and verification.

Retrieval (:func:`orb_pairs`): every image's ORB descriptors (of the image and of its mirror)
are bucketed by random 28-bit subsets (locality-sensitive hashing of binary descriptors);
images sharing many buckets are candidates. Copies share local detail even when cropped,
rotated, mirrored or rescaled, which global descriptors and perceptual hashes lose.

Small images (thumbnails, MedMNIST-like crops of 28-64 px) share little ORB detail with
their source at full resolution: every image also gets ORB features of a *low rendition*
(:mod:`pipelines.features`: long side reduced to ``LOW_SIDE`` px, ORB run at ``LOW_GRID``
px), which is scale-covariant (a crop's rendition is its source's rendition, magnified), and
pairs with an image of at most ``small_side`` px are also looked up by those. A thumbnail of
a crop squeezed to a square is its source squeezed along one axis: images of at most
``STRETCH_SIDE`` px also get that rendition stretched by each of ``STRETCH``, bucketed as a
virtual twin of the image (``extra`` of :func:`orb_pairs_many`) and fitted when the other
fits fail (:func:`_stretched_fit`).

Verification (:func:`verify`): ORB matching + RANSAC affine transform (a crop resized to a
fixed size changes the aspect ratio; the two axis scales may differ up to ``max_aspect``),
refined by ECC (:func:`cv2.findTransformECC`) when the pair is coarse, then the correlation of
band-pass detail *at the coarser of the two images' resolutions*. A near duplicate is one
picture changed by an affine transform (crop, resize, rotation, mirror), resampling with
any interpolation, and a monotonic intensity change (JPEG, relighting): after alignment its
detail correlates with its source at every scale both images resolve. Comparing at the
coarser resolution (the band's scale follows the larger of the two pixel sizes, mapped into
one frame) means detail that interpolation removed from one image is never asked for
(coarse pairs are compared, and refined, on both images area-reduced to that scale: the
same band on a grid of a pixel per band sigma, ``grid`` in the evidence). A
repeat capture of the same lesion or patient has the same anatomy but its own noise, hairs,
markers and pose, so the correlation stays low. The coarser the common resolution, the
less of that own detail is left (at 30-60 px a repeat chest X-ray of one patient agrees
with it almost as well as a copy), so the threshold rises from ``ncc`` to ``ncc_coarse``
between a common pixel size of :data:`COARSE_FROM` and :data:`COARSE_TO` (in units of
the 256-px frame).
"""

from __future__ import annotations

import math
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from medlake.pipelines.features import (
    _EMPTY, LOW_GRID, NFEATURES, SIDE, WIDE, Extra,
    FeatureStore, _grey, _owned_sets, _resampled, _taken, features)

COARSE_FROM, COARSE_TO = 1.5, 4.0  # common pixel size (256-px frame) where ncc -> ncc_coarse
FILL_MAX = 16  # equalised grey levels counted as flat black fill (_content): 1/16 of the range
ECC_EPS = 1e-3  # ECC stops below this gain in correlation (1e-4 took ~1.5x the time; on the 5k set
# 2,840 refinements, 1 verdict changed: a pair gained)
SECOND_BAND = 1.5  # a resampled pair just under the line is compared again this much coarser
SECOND_MARGIN = 0.02  # ... and must clear that comparison's line by this much (a second try)
RESAMPLED = 1.1  # a map scaling an axis by more than this (or less than 1 / this) resampled b
RETRY_FROM = 0.55  # fine pairs from this NCC up to the line are refined by ECC and compared again
BAND, BAND_MIN = 0.7, 1.0  # band-pass sigma: BAND x the common pixel, at least BAND_MIN px
FINE_SIDE = 2 * SIDE  # the largest frame of the second comparison of large images (verify)
FINE_FROM = 384  # images from this longer side (px) get that second comparison (fine_side)
FINE_SKIP = 0.93  # ... unless the 256-px frame agrees this well (repeat captures: up to 0.87)
WEAK = 2.0  # a thumbnail's full fit under this x min_inliers competes with its low renditions' map
STILL_FROM = 0.6  # a finer-frame comparison from this NCC up to its line gets the stillness check
MOTION_MARGIN = 0.08  # a fine pair passing the NCC line by less than this gets the motion check
MOTION_DETAIL = 0.75  # ... over the pixels whose band-pass detail is in the top quarter
# (every image is resampled into the 256-px frame; finer than 1 px is interpolation, not detail)
_LOCAL = threading.local()  # one ORB detector per thread (cv2 objects are not shared safely)


def fine_frame(path: str) -> np.ndarray | None:
    """The finer equalised grey frame (:func:`fine_side` px) of an image of :data:`FINE_FROM`
    px or more, for :func:`verify`'s second comparison: from :func:`features`' very decode,
    made when a pair needs it (None: a smaller or undecodable image).

    Not kept with the features: at the sizes of HAM10000 or ChestX-ray14 it is 144-256 KB
    per image, 2-3x the rest of an image's features, while only the images of verified pairs
    under :data:`FINE_SKIP` need it (measured, 2,000 captures at 3x the default size: 172
    of 1,975 images).
    """
    got = _grey(path)
    if got is None:
        return None
    grey, (h, w), _ = got
    fine = fine_side(max(h, w))
    return _resampled(grey, (h, w), fine) if fine > SIDE else None


def _cached(cache: Any, key: Any, make: Any) -> Any:
    """``cache[key]``, made by ``make()`` and kept there when missing (:func:`verify`'s
    cache: a dict, or a :class:`FeatureCache`, whose bounded LRU may drop an entry
    between the look and the read, from another thread)."""
    if key in cache:
        try:
            return cache[key]
        except KeyError:
            pass
    cache[key] = value = make()
    return value


def fine_side(side: int) -> int:
    """The frame of an image's second comparison (verify), by its longer side in pixels:
    half of it rounded to 64 px, at least :data:`FINE_FROM` and at most :data:`FINE_SIDE`;
    0 (none) for an image under :data:`FINE_FROM` px.

    From 384 px: chest X-rays of *other* patients at 400-640 px agreed in the 256-px frame
    (0.78-0.84; measured on generated sets at 2.5-3x the default size, where half their side
    gave no frame above 256), and not at 384 px (false pairs 11 -> 4 and 9 -> 1)."""
    return min(FINE_SIDE, max(FINE_FROM, 64 * round(side / 128))) if side >= FINE_FROM else 0


class FeatureCache:
    """The verification cache over a :class:`FeatureStore`: index -> features, at most
    ``size`` images and ``max_bytes`` of their arrays held (least recently used dropped; the
    last one set is always kept), safe across threads.

    Behaves like the dict :func:`verify` takes: every stored index is ``in`` it; other keys
    set by :func:`verify` (features it computed) are held in the same bounded LRU.
    """

    def __init__(self, store: FeatureStore, size: int = 1024, max_bytes: int | None = None) -> None:
        self.store, self.size = store, max(1, size)
        self.max_bytes = max_bytes
        self._lru: OrderedDict[Any, tuple[Any, int]] = OrderedDict()  # key -> (value, bytes)
        self.held = 0  # bytes of the arrays held
        self._lock = threading.Lock()

    def _stored(self, key: Any) -> bool:
        return isinstance(key, (int, np.integer)) and 0 <= key < len(self.store)

    def __contains__(self, key: Any) -> bool:
        with self._lock:
            return key in self._lru or self._stored(key)

    def __getitem__(self, key: Any) -> Any:
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)
                return self._lru[key][0]
        if not self._stored(key):
            raise KeyError(key)
        value = self.store.get(int(key))
        self[key] = value
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        size = _nbytes(value)
        with self._lock:
            if key in self._lru:
                self.held -= self._lru[key][1]
            self._lru[key] = (value, size)
            self.held += size
            self._lru.move_to_end(key)
            while len(self._lru) > 1 and (len(self._lru) > self.size or (
                    self.max_bytes is not None and self.held > self.max_bytes)):
                self.held -= self._lru.popitem(last=False)[1][1]

    def __len__(self) -> int:
        return len(self._lru)


def _nbytes(value: Any) -> int:
    """Bytes of the numpy arrays in ``value`` (features: a dict of arrays and (points,
    descriptors) pairs; None: 0)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, tuple):
        return sum(_nbytes(v) for v in value)
    return 0


def _bits(desc: np.ndarray, picks: list[np.ndarray], chunk: int = 8192) -> np.ndarray:
    """Integer keys (n, tables; uint32 up to 32 bits, else uint64) of packed 256-bit
    descriptors from the bits at each ``picks``.

    Key bit ``n`` of a table is descriptor bit ``picks[t][n]`` (bits numbered from the most
    significant bit of byte 0). Each descriptor byte that holds a picked bit contributes its
    part of every table's key through one lookup table (byte value -> the key bits it sets,
    for all tables at once), the parts ORed together: exact, one gather per such byte. In
    chunks of ``chunk`` descriptors, whose keys (256 KB) stay in the CPU's cache while the
    bytes are ORed in (measured: 8,192 took 20% less CPU than 32,768).
    """
    tables = len(picks)
    dtype = np.uint32 if max((len(pk) for pk in picks), default=0) <= 32 else np.uint64
    vals = np.arange(256, dtype=dtype)
    lut = np.zeros((desc.shape[1], 256, tables), dtype=dtype)
    for t, pk in enumerate(picks):
        for n, bit in enumerate(pk):
            byte, off = divmod(int(bit), 8)
            lut[byte, :, t] |= ((vals >> dtype(7 - off)) & dtype(1)) << dtype(n)
    used = [b for b in range(desc.shape[1]) if lut[b].any()]
    out = np.zeros((len(desc), tables), dtype=dtype)
    for s in range(0, len(desc), chunk):
        d = desc[s:s + chunk]
        acc = np.zeros((len(d), tables), dtype=dtype)
        for b in used:
            acc |= lut[b][d[:, b]]
        out[s:s + chunk] = acc
    return out


def orb_pairs(feats: list[dict[str, Any] | None] | FeatureStore, *, k: int = 5,
              only: np.ndarray | None = None, **kw: Any) -> np.ndarray:
    """:func:`orb_pairs_many` with one selection (``k``, ``only``)."""
    return orb_pairs_many(feats, [(k, only)], **kw)[0]


def orb_pairs_many(feats: list[dict[str, Any] | None] | FeatureStore,
                   select: list[tuple[int, np.ndarray | None]], *, min_votes: int = 4,
                   tables: int = 16, bits: int = 28, per_image: int = 300, max_bucket: int = 32,
                   seed: int = 0, tags: tuple[str, ...] = ("n", "m"), extra: Extra | None = None,
                   scratch: Path | str | None = None) -> list[np.ndarray]:
    """Candidate pairs (i, j, votes), i < j, from shared ORB-descriptor buckets.

    Each of ``tables`` hash tables keys every descriptor (``per_image`` strongest of the image
    and of its mirror: the feature sets ``tags``) by ``bits`` random bits; two images get one
    vote per bucket they share (buckets with more than ``max_bucket`` images are ignored:
    flat, common patterns). A pair is kept when it has ``min_votes`` votes and is among the
    ``k`` best of either image. With ``only`` (a boolean per image), only pairs with at least
    one such image count, and a pair is kept when it is among the ``k`` best of a flagged
    image. Pairs come only from shared buckets, never all N x N. ``feats`` is a list of
    :func:`features` or a :class:`FeatureStore`; the keys go to files in a temporary folder
    (under ``scratch``), each table is sorted in parts of at most :data:`PART_ENTRIES`
    descriptors, the pairs sharing a bucket go to files by shard (the first image's index
    modulo the shards, one per :data:`SHARD_DESCRIPTORS` descriptors; :func:`_write_shards`),
    votes are counted
    one shard at a time and each image's ``k`` best kept as shards arrive (:class:`_Top`):
    memory holds one part, one shard and ``k`` pairs per image, never every pair that shares
    a bucket (31.6 million of the 46.7 million possible at 9,660 images).

    ``extra`` (tags, flags, k): the flagged images' descriptors of those feature sets are
    bucketed too, as a second, virtual image each (thumbnails' stretched low renditions,
    :func:`pipelines.features._stretched`). Its votes never mix with the image's own or count
    in ``select``:
    one more array is returned, the pairs among the ``k`` best of each virtual image (its
    own image excluded), as pairs of real images.

    ``select`` lists (``k``, ``only``) selections made from the one bucketing: each gives
    the array that ``orb_pairs(feats, k=k, only=only)`` gives (the votes of a pair do not
    depend on the selection), so several cost one pass over the descriptors.
    """
    return orb_pairs_views(feats, [(tags, select, extra)], min_votes=min_votes, tables=tables,
                           bits=bits, per_image=per_image, max_bucket=max_bucket, seed=seed,
                           scratch=scratch)[0]


View = tuple[tuple[str, ...], list[tuple[int, np.ndarray | None]], Extra | None]  # orb_pairs_views


def orb_pairs_views(feats: list[dict[str, Any] | None] | FeatureStore, views: list[View], *,
                    min_votes: int = 4, tables: int = 16, bits: int = 28, per_image: int = 300,
                    max_bucket: int = 32, seed: int = 0,
                    scratch: Path | str | None = None) -> list[list[np.ndarray]]:
    """:func:`orb_pairs_many` of several views (``tags``, ``select``, ``extra``) of one
    bucketing: per view, the arrays ``orb_pairs_many(feats, select, tags=tags, extra=extra)``
    gives, each view's buckets holding its own feature sets' descriptors only.

    Every descriptor of the views' feature sets is keyed once (one seed and ``bits``: a
    descriptor's keys do not depend on the view). The sets go to key files by *atom*, the sets
    of the same views; each table's part of each atom is sorted once, and a view of several
    atoms merges their sorted entries (a stable sort of sorted runs: a merge). So the low
    renditions bucketed with the mid ones and alone (``duplicates``' two selections) cost one
    keying and one sort of the low descriptors, not two. At most one view has ``extra``.
    """
    extras = [x for _, _, x in views if x is not None]
    if len(extras) > 1:
        raise ValueError(f"orb_pairs_views: {len(extras)} views with extra sets; at most one")
    extra = extras[0] if extras else None
    union = tuple(dict.fromkeys(t for tags, _, _ in views for t in tags))
    member = [tuple(t in tags for tags, _, _ in views) for t in union]  # per set: in which views
    atoms = list(dict.fromkeys(member))  # sets in the same views share key files
    atom_of = np.array([atoms.index(m) for m in member] + [len(atoms)] * len(extra[0] if extra else ()),
                       dtype=np.int64)
    real = len(feats)
    n = 2 * real if extra is not None else real  # with extra: image i's virtual twin is real + i
    source = (feats.descriptors(union, per_image, extra=extra) if isinstance(feats, FeatureStore)
              else _list_descriptors(feats, union, per_image, extra))
    rng = np.random.default_rng(seed)
    picks = [rng.choice(256, size=bits, replace=False) for _ in range(tables)]
    with tempfile.TemporaryDirectory(prefix=".orb.tmp-", dir=scratch) as tmp:
        folder = Path(tmp)
        totals = _write_keys(source, picks, folder, atom_of, len(atoms),
                             None if extra is None else real)
        votes = _Votes(folder, tables, sum(totals), n, real, max_bucket, min_votes)
        specs = []
        for v, (tags, select, x) in enumerate(views):
            mine = [a for a, m in enumerate(atoms) if m[v]]
            specs.append(_View(select, mine, sum(totals[a] for a in mine),
                               None if x is None else (real, x[1], x[2]),
                               per_image * sum(WIDE.get(t, 1) for t in tags)))
        return votes.count(specs, [sum(m) for m in atoms])


class _View:
    """One view's share of :meth:`_Votes.count`: its selections, atoms (key files), entries
    in all, twins (real, flags, k) and an image's entries in one table at most."""

    def __init__(self, select: list[tuple[int, np.ndarray | None]], atoms: list[int], total: int,
                 twins: tuple[int, np.ndarray, int] | None, per_owner: int) -> None:
        self.select, self.atoms, self.total, self.twins = select, atoms, total, twins
        self.per_owner = per_owner
        self.shards = max(1, total // SHARD_DESCRIPTORS)
        flagged = [o for _, o in select]
        self.any_only = (None if not flagged or any(o is None for o in flagged)
                         else np.logical_or.reduce(flagged))
        # few flagged images and no twins: only the buckets a flagged image is in can give a
        # counted pair; the others are dropped before the pairs are listed (_flagged_buckets)
        self.few = (twins is None and self.any_only is not None
                    and FLAGGED_FEW * int(self.any_only.sum()) < len(self.any_only))


class _Votes:
    """Votes of image pairs sharing buckets, counted from the key files of
    :func:`_write_keys`; with virtual twins (in their own key files), their votes against
    every other image are counted from the same sort of each table."""

    def __init__(self, folder: Path, tables: int, total: int, n: int, real: int,
                 max_bucket: int, min_votes: int) -> None:
        self.folder, self.tables = folder, tables
        self.max_bucket, self.min_votes = max_bucket, min_votes
        self.parts = max(1, -(-total // PART_ENTRIES))
        self.shift = max(1, int(n).bit_length())  # owners < n (twins included)
        # pair codes (< m * m) per view: the selections' pairs are of real images only
        self.size = {"s": real, "t": n}
        self.code_t = {v: np.uint32 if m * m < 2**32 else np.int64 for v, m in self.size.items()}

    def count(self, views: list[_View], shared: list[int]) -> list[list[np.ndarray]]:
        """Each view's arrays (:func:`orb_pairs_many`: its selections' pairs, then with twins
        the pairs among the ``k`` best of each twin, as real images); ``shared``: per atom, how
        many views hold it."""
        size, code_t, shift = self.size, self.code_t, self.shift
        with ExitStack() as files:  # pair codes by view, kind and shard (first image mod shards)
            outs = [{c: [files.enter_context(open(self.folder / f"{w}{c}{x}", "wb"))
                         for x in range(view.shards)]
                     for c in ["s"] + (["t"] if view.twins is not None else [])}
                    for w, view in enumerate(views)]
            # an atom of one view only, and that view's only atom: its flagged buckets are kept
            # before the sort (fewer entries sorted); else after the view's entries are merged
            alone = {view.atoms[0]: view for view in views
                     if len(view.atoms) == 1 and shared[view.atoms[0]] == 1 and view.few}
            for t in range(self.tables):
                for part in range(self.parts):
                    sorted_ = {}
                    for a in dict.fromkeys(a for view in views if view.total for a in view.atoms):
                        ent = _part_entries(self.folder, t, part, self.parts, shift, f"a{a}_")
                        if a in alone:
                            ent = _flagged_buckets(ent, shift, alone[a].any_only)
                        sorted_[a] = _sorted(ent)  # by key, then owner (one int64 sort)
                    for w, view in enumerate(views):
                        if not view.total:
                            continue
                        both = (sorted_[view.atoms[0]] if len(view.atoms) == 1 else
                                np.sort(np.concatenate([sorted_[a] for a in view.atoms]),
                                        kind="stable"))
                        if view.few and view.atoms[0] not in alone:
                            both = _flagged_buckets(both, shift, view.any_only)
                        if view.select:
                            for ma, mb in _bucket_pairs(both, shift, code_t["s"],
                                                        self.max_bucket, view.any_only):
                                _write_shards(ma, mb, size["s"], outs[w]["s"])
                        if view.twins is not None:
                            tw = _sorted(_part_entries(self.folder, t, part, self.parts, shift, "x"))
                            ma, mb = _twin_pairs(both, tw, shift, view.twins[1], self.max_bucket,
                                                 view.per_owner)
                            _write_shards(ma.astype(code_t["t"]), mb.astype(code_t["t"]), size["t"],
                                          outs[w]["t"])
        none = np.zeros((0, 3), dtype=np.int64)
        out = []
        for w, view in enumerate(views):
            if not view.total:
                out.append([none for _ in range(len(view.select) + (view.twins is not None))])
                continue
            got = self._tops(w, "s", view.shards, view.select) if view.select else []
            if view.twins is not None:
                real, flags, k = view.twins
                twin = np.r_[np.zeros(real, bool), flags]
                got.append(_untwinned(self._tops(w, "t", view.shards, [(k, twin)])[0], real))
            out.append(got)
        return out

    def _tops(self, w: int, v: str, shards: int,
              select: list[tuple[int, np.ndarray | None]]) -> list[np.ndarray]:
        """Each selection's pairs from view ``w``'s shard files of kind ``v`` (s: pairs of
        real images; t: of an image and a twin)."""
        n = self.size[v]
        tops = [_Top(k) for k, _ in select]
        flagged = [o for _, o in select]
        for x in range(shards):  # every vote of a pair is in one shard: count them there
            codes = np.fromfile(self.folder / f"{w}{v}{x}", dtype=self.code_t[v]).astype(np.int64)
            i, j, votes = _count_votes(codes, n, shards, x, self.min_votes)
            for top, only in zip(tops, flagged, strict=True):
                keep = slice(None) if only is None else only[i] | only[j]
                top.add(i[keep], j[keep], votes[keep])
        return [top.pairs(only) for top, only in zip(tops, flagged, strict=True)]


def _twin_pairs(both: np.ndarray, tw: np.ndarray, shift: int, flags: np.ndarray,
                max_bucket: int, per_owner: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (real image, twin) sharing a bucket: ``both`` the real images' sorted entries,
    ``tw`` the twins' (``(key << shift) | owner``, sorted). A bucket counts the twins and the
    real images not ``flags``-ed (a flagged image's twin stands for it here) among its
    owners, 2 to ``max_bucket`` of them; one entry per pair and bucket. The real images'
    entries are looked up by binary search, never copied: memory O(twins' entries)."""
    empty = np.zeros(0, np.int64)
    tw = tw[np.r_[True, tw[1:] != tw[:-1]]] if len(tw) else tw  # one per twin and bucket
    if not len(tw) or not len(both):
        return empty, empty
    mask = (1 << shift) - 1
    tkey = tw >> shift
    first = np.flatnonzero(np.r_[True, tkey[1:] != tkey[:-1]])
    n_tw = np.diff(np.r_[first, len(tw)])
    keys = tkey[first]
    lo = np.searchsorted(both, keys << shift)
    hi = np.searchsorted(both, (keys + 1) << shift)
    # an image has at most per_owner entries in a table: longer ranges hold > max_bucket images
    ok = (hi > lo) & (hi - lo <= max_bucket * per_owner)
    lo, hi, n_tw, first = lo[ok], hi[ok], n_tw[ok], first[ok]
    if not len(lo):
        return empty, empty
    size = hi - lo
    seg = np.repeat(np.arange(len(lo)), size)
    idx = np.repeat(lo - np.r_[0, np.cumsum(size)[:-1]], size) + np.arange(size.sum())
    ent = both[idx]
    owner = ent & mask
    new = np.r_[True, (ent[1:] != ent[:-1]) | (seg[1:] != seg[:-1])]  # one per owner and bucket
    keep = new & ~flags[owner]
    seg, owner = seg[keep], owner[keep]
    n_real = np.bincount(seg, minlength=len(lo))
    good = (n_real >= 1) & (n_real + n_tw <= max_bucket)
    sel = good[seg]
    seg, owner = seg[sel], owner[sel]
    if not len(seg):
        return empty, empty
    rep = n_tw[seg]
    ma = np.repeat(owner, rep)
    start = np.repeat(first[seg], rep)
    off = np.arange(rep.sum()) - np.repeat(np.r_[0, np.cumsum(rep)[:-1]], rep)
    mb = tw[start + off] & mask
    return ma, mb


def _untwinned(pairs: np.ndarray, real: int) -> np.ndarray:
    """(i, j, votes) of (real image, virtual twin ``real + b``) pairs as pairs of real images
    (i < j; a pair found from both twins keeps its most votes), sorted."""
    if not len(pairs):
        return pairs
    b = pairs[:, 1] - real
    out = np.stack([np.minimum(pairs[:, 0], b), np.maximum(pairs[:, 0], b), pairs[:, 2]], axis=1)
    out = out[np.lexsort((-out[:, 2], out[:, 1], out[:, 0]))]
    first = np.r_[True, (np.diff(out[:, 0]) != 0) | (np.diff(out[:, 1]) != 0)]
    return out[first]


SHARD_DESCRIPTORS = 1 << 18  # descriptors per shard of pair codes (orb_pairs; ~12 codes each)
DENSE_VOTES = 1 << 24  # shard pair slots counted by bincount up to this many (128 MiB), else sorted


def _sorted(a: np.ndarray) -> np.ndarray:
    """``np.sort(a)`` of int64 keys. NumPy 2's sort of 64-bit integers is a SIMD sort
    (x86-simd-sort): measured on 2.9M ORB bucket keys, 0.03 s of CPU against 0.11 s for
    Polars' sort (two threads; 0.06 s on one), which this used before."""
    return np.sort(a)


def _count_votes(codes: np.ndarray, n: int, shards: int, x: int,
                 min_votes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, votes) of shard ``x``'s pairs with at least ``min_votes`` votes, by (i, j).

    ``codes`` are the shard's pair codes ``(i // shards) * n + j`` (``i % shards == x``;
    :func:`_write_shards`). When the shard's possible pairs (``ceil(n / shards) * n``)
    number at most :data:`DENSE_VOTES`, a bincount over them (linear time), else a sort of
    the codes; the same counts either way. Only the pairs kept are turned back into (i, j).
    """
    rows = -(-n // shards)
    if rows * n <= DENSE_VOTES:
        counts = np.bincount(codes, minlength=rows * n)
        slot = np.flatnonzero(counts >= max(min_votes, 1))
        return (slot // n) * shards + x, slot % n, counts[slot]
    codes = _sorted(codes)
    edge = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else codes
    votes = np.diff(np.r_[edge, len(codes)])
    good = votes >= min_votes
    slot = codes[edge][good]
    return (slot // n) * shards + x, slot % n, votes[good]


_MASKED_SHARDS = 32  # up to this many shards, split pair codes by one mask per shard (else a sort)


def _write_shards(ma: np.ndarray, mb: np.ndarray, n: int, outs: list[Any]) -> None:
    """Pairs (``ma`` < ``mb``) to the shard files ``outs`` (shard ``ma % shards``), as
    codes ``(ma // shards) * n + mb``: one division per pair here, none per vote later.
    The order within a shard is the order of the pairs."""
    shards = len(outs)
    if shards == 1:
        outs[0].write((ma * ma.dtype.type(n) + mb).tobytes())
        return
    q, shard = np.divmod(ma, ma.dtype.type(shards))
    codes = q * ma.dtype.type(n) + mb
    if shards <= _MASKED_SHARDS:
        for x, out in enumerate(outs):
            out.write(codes[shard == x].tobytes())
        return
    order = np.argsort(shard.astype(np.uint16 if shards < 1 << 16 else np.int64), kind="stable")
    cut = np.searchsorted(shard[order], np.arange(shards + 1))
    for x, out in enumerate(outs):
        out.write(codes[order[cut[x]:cut[x + 1]]].tobytes())


def _order(img: np.ndarray, votes: np.ndarray, side: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``np.lexsort((other, side, -votes, img))``: by image, most votes first, then side, then
    the other image; one argsort of a packed int64 key when the four fit in 63 bits (every
    (image, side, other) is distinct, so the order is the same), else lexsort."""
    if not len(img):
        return np.zeros(0, np.int64)
    n = int(max(img.max(), other.max())) + 1
    top = int(votes.max()) + 1
    if n * n * 2 * top >= 1 << 63 or votes.min() < 0:
        return np.lexsort((other, side, -votes, img))
    key = ((img * top + (top - 1 - votes)) * 2 + side) * n + other
    # keys are distinct: any sort gives this order (NumPy's SIMD argsort: 0.13 s of CPU for
    # 2.9M keys, Polars' 0.28 on two threads)
    return np.argsort(key).astype(np.int64, copy=False)


class _Top:
    """Each image's ``k`` best candidate pairs, kept as pairs arrive in any order.

    Best: most votes, then pairs where the image is the first (lower) index before those
    where it is the second, then by the other image's index: the order in which the one-sort
    algorithm (ranking every pair of every image at once) breaks ties.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        z = np.zeros(0, np.int64)
        self.img, self.votes, self.side, self.other = z, z, z, z

    def add(self, i: np.ndarray, j: np.ndarray, v: np.ndarray) -> None:
        img = np.concatenate([self.img, i, j])
        votes = np.concatenate([self.votes, v, v])
        side = np.concatenate([self.side, np.zeros(len(i), np.int64), np.ones(len(j), np.int64)])
        other = np.concatenate([self.other, j, i])
        order = _order(img, votes, side, other)
        img = img[order]
        start = np.r_[0, np.flatnonzero(np.diff(img)) + 1] if len(img) else img
        rank = np.arange(len(img)) - np.repeat(start, np.diff(np.r_[start, len(img)]))
        keep = order[rank < self.k]
        self.img, self.votes = img[rank < self.k], votes[keep]
        self.side, self.other = side[keep], other[keep]

    def pairs(self, only: np.ndarray | None) -> np.ndarray:
        """(i, j, votes), i < j, sorted: the pairs among the k best of either image (with
        ``only``: of a flagged image)."""
        sel = np.ones(len(self.img), bool) if only is None else only[self.img]
        first = np.where(self.side == 0, self.img, self.other)[sel]
        second = np.where(self.side == 0, self.other, self.img)[sel]
        if not len(first):
            return np.zeros((0, 3), dtype=np.int64)
        out = np.unique(np.stack([first, second, self.votes[sel]], axis=1), axis=0)
        return out[np.lexsort((out[:, 1], out[:, 0]))]


PART_ENTRIES = 1 << 23  # descriptors sorted at once per table in orb_pairs (64 MiB of keys)
_READ = 1 << 22  # entries read per step from a key file


def _list_descriptors(feats: list[dict[str, Any] | None], tags: tuple[str, ...], per_image: int,
                      extra: Extra | None = None
                      ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    owners, descs, groups = [], [], []
    plain, flagged = _owned_sets(tags, extra, len(feats))
    for i, f in enumerate(feats):
        for tag, shift, g in (flagged if extra is not None and extra[1][i] else plain):
            d = None if f is None or tag not in f else f[tag][1]
            if d is not None and len(d):
                use = _taken(tag, len(d), per_image)
                descs.append(d[:use])
                owners.append(np.full(use, shift + i, dtype=np.int64))
                groups.append(np.full(use, g, dtype=np.uint8))
    if descs:
        yield np.concatenate(owners), np.concatenate(descs), np.concatenate(groups)


def _write_keys(source: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
                picks: list[np.ndarray], folder: Path, atom_of: np.ndarray, atoms: int,
                split: int | None = None) -> list[int]:
    """Each table's keys (uint32) to ``folder/a<atom>_<t>``, the owners (int32) to
    ``folder/a<atom>_owner``, a descriptor's atom ``atom_of`` its set (``source``: owners,
    descriptors, sets); the number of descriptors per atom. With ``split``, descriptors of
    owners >= ``split`` (virtual twins) go to ``folder/x<t>`` and ``folder/xowner`` instead
    (not counted)."""
    totals = [0] * atoms
    with ExitStack() as files:
        sets = [f"a{a}_" for a in range(atoms)] + (["x"] if split is not None else [])
        outs = [([files.enter_context(open(folder / f"{p}{t}", "wb")) for t in range(len(picks))],
                 files.enter_context(open(folder / f"{p}owner", "wb"))) for p in sets]
        for owner, desc, group in source:
            keys = _bits(desc, picks).astype(np.uint32, copy=False)
            owner32 = owner.astype(np.int32)
            atom = atom_of[group]
            if split is not None:
                atom[owner >= split] = atoms
            for a, (tabs, own) in enumerate(outs):
                sel = None if len(outs) == 1 else atom == a
                # one table's keys contiguous: a transposed copy (strided columns took longer)
                mine = (keys if sel is None else keys[sel]).T.copy()
                for t, out in enumerate(tabs):
                    out.write(mine[t])
                own.write(owner32 if sel is None else owner32[sel])
                if a < atoms:
                    totals[a] += mine.shape[1]
    return totals


def _part_entries(folder: Path, t: int, part: int, parts: int, shift: int,
                  prefix: str) -> np.ndarray:
    """(key << shift) | owner of table ``t``'s descriptors whose key % ``parts`` is ``part``
    in the key files of ``prefix`` (:func:`_write_keys`: an atom's, or x: the virtual twins')."""
    out = []
    with open(folder / f"{prefix}{t}", "rb") as kf, open(folder / f"{prefix}owner", "rb") as of:
        while True:
            keys = np.fromfile(kf, np.uint32, count=_READ)
            if not len(keys):
                break
            owner = np.fromfile(of, np.int32, count=len(keys))
            if parts > 1:
                sel = keys % parts == part
                keys, owner = keys[sel], owner[sel]
            out.append((keys.astype(np.int64) << shift) | owner.astype(np.int64))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


FLAGGED_FEW = 4  # _Votes.count: flagged images under 1 / this of all: drop the other buckets first
_BUCKET_HASH = 20  # bits of a key's hash in _flagged_buckets' table (1 MiB: stays in cache)


def _flagged_buckets(both: np.ndarray, shift: int, flags: np.ndarray) -> np.ndarray:
    """The entries of ``both`` (``(key << shift) | owner``, any order) of every bucket that
    holds an entry of a ``flags``-ed owner, in their order, and of some others: a bucket is
    kept whole or not at all (its size, ``max_bucket``, is unchanged), by a table of the low
    :data:`_BUCKET_HASH` bits of the flagged entries' keys (a bucket sharing them with one
    of those is kept too, and gives no pair with a flagged image: :func:`_bucket_pairs`'s
    ``only`` drops it)."""
    if not len(both):
        return both
    low = (1 << _BUCKET_HASH) - 1
    key = (both >> shift) & low
    table = np.zeros(1 << _BUCKET_HASH, dtype=bool)
    table[key[flags[both & ((1 << shift) - 1)]]] = True
    return both[table[key]]


def _bucket_pairs(both: np.ndarray, shift: int, code_t: Any, max_bucket: int,
                  only: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Image pairs (``ma`` < ``mb``, as ``code_t``) sharing a bucket (of 2 to ``max_bucket``
    images) in ``both`` (sorted ``(key << shift) | owner``), one entry per shared bucket."""
    if len(both) < 2:  # e.g. a part without a flagged image's bucket (_flagged_buckets)
        return []
    both = both[np.r_[True, both[1:] != both[:-1]]]  # one vote per image and bucket
    ks = both >> shift
    same = ks[1:] == ks[:-1]
    shared = np.r_[same, False] | np.r_[False, same]  # buckets of 2+ images only
    ks, os_ = ks[shared], (both[shared] & ((1 << shift) - 1)).astype(code_t)
    starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    sizes = np.diff(np.r_[starts, len(ks)])
    out = []
    for s in np.unique(sizes[(sizes >= 2) & (sizes <= max_bucket)]):
        members = os_[starts[sizes == s][:, None] + np.arange(s)]
        a, b = np.triu_indices(int(s), 1)
        ma, mb = members[:, a].ravel(), members[:, b].ravel()
        if only is not None:
            keep = only[ma] | only[mb]
            ma, mb = ma[keep], mb[keep]
        out.append((ma, mb))
    return out


def _match(pb: np.ndarray, db: np.ndarray, pa: np.ndarray, da: np.ndarray,
           ratio: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Point pairs (b, a) of descriptors passing Lowe's ratio test (2 nearest by Hamming).

    The 2 nearest come from faiss's exact Hamming k-NN (SIMD popcounts), the same distances
    and, wherever the test can pass (a unique nearest), the same index as OpenCV's
    ``batchDistance(K=2)`` at about a third of its cost; one OpenMP thread per calling
    thread (our thread pool already runs one pair per core).
    """
    import faiss  # here, not at the top: every medlake command imports this module

    if not hasattr(_LOCAL, "faiss_threads"):
        faiss.omp_set_num_threads(1)
        _LOCAL.faiss_threads = 1
    dist, idx = faiss.knn_hamming(np.ascontiguousarray(db), np.ascontiguousarray(da), 2)
    good = dist[:, 0] < ratio * dist[:, 1]
    return pb[good], pa[idx[good, 0]]


def _axes(M: np.ndarray) -> tuple[float, float, float]:
    """(larger axis scale, smaller axis scale, rotation in degrees) of an affine map's 2x2 part
    (orientation-preserving: determinant > 0, as every map :func:`_fit` keeps).

    Closed form of the 2 x 2 SVD: with ``E, H = (a + d) / 2, (c - b) / 2`` (the rotation
    part) and ``F, G = (a - d) / 2, (b + c) / 2`` (the reflection part), the singular values
    are ``sqrt(E^2 + H^2) +- sqrt(F^2 + G^2)`` and the polar rotation ``u @ vt`` turns by
    ``atan2(H, E)``: LAPACK's values to ~1e-15 at a tenth of numpy's per-call cost (~45k
    calls at 5k images).
    """
    (a, b), (c, d) = M[0, :2].tolist(), M[1, :2].tolist()
    q, r = math.hypot((a + d) / 2, (c - b) / 2), math.hypot((a - d) / 2, (b + c) / 2)
    return q + r, abs(q - r), math.degrees(math.atan2(c - b, a + d))


def _fit(fa: dict[str, Any], fb: dict[str, Any], tags: tuple[str, str], *, top: int,
         min_inliers: int, reproj: float, max_aspect: float,
         b_tag: str | None = None) -> tuple[str, int, np.ndarray] | None:
    """Best (tag, inliers, M) over ``fa``'s feature set and its mirror (``tags``), M: b -> a;
    ``fb``'s set is ``tags[0]`` (or ``b_tag``: a set of several renditions, used whole).

    ORB matches with Lowe's ratio test, then a RANSAC affine transform; one that reflects,
    stretches one axis more than ``max_aspect`` times the other or scales by more than 5x is
    not a near duplicate's and is skipped.

    The fit with the most inliers wins (the earlier tag on a tie). The set with the most
    matches is fitted first, and another set only when its matches could beat that fit's
    inliers (a fit has at most as many inliers as matches; RANSAC is deterministic per call),
    so the result is that of fitting every set in order: a copy's mirror set, a few chance
    matches, no longer costs a RANSAC run of 2,000 iterations.
    """
    pb, db = fb[b_tag or tags[0]]
    if db is None or len(db) < 2:
        return None
    if b_tag is None:
        pb, db = pb[:top], db[:top]
    found = []  # (matches, order, tag, src, dst)
    for n, tag in enumerate(tags):
        pa, da = fa[tag][0][:top], (None if fa[tag][1] is None else fa[tag][1][:top])
        if da is None or len(da) < 2:
            continue
        src, dst = _match(pb, db, pa, da)
        if len(src) >= max(4, min_inliers):
            found.append((len(src), n, tag, src, dst))
    best, rank = None, None  # rank: (inliers, -order) of the best fit so far
    for count, n, tag, src, dst in sorted(found, key=lambda f: (-f[0], f[1])):
        if rank is not None and (count, -n) <= rank:
            continue  # cannot beat the best fit: too few matches
        M, inl = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=reproj,
                                      maxIters=2000, confidence=0.995)
        if M is None or M[0, 0] * M[1, 1] - M[0, 1] * M[1, 0] <= 0:  # reflects (or degenerate)
            continue
        big, small, _ = _axes(M)
        if big > max_aspect * small or not 0.2 < np.sqrt(big * small) < 5:
            continue
        n_in = int(inl.sum())
        if rank is None or (n_in, -n) > rank:
            best, rank = (tag, n_in, M), (n_in, -n)
    return best


def _stretched_fit(fa: dict[str, Any], fb: dict[str, Any],
                   kw: dict[str, Any]) -> tuple[str, int, np.ndarray] | None:
    """:func:`_fit` of a thumbnail's stretched low renditions (``lx``:
    :func:`pipelines.features._stretched`)
    against the other image's low rendition and its mirror; (tag, inliers, M: b -> a) as
    :func:`_fit` gives, tag ``lx`` or ``lxm`` (a mirrored).

    The stretched set is always the side matched *from* (``b`` of :func:`_fit`), so that each
    of its descriptors looks for its two nearest in one rendition (looked for among several
    renditions of one point, the ratio test would fail): when ``a`` is the thumbnail the two
    are swapped and the map turned back, ``M = F_a inv(M') F_b`` when mirrored (``F``: an
    image's left-right flip in the 256-px frame).
    """
    named = {"lo": "lx", "lom": "lxm"}
    if "lx" in fb:
        got = _fit(fa, fb, ("lo", "lom"), b_tag="lx", **kw)
        return None if got is None else (named[got[0]], *got[1:])
    if "lx" not in fa or (got := _fit(fb, fa, ("lo", "lom"), b_tag="lx", **kw)) is None:
        return None
    tag, n_in, M = got
    back = np.linalg.inv(_affine3(M))
    if tag == "lom":  # M: a -> mirrored b; wanted: b -> mirrored a
        back = _flip(fa["g"].shape[1]) @ back @ _flip(fb["g"].shape[1])
    return named[tag], n_in, back[:2]


_SETS = {"lo": "low", "lom": "low", "lx": "stretched", "lxm": "stretched"}  # evidence.features


def _more_inliers(fit: tuple[str, int, np.ndarray] | None,
                  got: tuple[str, int, np.ndarray] | None) -> tuple[str, int, np.ndarray] | None:
    """The fit of the two with more inliers (``fit`` on a tie; None: none)."""
    return got if got is not None and (fit is None or got[1] > fit[1]) else fit


def _flip(width: int) -> np.ndarray:
    """3 x 3 left-right flip of pixel coordinates in a frame ``width`` px wide."""
    return np.array([[-1.0, 0, width - 1], [0, 1, 0], [0, 0, 1]])


def _affine3(M: np.ndarray) -> np.ndarray:
    return np.vstack([M, [0.0, 0.0, 1.0]])


def _refine(tmpl: np.ndarray, img: np.ndarray, M: np.ndarray, sigma: float, *,
            masks: tuple[np.ndarray, np.ndarray], max_linear: float = 0.1,
            max_shift: float = 4.0) -> np.ndarray:
    """``M`` (img -> tmpl) refined by ECC on both images blurred by ``sigma``, at half size.

    Used for coarse pairs (``refine_from``): there the transform comes from few, coarse
    keypoints (thumbnails, low renditions) and is off by a sizeable part of the common pixel.
    Fine pairs keep RANSAC's transform: measured on the generator, ECC there gained nothing
    and on chest X-rays (strong periodic ribs, tone changes) it sometimes slid off the true
    alignment. A refinement that moves the map by more than ``max_linear`` (linear part) or
    ``max_shift`` half-size pixels is a slide onto something else and is dropped. The flat
    black fill of *both* images (:func:`_content`: a rotation's corners, padding) is masked
    out of the correlation: a rotated copy taken as the template once pulled the map towards
    its black corners (measured: 1024-px chest X-rays cropped, resized back and rotated 4-7
    degrees, 20 of 48 verified with the input's fill masked only, 44 of 48 with both).
    ``masks``: :func:`_content` of ``tmpl`` and ``img`` (:func:`_compare` makes them once).
    """
    def half(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = x.shape
        size = (max(8, round(w / 2)), max(8, round(h / 2)))
        small = cv2.resize(cv2.GaussianBlur(x, (0, 0), sigma), size, interpolation=cv2.INTER_AREA)
        return small, _frame_map(x.shape, small.shape)

    t, st = half(tmpl)
    i, si = half(img)
    w0 = (si @ np.linalg.inv(_affine3(M)) @ np.linalg.inv(st))[:2].astype(np.float32)  # t -> i
    ct, ci = masks
    mask = cv2.resize(ci, (i.shape[1], i.shape[0]), interpolation=cv2.INTER_NEAREST)
    tmask = cv2.resize(ct, (t.shape[1], t.shape[0]), interpolation=cv2.INTER_NEAREST)
    if mask.sum() < 64 or tmask.sum() < 64:
        return M
    try:  # both images' flat black fill (a rotation's corners, padding) masked out
        _, w1 = cv2.findTransformECCWithMask(
            t, i, tmask, mask, w0.copy(), cv2.MOTION_AFFINE,
            (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, ECC_EPS), 1)
    except cv2.error:  # did not converge
        return M
    if np.abs(w1[:, :2] - w0[:, :2]).max() > max_linear or np.abs(w1[:, 2] - w0[:, 2]).max() > max_shift:
        return M
    return np.linalg.inv(np.linalg.inv(si) @ _affine3(w1) @ st)[:2]


def _reduced(x: np.ndarray, f: float, content: np.ndarray | None = None) -> np.ndarray:
    """``x`` area-reduced by ``f`` (> 1) a side, flat black fill kept exactly 0 (``content``:
    :func:`_content` of ``x`` when the caller has it)."""
    h, w = x.shape
    size = (max(8, round(w / f)), max(8, round(h / f)))
    out = cv2.resize(x, size, interpolation=cv2.INTER_AREA)
    content = _content(x) if content is None else content
    fill = cv2.resize(1 - content, size, interpolation=cv2.INTER_NEAREST) > 0
    out[fill] = 0
    return out


def _scaled(T: np.ndarray, tmpl: tuple[tuple[int, ...], tuple[int, ...]],
            img: tuple[tuple[int, ...], tuple[int, ...]]) -> np.ndarray:
    """The map ``T`` (img -> tmpl) between the two images reduced: ``tmpl`` and ``img`` are
    (reduced shape, shape) each. Per axis by each image's own factor (pixel centres kept):
    :func:`_reduced` rounds each side, so a side's factor is not exactly ``f`` (by up to
    half a reduced pixel over the side, in a different direction per image and axis; the
    map by ``f`` alone left coarse pairs that far off at the far edge)."""
    return (np.linalg.inv(_frame_map(*tmpl)) @ _affine3(T) @ _frame_map(*img))[:2]


def _content(img: np.ndarray) -> np.ndarray:
    """1 where ``img`` has content, 0 on flat black fill (3 x 3 blocks at most
    :data:`FILL_MAX` and their edge): the corners a rotation or padding filled, which hold no
    detail of either image.

    ``img`` is an equalised frame. Fill is exactly 0 only when nothing touched it: JPEG's
    ringing and resampling leave it a few grey levels above, which equalisation spreads, and
    those edges then dominated the band-pass detail of rotated JPEG copies (measured, 5k:
    19 more true pairs with the tolerance, no false one; 0 of 3,257 lookalikes either way).
    """
    zero = cv2.erode((img <= FILL_MAX).astype(np.uint8), np.ones((3, 3), np.uint8))
    return 1 - cv2.dilate(zero, np.ones((5, 5), np.uint8))


def _banded(tmpl: np.ndarray, img: np.ndarray, M: np.ndarray, s1: float, s2: float,
            masks: tuple[np.ndarray, np.ndarray] | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(band of ``tmpl``, band of ``img`` warped by ``M``, the warped image, the inner
    support): what :func:`_band_ncc` and :func:`_motion` compare.

    The band is a difference of Gaussians (``s1``, ``s2``) computed by normalised convolution
    inside the support both images share (the warped footprint less flat black fill on either
    side), so no edge appears where one image ends. None when the support is under a tenth
    of the template. ``masks``: :func:`_content` of ``tmpl`` and ``img`` when the caller
    has them.
    """
    h, w = tmpl.shape
    ct, ci = masks or (_content(tmpl), _content(img))
    warped = cv2.warpAffine(img, M, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    foot = cv2.warpAffine(ci, M, (w, h), flags=cv2.INTER_NEAREST)
    foot = cv2.erode(foot, np.ones((3, 3), np.uint8)) & ct
    inner = cv2.erode(foot, np.ones((7, 7), np.uint8)) > 0
    if inner.sum() < 0.1 * h * w:
        return None
    m = foot.astype(np.float32)
    norm = {sg: np.maximum(cv2.GaussianBlur(m, (0, 0), sg), 1e-3) for sg in (s1, s2)}

    def band(x: np.ndarray) -> np.ndarray:
        xm = x * m
        return cv2.GaussianBlur(xm, (0, 0), s1) / norm[s1] - cv2.GaussianBlur(xm, (0, 0), s2) / norm[s2]

    return band(tmpl), band(warped), warped, inner


def _band_ncc(bands: tuple[np.ndarray, ...]) -> tuple[float, float]:
    """(NCC of band-pass detail, overlap fraction) of :func:`_banded`'s bands."""
    ba, bb, _, inner = bands
    xa, xb = ba[inner], bb[inner]
    xa, xb = xa - xa.mean(), xb - xb.mean()
    ncc = float((xa * xb).sum() / max(np.sqrt((xa**2).sum() * (xb**2).sum()), 1e-9))
    return ncc, float(inner.mean())


def _motion(tmpl: np.ndarray, bands: tuple[np.ndarray, ...]) -> float | None:
    """Local motion left between ``tmpl`` and the image :func:`_banded` warped onto it
    (``bands``: its result) once the best single affine map is taken out: the 75th percentile
    of the residual optical flow (Farneback, pixels of these frames) over the pixels with the
    most band-pass detail (:data:`MOTION_DETAIL`). None when too few pixels have detail.

    A copy is one picture under one affine map: after the map, what flow is left is a
    fraction of a pixel of noise plus whatever affine error RANSAC left, which the fit
    removes. A repeat capture of the same patient agrees under the map on the whole, but
    its own detail (texture, markers, a breath) would have to move by pixels to coincide,
    in directions no single map gives. Measured on five generated sets at 1-4x the default
    size (every verified pair at NCC 0.74-0.90): copies passing the NCC line by under
    :data:`MOTION_MARGIN` 0.1-1.6 px, the false pairs that passed it 1.8-4.9 px. The fit is
    least squares, refitted without its worst fifth of residuals (a copy's flow is
    sometimes wild in a flat corner).
    """
    ba, bb, warped, inner = bands
    detail = np.abs(ba) + np.abs(bb)
    use = inner & (detail >= np.quantile(detail[inner], MOTION_DETAIL))
    if use.sum() < 32:
        return None
    flow = cv2.calcOpticalFlowFarneback(np.clip(tmpl, 0, 255).astype(np.uint8),
                                        np.clip(warped, 0, 255).astype(np.uint8), None,
                                        0.5, 3, 15, 3, 5, 1.2, 0)
    ys, xs = np.nonzero(use)
    X = np.stack([xs, ys, np.ones_like(xs)], 1).astype(np.float64)
    F = flow[ys, xs].astype(np.float64)
    coef = np.linalg.lstsq(X, F, rcond=None)[0]
    res = np.sqrt(((F - X @ coef) ** 2).sum(1))
    keep = res <= np.quantile(res, 0.8)
    coef = np.linalg.lstsq(X[keep], F[keep], rcond=None)[0]
    return float(np.quantile(np.sqrt(((F - X @ coef) ** 2).sum(1)), 0.75))


def passes(ncc: float, ev: dict[str, Any]) -> bool:
    """A comparison's verdict: its NCC reaches its threshold and no motion check failed, or
    (the finer frame's comparison only) the pair is ``still`` there (:func:`_compare`)."""
    return (ncc >= ev["threshold"] and not ev.get("moved", False)) or bool(ev.get("still"))


def threshold(pixel: float, p: dict[str, Any]) -> float:
    """The NCC a pair compared at common pixel size ``pixel`` (256-px frame) must reach.

    ``ncc`` up to :data:`COARSE_FROM`, rising linearly to ``ncc_coarse`` at :data:`COARSE_TO`.
    """
    base = float(p["ncc"])
    coarse = max(base, float(p.get("ncc_coarse", base)))
    t = min(max((pixel - COARSE_FROM) / (COARSE_TO - COARSE_FROM), 0.0), 1.0)
    return base + (coarse - base) * t


def verify(file_a: str, file_b: str, *, cache: dict[Any, Any], keys: tuple[Any, Any],
           p: dict[str, Any]) -> dict[str, Any]:
    """``verified``, ``inliers``, ``ncc``, ``transform`` (e.g. 'mirror,rot=-7,scale=0.45').

    ``transform`` describes the map from b into a: rotation, scale (geometric mean of the
    two axis scales) and, when they differ by more than 5%, ``aspect`` (their ratio).
    ``evidence`` holds the inliers, the NCC, the band's sigma, the common pixel size, the
    threshold it had to reach and the feature set that matched (``low`` for the low
    renditions).

    When both images are :data:`FINE_FROM` px or more on their longer side, a pair that
    passes is compared again in their finer frames (:func:`fine_frame`: half each image's side, at least
    :data:`FINE_FROM` and at most :data:`FINE_SIDE`, :func:`fine_side`; RANSAC's map carried over and refined by ECC; at the
    coarser of the two), and verified only if it passes there too: ``ncc`` is then that
    second NCC, ``evidence.fine`` its evidence. A pair at :data:`FINE_SKIP` or more in the
    256-px frame is not compared again: repeat captures that pass that frame agree at
    0.78-0.87 there (measured on four generated sets at 2.5-4x), and the second comparison
    rejected as many copies as captures (5k: no image is that large). A pair under the line
    there is still verified when no more than ``still_max`` px of local motion is left under
    one affine map (``evidence.fine.still``: a copy whose finest detail was smoothed).

    A thumbnail whose full-frame fit is weak (under :data:`WEAK` x ``min_inliers``) is also
    fitted by its low renditions; the map with the better NCC counts. A larger pair with no
    full-frame fit at all is fitted by its low renditions when ``low_fallback`` > 0, the fit
    taken from ``low_fallback`` x ``min_inliers`` inliers.
    """
    fa, fb = (_cached(cache, k, lambda f=f: features(f))
              for k, f in zip(keys, (file_a, file_b), strict=True))
    none = {"verified": False, "inliers": 0, "ncc": None, "transform": ""}
    if fa is None or fb is None or fb["n"][1] is None and fb.get("lo", _EMPTY)[1] is None:
        return {**none, "evidence": {"error": "unreadable image"}}
    top, min_in = int(p.get("match_features", NFEATURES)), int(p["min_inliers"])
    aspect = float(p.get("max_aspect", 2.0))
    fit = _fit(fa, fb, ("n", "m"), top=top, min_inliers=min_in, reproj=4.0, max_aspect=aspect)
    small = int(p.get("small_side", 0))
    rival = None  # the low renditions' map of a thumbnail whose full fit is weak
    low = {"top": top, "min_inliers": min_in, "reproj": 4.0 * SIDE / LOW_GRID,
           "max_aspect": aspect}
    if small and min(fa["side"], fb["side"]) <= small and "lo" in fa and "lo" in fb:
        # a thumbnail: while no fit has min_in inliers, its low renditions are fitted, then
        # their stretched forms (a squeezed crop), the most inliers win (4 px there are
        # 4 * 256/96 here); a weak full fit (under WEAK x min_in inliers) competes with the
        # low renditions' map by the NCC each gives
        if fit is None or fit[1] < WEAK * min_in:
            got_low = _fit(fa, fb, ("lo", "lom"), **low)
            if fit is None or fit[1] < min_in:
                fit = _more_inliers(fit, got_low)
            else:
                rival = got_low
        if fit is None or fit[1] < min_in:
            fit = _more_inliers(fit, _stretched_fit(fa, fb, low))
    elif fit is None and int(p.get("low_fallback", 0)) > 0 and "lo" in fa and "lo" in fb:
        # no full-frame fit of a larger pair: the low renditions' map, from low_fallback x
        # min_in inliers (a chest-X-ray crop of 174 px upsampled into the 256-px frame: no
        # fit there, 58 inliers and NCC 0.91 under the low renditions' map)
        fit = _fit(fa, fb, ("lo", "lom"), **{**low, "min_inliers": int(p["low_fallback"]) * min_in})
    if fit is None:
        return none
    res, M, mirror = _judged(fa, fb, fit, p, min_in)
    if rival is not None:  # (too few inliers: _judged gives no NCC, and it is not taken)
        other = _judged(fa, fb, rival, p, min_in)
        if other[0]["ncc"] is not None and (res["ncc"] is None or other[0]["ncc"] > res["ncc"]):
            res, M, mirror = other
    if res["ncc"] is None:
        return res
    ncc = res["ncc"]
    if (not res["verified"] or ncc >= FINE_SKIP
            or min(fine_side(fa["side"]), fine_side(fb["side"])) <= SIDE):
        return res
    # Both images are FINE_FROM px or more: the frame compared them 1.5x+ coarser than both
    # resolve, where a repeat capture's own fine detail is averaged away. Compared again in
    # their finer frames (fine_frame; RANSAC's map carried over, refined by ECC), at the
    # coarser of the two, the pair must pass there too.
    # (held in the verification cache under ("fine", key): few images need one)
    ga, gb = (_cached(cache, ("fine", k), lambda f=f: fine_frame(f))
              for k, f in zip(keys, (file_a, file_b), strict=True))
    if ga is None or gb is None:  # decodable a moment ago: changed or removed since
        return {**res, "verified": False,
                "evidence": {**res["evidence"], "fine": None, "error": "unreadable image"}}
    Mf = (_frame_map(fa["g"].shape, ga.shape) @ _affine3(M)
          @ np.linalg.inv(_frame_map(fb["g"].shape, gb.shape)))[:2]
    again = _compare(np.ascontiguousarray(ga[:, ::-1]) if mirror else ga, gb, Mf, 1.0, 1.0, p,
                     frames=(max(ga.shape) / SIDE, max(gb.shape) / SIDE), refine=True)
    if again is None:
        return {**res, "verified": False, "evidence": {**res["evidence"], "fine": None}}
    fncc, fev = again
    return {**res, "ncc": fncc, "verified": passes(fncc, fev),
            "evidence": {**res["evidence"], "fine": fev}}


def _judged(fa: dict[str, Any], fb: dict[str, Any], fit: tuple[str, int, np.ndarray],
            p: dict[str, Any], min_in: int) -> tuple[dict[str, Any], np.ndarray, bool]:
    """(verify's result, map, mirrored) of one fit (tag, inliers, M: b -> a), compared in
    the 256-px frames; ``ncc`` None when it has too few inliers or too little overlap."""
    tag, n_in, M = fit
    mirror = tag in ("m", "lom", "lxm")
    big, sm, angle = _axes(M)
    scale = float(np.sqrt(big * sm))
    desc = (f"{'mirror,' if mirror else ''}rot={angle:+.0f},scale={scale:.2f}"
            + (f",aspect={big / sm:.2f}" if big > 1.05 * sm else ""))
    res = {"verified": False, "inliers": n_in, "ncc": None, "transform": desc}
    if n_in < min_in:
        return res, M, mirror
    ga = np.ascontiguousarray(fa["g"][:, ::-1]) if mirror else fa["g"]
    got = _compare(ga, fb["g"], M, fa["up"], fb["up"], p)
    if got is None:
        return res, M, mirror
    ncc, ev = got
    return ({**res, "ncc": ncc, "verified": passes(ncc, ev),
             "evidence": {"inliers": n_in, **ev,
                          **({"features": _SETS[tag]} if tag in _SETS else {})}}, M, mirror)


def _frame_map(small: tuple[int, ...], large: tuple[int, ...]) -> np.ndarray:
    """3 x 3 map from pixel coordinates of a frame of shape ``small`` to one of ``large``
    (the same picture; pixel centres kept: ``x' = (x + .5) * f - .5`` per axis)."""
    fy, fx = large[0] / small[0], large[1] / small[1]
    return np.array([[fx, 0, (fx - 1) / 2], [0, fy, (fy - 1) / 2], [0, 0, 1.0]])


def _compare(ga: np.ndarray, gb: np.ndarray, M: np.ndarray, up_a: float, up_b: float,
             p: dict[str, Any], *, frames: tuple[float, float] = (1.0, 1.0),
             refine: bool = False, retry: bool = True,
             masks: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, dict[str, Any]] | None:
    """(NCC, evidence) of the band-pass detail of ``gb`` mapped by ``M`` (b -> a) onto ``ga``
    (equalised grey frames; ``up_*``: each image's upsampling into its frame), at the
    coarser of the two resolutions; None when they overlap too little.

    ``frames``: each frame's side in units of the 256-px frame (the NCC threshold's coarse
    ramp is in those units); ``refine``: refine ``M`` by ECC first (a map carried over from
    other frames: verify's second comparison, the only caller that sets it, which also gets
    the stillness check under its line, ``duplicates.still_max``: evidence ``motion`` and
    ``still``). A fine pair just over its line gets the motion check (evidence ``motion``,
    ``moved`` and the limit that applied, ``motion_max``: ``duplicates.motion_unscaled`` when
    ``M`` resamples neither axis, ``duplicates.motion_max`` otherwise).

    A fine pair (common pixel under ``refine_from``) from :data:`RETRY_FROM` up to the line
    is refined by ECC and compared again (the better NCC counts). A pair from
    :data:`RETRY_FROM` up to the line whose ``M`` scales an axis by more than
    :data:`RESAMPLED` (one image is the other resized) gets one more comparison as if the
    common pixel were :data:`SECOND_BAND` times coarser (at least ``COARSE_FROM``), while that
    pixel's threshold still rises (under ``COARSE_TO``); it passes if that comparison clears
    its own threshold by :data:`SECOND_MARGIN` (evidence ``coarser``: the factor). Measured
    (bench/duplicates.py): crops resized to 224 px from 640-1024-px images fell under the
    line at the common pixel (0.52-0.78) and reach 0.85-0.97 one band coarser; same-size
    look-alikes get no second comparison (6 repeat captures at 5k passed one when they did),
    nor do thumbnails already at ``ncc_coarse`` (CXR thumbnails of other patients passed).

    ``masks``: :func:`_content` of ``ga`` and ``gb`` when the caller has them; each frame's
    mask is made once per comparison and handed to the steps that need it.
    """
    big, sm, _ = _axes(M)
    scale = float(np.sqrt(big * sm))
    resampled = not 1 / RESAMPLED <= sm <= big <= RESAMPLED  # one image is the other resized
    ga, gb = ga.astype(np.float32, copy=False), gb.astype(np.float32, copy=False)
    masks = masks or (_content(ga), _content(gb))
    # the template is the image the other one covers (a crop is compared inside its source)
    if scale * scale * gb.size >= ga.size:
        tmpl, img, T, pixel, frame = ga, gb, M, max(up_a, up_b * big), frames[0]
        held = masks
    else:
        T = cv2.invertAffineTransform(M)
        tmpl, img, pixel, frame = gb, ga, max(up_b, up_a / sm), frames[1]
        held = masks[::-1]
    s1 = max(BAND_MIN, BAND * pixel)  # the band: DoG(s1, 3 s1) at the common pixel
    grid = s1 / BAND_MIN  # > 1: coarse; compare on a grid of the band's scale (area-reduced
    if grid > 1.0:        # by `grid` a side): the same band, grid^2 times fewer pixels
        rt, ri = _reduced(tmpl, grid, held[0]), _reduced(img, grid, held[1])
        tmpl, img, T = rt, ri, _scaled(T, (rt.shape, tmpl.shape), (ri.shape, img.shape))
        held = (_content(tmpl), _content(img))
    coarse = refine or pixel >= float(p.get("refine_from", 1.5))
    if coarse:
        T = _refine(tmpl, img, T, BAND_MIN, masks=held)
    bands = _banded(tmpl, img, T, BAND_MIN, 3 * BAND_MIN, held)
    if bands is None:
        return None
    ncc, overlap = _band_ncc(bands)
    need = threshold(pixel / frame, p)
    if not coarse and RETRY_FROM <= ncc < need:
        # a fine pair just under the line: RANSAC's map may be a fraction of a pixel off
        # (crops combined with a rotation or relighting); refined once by ECC, the better counts
        again = _banded(tmpl, img, _refine(tmpl, img, T, BAND_MIN, masks=held), BAND_MIN,
                        3 * BAND_MIN, held)
        if again is not None and (got := _band_ncc(again))[0] > ncc:
            (ncc, overlap), bands = got, again
    f = max(SECOND_BAND, COARSE_FROM / pixel)
    if (retry and not refine and RETRY_FROM <= ncc < need and f * pixel / frame < COARSE_TO
            and resampled):
        # one image is the other resized: one comparison f times coarser (see the docstring)
        got = _compare(ga, gb, M, up_a * f, up_b * f, p, frames=frames, retry=False,
                       masks=masks)
        if got is not None and got[0] >= got[1]["threshold"] + SECOND_MARGIN:
            return got[0], {**got[1], "coarser": round(f, 2)}
    ev = {"ncc": round(ncc, 4), "band_sigma": round(s1, 2), "grid": round(max(grid, 1.0), 2),
          "pixel": round(pixel, 2), "threshold": round(need, 3), "overlap": round(overlap, 3)}
    # A copy has no local motion left under one affine map, a repeat capture of the same
    # patient has pixels of it (_motion, on the bands of the comparison that counts). Asked
    # just over the line at a fine common pixel (a capture gets there too: "moved" rejects),
    # and in the finer frame's comparison (refine: verify's second one) under its line (a
    # copy whose finest detail JPEG or interpolation smoothed: "still" accepts).
    limit, still = float(p.get("motion_max", 0.0)), float(p.get("still_max", 0.0))
    near = limit > 0 and pixel / frame < COARSE_FROM and need <= ncc < need + MOTION_MARGIN
    unscaled = float(p.get("motion_unscaled", 0.0))  # a copy at its own size (0: motion_max)
    if near and unscaled > 0 and not resampled:  # a map that resamples neither axis
        limit = min(limit, unscaled)
    under = refine and still > 0 and STILL_FROM <= ncc < need
    if near or under:
        moved = _motion(tmpl, bands)
        if moved is not None:
            ev = {**ev, "motion": round(moved, 2),
                  **({"moved": moved > limit, "motion_max": limit} if near
                     else {"still": moved <= still})}
    return ncc, ev
