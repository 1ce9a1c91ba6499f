"""Pair verification for ``duplicates``: ORB + RANSAC similarity, then fine-detail correlation.

A near duplicate is one picture changed by a similarity transform (crop, resize, rotation,
mirror) and a monotonic intensity change (JPEG, relighting): after alignment its band-pass
detail correlates with its source. A repeat capture of the same lesion or patient has the
same anatomy but its own noise, hairs, markers and pose, so the correlation stays low.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from catalog.imageio import ImageReadError, load_rgb

SIDE = 256
_ORB = None


def _features(path: str) -> dict[str, Any] | None:
    global _ORB
    if _ORB is None:
        _ORB = cv2.ORB_create(nfeatures=600, edgeThreshold=15, patchSize=15, fastThreshold=8)
    try:
        rgb = np.asarray(load_rgb(path))
    except (ImageReadError, OSError):
        return None
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = grey.shape
    up = SIDE / max(h, w)
    g = cv2.resize(grey, (max(8, round(w * up)), max(8, round(h * up))), interpolation=cv2.INTER_AREA if up < 1 else cv2.INTER_LINEAR)
    eq = cv2.equalizeHist(g)
    out = {"g": eq.astype(np.float32), "up": max(up, 1.0)}
    for tag, img in (("n", eq), ("m", np.ascontiguousarray(eq[:, ::-1]))):
        kp, des = _ORB.detectAndCompute(img, None)
        out[tag] = (np.float32([k.pt for k in kp]).reshape(-1, 2), des)
    return out


def _bandpass(g: np.ndarray, s1: float) -> np.ndarray:
    return cv2.GaussianBlur(g, (0, 0), s1) - cv2.GaussianBlur(g, (0, 0), 3 * s1)


def verify(file_a: str, file_b: str, *, cache: dict[Any, Any], keys: tuple[Any, Any],
           p: dict[str, Any]) -> dict[str, Any]:
    """``verified``, ``inliers``, ``ncc``, ``transform`` (e.g. 'mirror,rot=-7,scale=0.45')."""
    for k, f in zip(keys, (file_a, file_b), strict=True):
        if k not in cache:
            cache[k] = _features(f)
    fa, fb = cache[keys[0]], cache[keys[1]]
    none = {"verified": False, "inliers": 0, "ncc": None, "transform": ""}
    if fa is None or fb is None or fb["n"][1] is None:
        return {**none, "evidence": {"error": "unreadable image"}}
    bf = cv2.BFMatcher(cv2.NORM_HAMMING)
    best = None
    for tag in ("n", "m"):
        pa, da = fa[tag]
        pb, db = fb["n"]
        if da is None or len(da) < 2 or len(db) < 2:
            continue
        good = [m for m, n in (x for x in bf.knnMatch(db, da, k=2) if len(x) == 2)
                if m.distance < 0.8 * n.distance]
        if len(good) < 4:
            continue
        src = pb[[m.queryIdx for m in good]]
        dst = pa[[m.trainIdx for m in good]]
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
    ga = fa["g"][:, ::-1] if tag == "m" else fa["g"]
    h, w = ga.shape
    warped = cv2.warpAffine(fb["g"], M, (w, h), flags=cv2.INTER_LINEAR, borderValue=-1)
    mask = cv2.warpAffine(np.ones_like(fb["g"]), M, (w, h), flags=cv2.INTER_NEAREST) > 0
    mask = cv2.erode(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    if mask.sum() < 0.1 * h * w:
        return res
    s1 = max(1.0, 0.7 * max(fa["up"], fb["up"] / max(scale, 1e-3)))
    xa, xb = _bandpass(ga, s1)[mask], _bandpass(np.where(warped < 0, 0, warped), s1)[mask]
    xa, xb = xa - xa.mean(), xb - xb.mean()
    ncc = float((xa * xb).sum() / max(np.sqrt((xa**2).sum() * (xb**2).sum()), 1e-9))
    return {**res, "ncc": ncc, "verified": ncc >= float(p["ncc"]),
            "evidence": {"inliers": n_in, "ncc": round(ncc, 4), "band_sigma": round(s1, 2)}}
