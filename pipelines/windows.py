"""Candidates of thumbnails by their tiny colour renditions: the source a crop squeezed to a
few dozen pixels was cut from.

A thumbnail such as DermaMNIST's (a dermoscopy image, or a crop of one, resized to 28-64 px
squares) keeps too few pixels for ORB: its low rendition has few corners, and those it has
rarely share a bucket with its source's (measured, generated 5k set, seed 1: 4 of the 5
dermoscopy thumbnails missed were no candidate, 3 of them without one shared bucket). What
it keeps is its layout and its colours at the scale of a few cells: this module searches
by those.

Every image's tiny rendition (:func:`pipelines.features.tiny`: the whole image area-reduced
to 32 x 32, CIELAB) is cut into *windows*: a window's side is 0.55, 0.7, 0.85 or 1 of the
image's side along each axis independently (so a crop of 30-100% of the area with its aspect
changed by up to ~1.8 is within half a step of one), placed every :data:`STEP` of the side.
Each window, area-reduced to a few cells and squeezed to a square as the thumbnail was, is a
vector (L*, and a*, b* weighted by :data:`CHROMA`; each channel's mean removed, then scaled to
unit length): the thumbnail's own vector, and its mirror's (:data:`FLIPS`), is compared with
every window by a dot product (a normalised cross-correlation of the cells).

Two stages keep the cost to a small part of the stage's: 4 x 4 cells and windows every 0.1
over every image (169 windows per image) give each thumbnail a shortlist of the
:data:`SHORTLIST` images with the best window; 8 x 8 cells around that window (sides +-0.075,
places +-0.05 and centred) rank the shortlist, and the ``k`` best become candidates (method
``window``), verified as any other pair. The search is exact and blocked: memory is a block
of windows, never N x N.

Thumbnails are compared with every image: the cost grows with thumbnails x images (generated
5k set: 107 thumbnails and their mirrors, ~2 CPU-s over two BLAS threads, ~0.4 ms per
image; docs/SCALING.md has the projection).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from medlake.pipelines.features import TINY, FeatureStore

SIZES = (0.55, 0.7, 0.85, 1.0)  # window sides, as fractions of the image's side (per axis)
STEP = 0.1  # stage 1: windows placed every this fraction of the side
CELLS = (4, 8)  # cells per window side: stage 1, stage 2
SHORTLIST = 24  # images per thumbnail that stage 2 ranks
CHROMA = 2.0  # weight of a* and b* against L* (dermoscopy is told apart by its colours)
NEAR = (0.075, 0.05)  # stage 2: window sides and places around stage 1's best window
BLOCK = 128  # images whose windows are held at once (stage 1)
QUERIES = 512  # thumbnails compared with a block at once; pairs of stage 2 at once (~32 MB)
FLIPS = ((False, False), (False, True))  # each thumbnail as it is and mirrored (flip up-down,
# flip left-right)


@lru_cache(maxsize=4096)
def _cells(start: float, size: float, cells: int) -> np.ndarray:
    """(cells, TINY): area weights that reduce the window [start, start + size) (fractions of
    the side) of a TINY-px axis to ``cells`` cells."""
    out = np.zeros((cells, TINY), np.float32)
    for c in range(cells):
        a, b = (start + c * size / cells) * TINY, (start + (c + 1) * size / cells) * TINY
        for px in range(int(a), min(TINY, int(np.ceil(b)))):
            out[c, px] = max(0.0, min(b, px + 1) - max(a, px))
        out[c] /= out[c].sum()
    return out


Axis = tuple[tuple[float, float], ...]  # windows along one axis: (start, size) each


def grid(step: float = STEP) -> Axis:
    """(start, size) of every window along one axis: each of :data:`SIZES`, every ``step``."""
    return tuple((round(float(s), 4), size) for size in SIZES
                 for s in np.linspace(0.0, 1.0 - size, round((1.0 - size) / step) + 1))


def _near(start: float, size: float) -> Axis:
    """Stage 2's windows along one axis around (start, size): sides +-NEAR[0], places
    +-NEAR[1] and the same centre, kept inside the image."""
    out = set()
    for s in (size - NEAR[0], size, size + NEAR[0]):
        s = min(max(s, SIZES[0] - NEAR[0]), 1.0)
        for x in (start - NEAR[1], start, start + NEAR[1], start + (size - s) / 2):
            out.add((round(min(max(x, 0.0), 1.0 - s), 4), round(s, 4)))
    return tuple(sorted(out))


@lru_cache(maxsize=256)
def _axis(windows: Axis, cells: int) -> np.ndarray:
    """(len(windows) x cells, TINY): the area weights of every window along one axis."""
    return np.concatenate([_cells(a, s, cells) for a, s in windows])


def _planes(tiny: np.ndarray) -> np.ndarray:
    """(n, 3, TINY, TINY) float32 of tiny renditions (n, TINY, TINY, 3): L*, and a*, b*
    weighted by :data:`CHROMA`."""
    x = tiny.astype(np.float32).transpose(0, 3, 1, 2)
    x[:, 1:] *= CHROMA
    return x


def _vectors(planes: np.ndarray, rows: Axis, cols: Axis, cells: int) -> np.ndarray:
    """(n, len(rows) x len(cols), 3 x cells^2): each window's cells, each channel's mean
    removed, scaled to unit length (windows ordered row window first)."""
    v = _axis(rows, cells) @ planes @ _axis(cols, cells).T  # (n, 3, rows x cells, cols x cells)
    n = len(planes)
    v = v.reshape(n, 3, len(rows), cells, len(cols), cells).transpose(0, 2, 4, 1, 3, 5)
    v = v.reshape(n, len(rows) * len(cols), 3, cells * cells)
    v -= v.mean(-1, keepdims=True)
    v = v.reshape(n, len(rows) * len(cols), 3 * cells * cells)
    v /= np.linalg.norm(v, axis=-1, keepdims=True) + 1e-3
    return v


def _whole(planes: np.ndarray, cells: int) -> np.ndarray:
    """(n, 3 x cells^2): each image's own vector (its one window, the whole image)."""
    return _vectors(planes, ((0.0, 1.0),), ((0.0, 1.0),), cells)[:, 0]


