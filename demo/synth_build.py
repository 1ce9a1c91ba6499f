"""One synthetic dataset: groups, captures, derived near duplicates, labels, files, config.

Used by :mod:`medlake.demo.synthetic`; the drawing lives in :mod:`medlake.demo.synth_draw`.
"""

from __future__ import annotations

import csv
import io
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from PIL import Image

from medlake.demo import synth_draw as draw

KINDS = ("exact", "reencoded", "resized", "cropped", "mirrored", "relit", "rotated", "combined",
         "crop_resized", "crop_combined")
# how often each kind is drawn: crops resized afterwards (how derived datasets are made, e.g.
# DermaMNIST from HAM10000, "centre crop + resize to 224") and crops combined with another
# change count twice
KIND_WEIGHTS = (1, 1, 1, 1, 1, 1, 1, 1, 2, 2)
_COMBINABLE = ("resized", "cropped", "mirrored", "relit", "rotated")
# what happened to a crop's pixels after cropping (the ``crop`` column of truth_files.csv):
# kept at the cropped size, resized to the original's width x height (aspect changes when the
# crop's differs), to a fixed 224 x 224, to a small square (28-64 px, MedMNIST-like), or
# scaled up / down with the crop's aspect kept
CROP_KINDS = ("kept", "to_original", "to_224", "to_small", "scaled_up", "scaled_down")
_CROP_AFTER = ("mirrored", "rotated", "relit", "reencoded")  # crop_combined: crop, then one of
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area", "lanczos")
_KIND_P = np.array(KIND_WEIGHTS, dtype=np.float64) / sum(KIND_WEIGHTS)
TRUTH_COLUMNS = ["file", "modality", "image_id", "capture_id", "group_id", "patient_id",
                 "role", "transform", "crop", "detail"]
SPLITS, SPLIT_P = ["train", "val", "test"], [0.7, 0.15, 0.15]
DX = list(draw.DX_COLOUR)
DX_P = [0.6, 0.12, 0.12, 0.07, 0.05, 0.02, 0.02]
SITES = ["back", "trunk", "face", "upper extremity", "lower extremity", "scalp", "abdomen"]
CXR_FINDINGS = {  # prevalence, NLP sensitivity, NLP specificity
    "effusion": (0.14, 0.90, 0.93), "cardiomegaly": (0.15, 0.80, 0.95),
    "nodule": (0.07, 0.60, 0.97),
}
JPEG = {"quality": 90, "subsampling": 2, "optimize": False, "progressive": False}


def rng_for(seed: int, *path: int) -> np.random.Generator:
    """The Generator of one item: independent of how many other items there are."""
    return np.random.default_rng([seed, *path])


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _cell(r.get(c)) for c in columns})


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def encode(arr: np.ndarray, fmt: str, quality: int | None = None) -> bytes:
    """PNG or JPEG bytes with fixed encoder settings (no metadata, no timestamps)."""
    im = Image.fromarray(arr)
    buf = io.BytesIO()
    if fmt == "jpg":
        im.save(buf, "JPEG", **{**JPEG, **({"quality": quality} if quality else {})})
    else:
        im.save(buf, "PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert(im.mode))


_PIL_INTERP = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC, "area": Image.Resampling.BOX,
               "lanczos": Image.Resampling.LANCZOS}
_CV_INTERP = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR,
              "bicubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA, "lanczos": cv2.INTER_LANCZOS4}


def resize(rng: np.random.Generator, arr: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """``arr`` resized to ``size`` (w, h) with a drawn interpolation and library.

    PIL filters over the source pixels a downscale covers (antialiased); OpenCV's nearest,
    bilinear, bicubic and Lanczos sample a fixed neighbourhood (aliasing when shrinking), as
    pipelines that call ``cv2.resize`` do. Returns the pixels and e.g. ``224x224,cv2-area``.
    """
    interp = INTERPOLATIONS[int(rng.integers(len(INTERPOLATIONS)))]
    lib = "cv2" if rng.random() < 0.5 else "pil"
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if lib == "cv2":
        out = cv2.resize(np.ascontiguousarray(arr), size, interpolation=_CV_INTERP[interp])
    else:
        out = np.asarray(Image.fromarray(arr).resize(size, _PIL_INTERP[interp]))
    return out, f"{size[0]}x{size[1]},{lib}-{interp}"


def crop(rng: np.random.Generator, arr: np.ndarray) -> tuple[np.ndarray, str]:
    """A crop of 40-90% of the area at a random place, its aspect changed by up to 4:3."""
    h, w = arr.shape[:2]
    area = rng.uniform(0.4, 0.9)
    ar = float(np.exp(rng.uniform(np.log(0.75), np.log(4 / 3))))
    cw, ch = min(w, round(w * np.sqrt(area * ar))), min(h, round(h * np.sqrt(area / ar)))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return arr[y0:y0 + ch, x0:x0 + cw].copy(), f"box={x0},{y0},{cw},{ch}"


def crop_then(rng: np.random.Generator, arr: np.ndarray, how: str) -> tuple[np.ndarray, str]:
    """:func:`crop`, then its pixels resized as ``how`` (one of :data:`CROP_KINDS`) says."""
    h, w = arr.shape[:2]
    out, d = crop(rng, arr)
    ch, cw = out.shape[:2]
    if how == "kept":
        return out, d
    if how == "to_original":
        size = (w, h)
    elif how == "to_224":
        size = (224, 224)
    elif how == "to_small":
        side = int(rng.integers(28, 65))
        size = (side, side)
    else:
        s = rng.uniform(1.2, 2.0) if how == "scaled_up" else rng.uniform(0.35, 0.8)
        size = (max(16, round(cw * s)), max(16, round(ch * s)))
    out, r = resize(rng, out, size)
    return out, f"{d},resize={r}"


def transform(rng: np.random.Generator, arr: np.ndarray, kind: str) -> tuple[np.ndarray, str]:
    """Apply one geometric or photometric change; returns the pixels and its parameters."""
    im = Image.fromarray(arr)
    w, h = im.size
    if kind == "resized":
        s = rng.uniform(0.3, 0.9) if rng.random() < 0.75 else rng.uniform(1.1, 1.6)
        out, r = resize(rng, arr, (max(16, round(w * s)), max(16, round(h * s))))
        return out, f"scale={s:.3f},{r}"
    if kind == "cropped":
        return crop(rng, arr)
    if kind == "mirrored":
        if arr.ndim == 3 and rng.random() < 0.4:  # dermoscopy has no up or down
            return arr[::-1].copy(), "flip=vertical"
        return arr[:, ::-1].copy(), "flip=horizontal"
    if kind == "relit":
        g, c, b = rng.uniform(0.7, 1.4), rng.uniform(0.75, 1.25), rng.uniform(-0.08, 0.08)
        x = (arr.astype(np.float64) / 255.0) ** g
        x = (x - 0.5) * c + 0.5 + b
        return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8), f"gamma={g:.2f},contrast={c:.2f},bright={b:+.2f}"
    if kind == "rotated":
        a = rng.uniform(3, 10) * (1 if rng.random() < 0.5 else -1)
        fill = 0 if arr.ndim == 2 else (0, 0, 0)
        rot = im.rotate(a, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=fill)
        return np.asarray(rot), f"angle={a:+.1f}"
    raise ValueError(f"unknown transform '{kind}'")


def _derive(rng: np.random.Generator, original: bytes, fmt: str,
            kind: str) -> tuple[bytes, str, str, str]:
    """A near duplicate of an encoded original: (bytes, extension, crop kind, detail).

    The crop kind is one of :data:`CROP_KINDS` when the file was cropped, else "".
    """
    if kind == "exact":
        return original, fmt, "", ""
    arr = decode(original)
    if kind == "reencoded":
        q = int(rng.integers(30, 96))
        return encode(arr, "jpg", q), "jpg", "", f"jpeg_quality={q}"
    if kind == "combined":
        picks = rng.choice(len(_COMBINABLE), size=2, replace=False)
        details = []
        for p in sorted(int(i) for i in picks):
            arr, d = transform(rng, arr, _COMBINABLE[p])
            details.append(f"{_COMBINABLE[p]}({d})")
        return encode(arr, fmt), fmt, "kept" if "cropped" in details[-1] else "", "+".join(details)
    if kind == "crop_resized":
        how = CROP_KINDS[1 + int(rng.integers(len(CROP_KINDS) - 1))]
        arr, d = crop_then(rng, arr, how)
        return encode(arr, fmt), fmt, how, d
    if kind == "crop_combined":
        how = CROP_KINDS[int(rng.integers(len(CROP_KINDS)))]
        arr, d = crop_then(rng, arr, how)
        after = _CROP_AFTER[int(rng.integers(len(_CROP_AFTER)))]
        if after == "reencoded":
            q = int(rng.integers(30, 96))
            return encode(arr, "jpg", q), "jpg", how, f"cropped({d})+reencoded(jpeg_quality={q})"
        arr, d2 = transform(rng, arr, after)
        return encode(arr, fmt), fmt, how, f"cropped({d})+{after}({d2})"
    arr, d = transform(rng, arr, kind)
    return encode(arr, fmt), fmt, "kept" if kind == "cropped" else "", d