def window_pairs(store: FeatureStore, thumbs: np.ndarray, usable: np.ndarray, *,
                 k: int) -> list[tuple[int, int, float]]:
    """(thumbnail, image, score) of each thumbnail's ``k`` best images, best first.

    ``thumbs`` and ``usable`` flag images of ``store`` (each with its tiny rendition): the
    thumbnails searched for, and the images searched (a thumbnail is never its own
    candidate; a flat one, of one colour, has nothing to correlate and is not searched). The
    score is stage 2's: the best correlation of the thumbnail, or its mirror, with a window
    of the image.
    """
    q = np.flatnonzero(thumbs & usable)
    pool = np.flatnonzero(usable)
    if not len(q) or k <= 0 or len(pool) < 2:
        return []
    c1, c2 = CELLS
    qt = store.tiny(q)
    qp = np.concatenate([_planes(qt[:, ::-1 if ud else 1, ::-1 if lr else 1]) for ud, lr in FLIPS])
    q2 = _whole(qp, c2)  # stage 2's vector of each thumbnail as each flip (flip-major rows)
    # a flat thumbnail (one colour: a zero vector under every flip) matches nothing
    some = np.tile(np.linalg.norm(q2[: len(q)], axis=1) > 0.5, len(FLIPS))
    q, qp, q2 = np.tile(q, len(FLIPS))[some], qp[some], q2[some]
    if not len(q):
        return []
    q1 = _whole(qp, c1)
    g = grid()
    w1 = len(g)
    m = min(SHORTLIST, len(pool) - 1)
    top = np.full((len(q), m), -np.inf, np.float32)  # stage 1's best images per thumbnail
    who = np.zeros((len(q), m), np.int64)
    arg = np.zeros((len(q), m), np.int32)
    for s in range(0, len(pool), BLOCK):
        rows = pool[s:s + BLOCK]
        v = _vectors(_planes(store.tiny(rows)), g, g, c1)
        flat = v.reshape(len(rows) * w1 * w1, -1)
        for t in range(0, len(q), QUERIES):
            sc = (q1[t:t + QUERIES] @ flat.T).reshape(-1, len(rows), w1 * w1)
            where = sc.argmax(-1)  # one pass; the best read back at it
            best = np.take_along_axis(sc, where[..., None], -1)[..., 0]
            where = where.astype(np.int32)
            best[q[t:t + QUERIES, None] == rows[None, :]] = -np.inf  # never itself
            both = np.concatenate([top[t:t + QUERIES], best], 1)
            keep = np.argpartition(-both, m - 1, axis=1)[:, :m]
            ids = np.concatenate([who[t:t + QUERIES], np.broadcast_to(rows, best.shape)], 1)
            at = np.concatenate([arg[t:t + QUERIES], where], 1)
            top[t:t + QUERIES] = np.take_along_axis(both, keep, 1)
            who[t:t + QUERIES] = np.take_along_axis(ids, keep, 1)
            arg[t:t + QUERIES] = np.take_along_axis(at, keep, 1)
    # stage 2, grouped by stage 1's best window (the same finer windows for each image)
    r, x = np.nonzero(np.isfinite(top))
    images, near = who[r, x], arg[r, x]
    score = np.empty(len(r), np.float32)
    order = np.argsort(near, kind="stable")
    for same in np.split(order, np.flatnonzero(np.diff(near[order])) + 1):
        w = int(near[same[0]]) if len(same) else 0
        for at in range(0, len(same), QUERIES):
            part = same[at:at + QUERIES]
            v = _vectors(_planes(store.tiny(images[part])), _near(*g[w // w1]),
                         _near(*g[w % w1]), c2)
            score[part] = np.einsum("nwd,nd->nw", v, q2[r[part]]).max(1)
    found: dict[int, dict[int, float]] = {}
    for i, j, x in zip(q[r].tolist(), images.tolist(), score.tolist(), strict=True):
        got = found.setdefault(i, {})
        got[j] = max(x, got.get(j, -np.inf))
    out = []
    for i, got in found.items():
        for j, x in sorted(got.items(), key=lambda t: (-t[1], t[0]))[:k]:
            out.append((i, j, x))
    return out