def _draw_capture(m: str, rng: np.random.Generator, anatomy: dict[str, Any],
                  state: dict[str, Any], scale: float = 1.0) -> tuple[bytes, str]:
    """One capture's encoded file: dermoscopy 160-256 px wide (4:3 or square), chest X-ray
    192-256 px square, both times ``scale``."""
    if m == "derm":
        w = int(rng.choice([160, 192, 224, 256]))
        h = w if rng.random() < 0.4 else w * 3 // 4
        return encode(draw.draw_derm(rng, anatomy, round(h * scale), round(w * scale)), "jpg"), "jpg"
    size = round(int(rng.choice([192, 224, 256])) * scale)
    return encode(draw.draw_cxr(rng, anatomy, size, state["findings"]), "png"), "png"


def _groups(m: str, n: int, seed: int, mi: int) -> list[dict[str, Any]]:
    """Patients, their lesions/studies and one capture record per original image."""
    rng = rng_for(seed, mi, 0)
    caps: list[dict[str, Any]] = []
    n_pat = n_grp = 0
    patient: dict[str, Any] = {}
    while len(caps) < n:
        if not patient or m == "cxr" or rng.random() < 0.7:
            n_pat += 1
            age = "" if rng.random() < 0.03 else float(5 * rng.integers(4 if m == "derm" else 2, 18))
            patient = {"patient_id": f"P{n_pat:05d}", "sex": str(rng.choice(["male", "female"])),
                       "age": age, "fitzpatrick": int(rng.choice(6, p=[.15, .35, .25, .13, .08, .04])) + 1}
        n_grp += 1
        k = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2] if m == "derm" else [0.45, 0.3, 0.25]))
        if m == "derm":
            dx = str(rng.choice(DX, p=DX_P))
            group = {"lesion_id": f"L{n_grp:05d}", "dx": dx, "site": str(rng.choice(SITES)),
                     "anatomy": draw.lesion_anatomy(rng, dx, patient["fitzpatrick"]),
                     "histo": rng.random() < (0.9 if dx == "melanoma" else 0.35)}
            group["dx_histo"] = dx if rng.random() < 0.97 else str(rng.choice(DX))
        else:
            group = {"anatomy": draw.chest_anatomy(rng), "cardiomegaly": rng.random() < 0.15}
        for j in range(min(k, n - len(caps))):
            cap = {**patient, **group, "capture_id": f"{m}-c{len(caps) + 1:05d}", "repeat": j}
            if m == "cxr":
                cap["study_id"] = f"S{len(caps) + 1:05d}"
                cap["view"] = "PA" if rng.random() < 0.7 else "AP"
                cap["findings"] = {f: (group["cardiomegaly"] if f == "cardiomegaly"
                                       else bool(rng.random() < p[0]))
                                   for f, p in CXR_FINDINGS.items()}
                cap["expert_read"] = bool(rng.random() < 0.3)
            caps.append(cap)
    return caps


def _labels(m: str, rng: np.random.Generator, cap: dict[str, Any], row: dict[str, Any]) -> None:
    if m == "derm":
        u = rng.random()
        if u < 0.03:
            row["dx_clinic"] = "unknown" if rng.random() < 0.5 else ""
        elif u < 0.78:
            row["dx_clinic"] = cap["dx"]
        else:  # clinicians confuse neighbouring categories
            row["dx_clinic"] = str(rng.choice([d for d in DX if d != cap["dx"]]))
        row["dx_histo"] = cap["dx_histo"] if cap["histo"] else ""
        return
    for f, (_, sens, spec) in CXR_FINDINGS.items():
        truth = cap["findings"][f]
        row[f"nlp_{f}"] = int(rng.random() < (sens if truth else 1 - spec))
        if cap["expert_read"]:
            row[f"expert_{f}"] = int(rng.random() < (0.95 if truth else 0.03))


MANIFEST = {
    "derm": ["image_id", "path", "lesion_id", "patient_id", "split", "sex", "age", "site",
             "fitzpatrick", "dx_clinic", "dx_histo"],
    "cxr": ["image_id", "path", "patient_id", "study_id", "split", "sex", "age", "view",
            *(f"nlp_{f}" for f in CXR_FINDINGS), *(f"expert_{f}" for f in CXR_FINDINGS)],
}


def build_modality(m: str, *, n: int, seed: int, mi: int, dup_rate: float,
                   hidden_rate: float, root: Path, workers: int = 1,
                   image_scale: float = 1.0) -> list[dict[str, Any]]:
    """Draw, derive, label and write one modality; return its ground-truth file records.

    ``workers`` > 1 draws the captures in that many spawned processes (same bytes);
    ``image_scale`` multiplies the captures' sizes (:func:`_draw_capture`).
    """
    caps = _groups(m, n, seed, mi)
    items: list[dict[str, Any]] = []  # one per file to write
    n_hidden = 0
    jobs = [(m, cap, ci, seed, mi, dup_rate, hidden_rate, image_scale)
            for ci, cap in enumerate(caps)]
    for cap_items in _map(_capture_items, jobs, workers):
        for item in cap_items:
            if item.pop("hidden"):  # filed under a new id: group ids cannot reveal it
                n_hidden += 1
                new = f"X{n_hidden:05d}"
                item["cap"] = {**item["cap"], "patient_id": f"P{new}", "lesion_id": f"L{new}",
                               "study_id": f"S{new}"}
            items.append(item)
    orng = rng_for(seed, mi, 2)
    kinds = ["text", "pattern", "landscape"]
    for k in range(max(3, n // 150)):
        arr = draw.draw_outlier(orng, kinds[k % len(kinds)], 192, 192)
        if m == "cxr" and k % 3 != 0:
            arr = arr.mean(axis=2).astype(np.uint8) if k % 3 == 1 else arr
        ext = "jpg" if m == "derm" else "png"
        items.append({"cap": {"capture_id": "", "outlier": True}, "ci": -1, "role": "outlier",
                      "data": encode(arr, ext), "ext": ext, "transform": "",
                      "detail": kinds[k % len(kinds)]})
    # one truncated file: a real capture's bytes cut short
    crng = rng_for(seed, mi, 4)
    extra = _groups(m, 1, seed + 7919, mi)[0]
    data, ext = _draw_capture(m, crng, extra["anatomy"], extra, image_scale)
    cut = data[: max(64, int(len(data) * 0.4))]
    items.append({"cap": {**extra, "capture_id": "", "patient_id": "P99999",
                          "lesion_id": "L99999", "study_id": "S99999"},
                  "ci": -1, "role": "corrupt", "data": cut, "ext": ext, "transform": "",
                  "detail": f"truncated to {len(cut)} of {len(data)} bytes"})
    return _write(m, items, seed, mi, root)


def _map(fn: Any, jobs: list[tuple[Any, ...]], workers: int = 1) -> Iterator[Any]:
    """``fn(*job)`` for each job, in order; in a pool of ``workers`` processes when > 1.

    Every capture draws from its own Generator (:func:`rng_for`), so the files are
    byte-identical whichever process draws them. Processes are spawned: the calling
    script needs an ``if __name__ == "__main__":`` guard.
    """
    if workers < 2 or len(jobs) < 2 * workers:
        yield from (fn(*j) for j in jobs)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a threaded parent
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        yield from pool.map(fn, *zip(*jobs, strict=True), chunksize=16)


def _capture_items(m: str, cap: dict[str, Any], ci: int, seed: int, mi: int, dup_rate: float,
                   hidden_rate: float, image_scale: float = 1.0) -> list[dict[str, Any]]:
    """The original file of one capture and its derived near duplicates (``hidden`` flagged)."""
    rng = rng_for(seed, mi, 1, ci)
    data, ext = _draw_capture(m, rng, cap["anatomy"], cap, image_scale)
    out = [{"cap": cap, "ci": ci, "data": data, "ext": ext, "role": "original",
            "transform": "", "crop": "", "detail": "", "hidden": False}]
    if rng.random() >= dup_rate:
        return out
    for _ in range(1 if rng.random() < 0.8 else 2):
        kind = KINDS[int(rng.choice(len(KINDS), p=_KIND_P))]
        d, e, how, detail = _derive(rng, data, ext, kind)
        out.append({"cap": cap, "ci": ci, "data": d, "ext": e, "role": "derived",
                    "transform": kind, "crop": how, "detail": detail,
                    "hidden": rng.random() < hidden_rate})
    return out


def _write(m: str, items: list[dict[str, Any]], seed: int, mi: int,
           root: Path) -> list[dict[str, Any]]:
    """Shuffle file names, write images, the manifest and the adapter YAML."""
    order = rng_for(seed, mi, 5).permutation(len(items))
    prefix = "D" if m == "derm" else "C"
    img_dir = root / "images" / m
    img_dir.mkdir(parents=True)
    rows, truth = [], []
    for rank, idx in enumerate(order):
        it = items[int(idx)]
        cap = it["cap"]
        image_id = f"{prefix}{rank + 1:05d}"
        name = f"{image_id}.{it['ext']}"
        (img_dir / name).write_bytes(it["data"])
        rrng = rng_for(seed, mi, 6, rank)
        row: dict[str, Any] = {"image_id": image_id, "path": name,
                               "split": SPLITS[int(rrng.choice(3, p=SPLIT_P))]}
        if not cap.get("outlier"):
            for c in ("lesion_id", "patient_id", "study_id", "sex", "age", "site",
                      "fitzpatrick", "view"):
                row[c] = cap.get(c, "")
            lrng = rrng if m == "derm" else rng_for(seed, mi, 3, max(it["ci"], 0))
            _labels(m, lrng, cap, row)
        rows.append(row)
        group = cap.get("lesion_id" if m == "derm" else "patient_id", "")
        truth.append({"file": f"images/{m}/{name}", "modality": m, "image_id": image_id,
                      "capture_id": cap.get("capture_id", ""), "group_id": group,
                      "patient_id": cap.get("patient_id", ""), "role": it["role"],
                      "transform": it["transform"], "crop": it.get("crop", ""),
                      "detail": it["detail"]})
    rows.sort(key=lambda r: r["image_id"])
    write_csv(root / f"{m}_manifest.csv", rows, MANIFEST[m])
    (root / f"{m}.yaml").write_text(yaml.safe_dump(adapter_config(m), sort_keys=False),
                                    encoding="utf-8")
    return truth


def adapter_config(m: str) -> dict[str, Any]:
    """The generic-adapter YAML (``medlake ingest generic PATH.yaml``) of one modality."""
    common = {"license": "CC0-1.0", "citation": "generated by medlake (pipelines/synthetic.py)"}
    if m == "derm":
        return {
            "dataset": "synth-derm", "name": "Synthetic dermoscopy (medlake demo)",
            "modality": "derm", **common,
            "description": "Dermoscopy-like images: lesions with repeat captures, near "
                           "duplicates, non-skin outliers and one truncated file.",
            "images_root": "images/derm", "manifest": "derm_manifest.csv",
            "columns": {"id": "image_id", "path": "path", "group": "lesion_id",
                        "patient": "patient_id", "split": "split", "sex": "sex", "age": "age",
                        "site": "site"},
            "split_scheme": "original",
            "labels": [
                {"column": "dx_clinic", "source": "clinic", "finding": "diagnosis",
                 "kind": "non_expert", "value_type": "category", "unknown": ["", "unknown"],
                 "rule": "clinician's visual diagnosis"},
                {"column": "dx_histo", "source": "histopathology", "finding": "diagnosis",
                 "kind": "expert", "value_type": "category", "unknown": [""],
                 "rule": "histopathology of the excised lesion (biopsied lesions only)"},
            ],
            "meta_columns": ["fitzpatrick"],
        }
    labels = [{"column": f"nlp_{f}", "source": "nlp", "finding": f, "kind": "report_nlp",
               "value_type": "binary", "unknown": [""],
               "rule": "keyword rules over the radiology report"} for f in CXR_FINDINGS]
    labels += [{"column": f"expert_{f}", "source": "expert", "finding": f, "kind": "expert",
                "value_type": "binary", "unknown": [""],
                "rule": "radiologist re-read of a 30% subset"} for f in CXR_FINDINGS]
    return {
        "dataset": "synth-cxr", "name": "Synthetic chest X-rays (medlake demo)",
        "modality": "CXR", **common,
        "description": "Chest-X-ray-like images: patients with repeat studies, near "
                       "duplicates, non-medical outliers and one truncated file.",
        "images_root": "images/cxr", "manifest": "cxr_manifest.csv",
        "columns": {"id": "image_id", "path": "path", "group": "patient_id",
                    "patient": "patient_id", "study": "study_id", "split": "split",
                    "sex": "sex", "age": "age", "view": "view"},
        "split_scheme": "original", "labels": labels, "meta_columns": [],
    }
