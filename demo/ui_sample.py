"""A small, realistic workspace for the UI's tests and benchmark (seeded, written through catalog).

It writes every table the pages show — datasets, images, sources, annotations, splits,
findings, versions (a root and a corrected child with a datasheet), lineage, agreement,
pairs, clusters, outliers, leakage — with :class:`catalog.Transaction`, plus real PNG files
made with Pillow for the first ``n_files`` images, and then runs the real fingerprint stage
(:func:`medlake.pipelines.fingerprint.run`) on those files, so the ``fingerprints`` table
(and its ``flags``) is exactly what the stage writes. Pairs are ordered so that the
highest-scoring ones name images that have files.

Three datasets (``extra_datasets=False`` keeps only the first):

* ``demo-cxr`` (:data:`DATASET`): chest X-rays with files, two label sources over three
  findings, split scheme ``official``, versions and lineage. One image is very dark and one
  tiny, so the fingerprint stage raises the ``dark`` and ``tiny`` flags.
* ``demo-derm`` (:data:`DERM`): colour dermoscopy-like images with files, split scheme
  ``dermamnist`` (sorted before ``official``: the duplicates page must not default to it for
  chest pairs), a few duplicate pairs.
* ``demo-pc`` (:data:`META`): metadata only (no image files, like PadChest before
  ``medlake attach-images``), three label sources over :data:`N_META_FINDINGS` findings, as
  many as PadChest has, so the discrepancies heatmap is exercised at real width.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageDraw

from medlake.catalog import Catalog, Workspace

DATASET = "demo-cxr"
ROOT_VERSION = f"{DATASET}@official"
FIXED_VERSION = f"{DATASET}@fixed"
FINDINGS = ("Effusion", "Pneumothorax", "Cardiomegaly")
SOURCES = (f"{DATASET}:nlp", f"{DATASET}:expert")
STAGE = "sample"
WHOLE_LAKE = ("pairs", "clusters", "outliers")  # tables written in one partition, "all"

DERM = "demo-derm"
DERM_SCHEME = "dermamnist"
N_DERM = 24
META = "demo-pc"
META_SCHEME = "random"
META_SOURCES = (f"{META}:physician", f"{META}:nlp", f"{META}:model")
N_META = 30
N_META_FINDINGS = 190  # PadChest's vocabulary is about this size
_PC_TERMS = (
    "pleural effusion", "cardiomegaly", "aortic elongation", "scoliosis",
    "apical pleural thickening", "calcified granuloma", "vertebral degenerative changes",
    "nodule", "hiatal hernia", "interstitial pattern", "laminar atelectasis",
    "costophrenic angle blunting", "chronic changes", "pneumonia", "hilar enlargement",
    "kyphosis", "callus rib fracture", "infiltrates", "alveolar pattern", "pacemaker",
    "suture material", "emphysema", "volume loss", "goitre", "air trapping", "bronchiectasis",
    "heart insufficiency", "mediastinal enlargement", "fibrotic band", "osteopenia",
    "aortic atheromatosis", "flattened diaphragm", "hemidiaphragm elevation", "sternotomy",
    "vascular hilar enlargement", "pulmonary mass", "tracheal shift",
    "central venous catheter", "nasogastric tube", "endotracheal tube",
)
_PC_SIDES = ("", " left", " right", " bilateral", " upper lobe")
#: the demo-pc findings: PadChest-like names of very different lengths
META_FINDINGS = tuple(t + s for s in _PC_SIDES for t in _PC_TERMS)[:N_META_FINDINGS]


@dataclass(frozen=True)
class SampleSummary:
    """What :func:`build` wrote: row counts per table and the number of image files."""

    root: Path
    counts: dict[str, int]
    n_files: int


def _png(path: Path, rng: np.random.Generator, size: int, *, base: int | None = None) -> None:
    drawn = int(rng.integers(20, 90))
    base = drawn if base is None else base
    arr = (rng.normal(base, 12, (size, size))).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "L")
    d = ImageDraw.Draw(im)
    c = int(rng.integers(size // 4, size // 2))
    d.ellipse((c // 2, c // 2, size - c // 2, size - c // 3), outline=int(rng.integers(150, 250)),
              width=3)
    im.save(path, format="PNG")


def _derm_image(rng: np.random.Generator, size: int = 80) -> Image.Image:
    skin = rng.uniform(150, 235, 3)
    arr = (skin + rng.normal(0, 6, (size, size, 3))).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(im)
    r = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(v) for v in rng.integers(size // 3, 2 * size // 3, 2))
    d.ellipse((cx - r, cy - r, cx + r, cy + int(r * 0.8)),
              fill=tuple(int(v) for v in rng.uniform(40, 120, 3)))
    return im


def _near_copy(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """``im`` shifted by a few pixels with fresh noise: a second capture of one lesion."""
    arr = np.roll(np.asarray(im).astype(np.int16), int(rng.integers(2, 5)), axis=1)
    return Image.fromarray((arr + rng.normal(0, 4, arr.shape)).clip(0, 255).astype(np.uint8))


def build(root: Path | str, *, n_images: int = 60, n_pairs: int = 20, n_files: int | None = None,
          seed: int = 0, extra_datasets: bool = True) -> SampleSummary:
    """Write the sample workspace at ``root`` (a bare lake: ``.dvc/`` folder, no git).

    Parameters
    ----------
    root
        Folder to create (or fill: tables are replaced, files rewritten).
    n_images, n_pairs
        Rows of the ``demo-cxr`` images and pairs.
    n_files
        ``demo-cxr`` images that get a real PNG (default: all); the rest have paths
        without files (the fingerprint stage quarantines them as missing files).
    seed
        Every random choice; the same arguments give the same tables.
    extra_datasets
        Also write ``demo-derm`` and ``demo-pc`` (see the module docstring).

    Returns
    -------
    SampleSummary
    """
    from medlake.pipelines import fingerprint

    rng = np.random.default_rng(seed)
    root = Path(root).resolve()
    (root / ".dvc").mkdir(parents=True, exist_ok=True)
    cat = Catalog(Workspace(root))
    n_files = n_images if n_files is None else min(n_files, n_images)
    tables = _cxr(root, rng, n_images, n_pairs, n_files)
    parts: dict[str, dict[str, pl.DataFrame]] = {DATASET: tables}
    if extra_datasets:
        xrng = np.random.default_rng([seed, 1])
        parts[DERM] = _derm(root, xrng)
        parts[META] = _meta(xrng)
    # like the duplicates and outliers stages: one partition for all datasets, ranked together
    together = {t: pl.concat([tabs.pop(t) for tabs in parts.values() if t in tabs],
                             how="diagonal_relaxed") for t in WHOLE_LAKE}
    together["outliers"] = together["outliers"].with_columns(
        pl.col("score").rank("ordinal", descending=True).cast(pl.Int64).alias("rank"))
    with cat.transaction() as tx:
        for ds, tabs in parts.items():
            for name, df in tabs.items():
                tx.write(name, df, stage=STAGE, partition=ds)
        for name, df in together.items():
            tx.write(name, df, stage=STAGE, partition="all")
    fp = fingerprint.run(cat, workers=2)  # the real stage: schema and flags as in a lake
    counts = {name: len(df) for name, df in together.items()}
    for tabs in parts.values():
        for name, df in tabs.items():
            counts[name] = counts.get(name, 0) + len(df)
    counts["fingerprints"] = fp["fingerprinted"]
    return SampleSummary(root, counts, n_files)


def _cxr(root: Path, rng: np.random.Generator, n_images: int, n_pairs: int,
         n_files: int) -> dict[str, pl.DataFrame]:
    """The ``demo-cxr`` tables (and its PNG files, versions folder and manifest)."""
    img_dir = root / "data" / "sample"
    img_dir.mkdir(parents=True, exist_ok=True)
    sizes = [96] * n_images
    dark, tiny = (n_files - 2, n_files - 1) if n_files >= 4 else (-1, -1)
    for i in range(n_files):
        sizes[i] = 40 if i == tiny else 96  # 'tiny': shorter side below fingerprint.tiny (64)
        _png(img_dir / f"img{i:06d}.png", rng, sizes[i], base=4 if i == dark else None)

    ids = [f"{DATASET}:img{i:06d}" for i in range(n_images)]
    groups = [f"{DATASET}:p{i // 3:05d}" for i in range(n_images)]
    split_of = rng.choice(["train", "val", "test"], size=n_images, p=[0.7, 0.15, 0.15])
    images = pl.DataFrame({
        "image_id": ids, "dataset_id": DATASET, "native_id": [i.split(":")[1] for i in ids],
        "path": [f"img{i:06d}.png" for i in range(n_images)], "width": sizes, "height": sizes,
        "mode": "L", "group_id": groups, "patient_id": [g.split(":")[1] for g in groups],
        "view": rng.choice(["PA", "AP"], size=n_images).tolist(),
        "sex": rng.choice(["F", "M"], size=n_images).tolist(),
        "age": rng.integers(20, 90, n_images).astype(float),
        "meta": [json.dumps({"drain": bool(d)}) for d in rng.random(n_images) < 0.2],
    })
    splits = pl.DataFrame({"image_id": ids, "dataset_id": DATASET, "scheme": "official",
                           "split": split_of.tolist()})
    truth = rng.random((n_images, len(FINDINGS))) < 0.3
    ann_rows: dict[str, list] = {k: [] for k in ("image_id", "source_id", "finding", "value")}
    for s_i, src in enumerate(SOURCES):
        flip = rng.random(truth.shape) < (0.15 if s_i == 0 else 0.05)
        vals = truth ^ flip
        for f_i, f in enumerate(FINDINGS):
            ann_rows["image_id"] += ids
            ann_rows["source_id"] += [src] * n_images
            ann_rows["finding"] += [f] * n_images
            ann_rows["value"] += vals[:, f_i].astype(float).tolist()
    ann = _annotations(ann_rows)
    sources = pl.DataFrame({
        "source_id": list(SOURCES), "dataset_id": DATASET, "name": ["nlp", "expert"],
        "kind": ["report_nlp", "expert"], "exhaustive": [True, True],
        "negatives": ["explicit", "explicit"], "value_type": "binary",
        "rule": ["report mining", "clinical"], "description": ["NLP labels", "radiologist read"],
    })
    findings = pl.DataFrame({
        "source_id": [s for s in SOURCES for _ in FINDINGS], "finding": list(FINDINGS) * 2,
        "shared_finding": [f.lower() for f in FINDINGS] * 2, "value_type": "binary",
    })
    counts = splits.group_by("split").len().sort("split")
    split_counts = dict(zip(counts["split"].to_list(), counts["len"].to_list()))
    moved = [i for i in range(n_images) if split_of[i] != "train" and i % 3 == 0]
    dropped = set(range(0, n_images, 17))
    fixed_split = {i: ("train" if i in moved else split_of[i]) for i in range(n_images)
                   if i not in dropped}
    fixed_counts: dict[str, int] = {}
    for s in fixed_split.values():
        fixed_counts[s] = fixed_counts.get(s, 0) + 1
    vdir = root / "lake" / "versions" / FIXED_VERSION
    vdir.mkdir(parents=True, exist_ok=True)
    (vdir / "DATASHEET.md").write_text(
        f"# {FIXED_VERSION}\n\nParent: {ROOT_VERSION}. Leaking groups moved to train, "
        f"{len(dropped)} duplicates removed.\n"
    )
    versions = pl.DataFrame([
        {"name": ROOT_VERSION, "dataset_id": DATASET, "parent": None, "kind": "root",
         "scheme": "official", "n_images": n_images,
         "counts": json.dumps({"split": split_counts}, sort_keys=True)},
        {"name": FIXED_VERSION, "dataset_id": DATASET, "parent": ROOT_VERSION,
         "kind": "derived", "scheme": "official", "recipe": "recipes/fixed.yaml",
         "n_images": len(fixed_split), "path": f"lake/versions/{FIXED_VERSION}",
         "counts": json.dumps({"split": dict(sorted(fixed_counts.items()))}, sort_keys=True)},
    ])
    lineage = pl.DataFrame([
        {"version": FIXED_VERSION, "image_id": ids[i],
         "rule": "duplicates" if i in dropped else ("leakage" if i in moved else "keep"),
         "action": "removed" if i in dropped else ("moved" if i in moved else "kept"),
         "reason": "duplicate of a kept image" if i in dropped else None,
         "from_split": split_of[i], "to_split": None if i in dropped else fixed_split[i]}
        for i in range(n_images)
    ])
    manifest = pl.DataFrame({"image_id": [ids[i] for i in fixed_split],
                             "split": list(fixed_split.values())})
    manifest.write_parquet(vdir / "manifest.parquet")

    agreement = []
    for f_i, f in enumerate(FINDINGS):
        agreement.append({"dataset_id": DATASET, "kind": "pair", "source_a": SOURCES[0],
                          "annotator_a": "", "source_b": SOURCES[1], "annotator_b": "",
                          "finding": f, "subgroup": "", "subgroup_value": "",
                          "n_shared": n_images, "kappa": 0.9 - 0.2 * f_i,
                          "kappa_lo": 0.8 - 0.2 * f_i, "kappa_hi": 0.95 - 0.2 * f_i,
                          "reference": SOURCES[1], "ppv": 0.85 - 0.1 * f_i,
                          "ppv_lo": 0.7 - 0.1 * f_i, "ppv_hi": 0.93 - 0.1 * f_i})
    # the best-scoring pairs (first pages) name images with files; the rest spread over all
    hi = max(1, min(n_files, n_images) - 1)
    with_files = np.arange(n_pairs) < max(200, n_pairs // 100)
    a = np.where(with_files, rng.integers(0, hi, n_pairs),
                 rng.integers(0, max(n_images - 41, 1), n_pairs))
    b = np.where(with_files, (a + rng.integers(1, 40, n_pairs)) % max(hi, 2),
                 (a + rng.integers(1, 40, n_pairs)) % n_images)
    b = np.where(a == b, (b + 1) % n_images, b)
    score = np.sort(rng.uniform(0.8, 1.0, n_pairs))[::-1]
    pairs = pl.DataFrame({
        "image_a": [ids[min(x, y)] for x, y in zip(a, b)],
        "image_b": [ids[max(x, y)] for x, y in zip(a, b)],
        "method": "descriptor", "score": score, "verified": rng.random(n_pairs) < 0.6,
    }).unique(subset=["image_a", "image_b", "method"], keep="first", maintain_order=True)
    clusters = pl.DataFrame({"image_id": ids[: min(12, n_images)],
                             "cluster_id": [f"c{i // 3}" for i in range(min(12, n_images))]})
    o = rng.random(n_images)
    outliers = pl.DataFrame({"image_id": ids, "score": o})
    return {
        "datasets": pl.DataFrame([{"dataset_id": DATASET, "name": "Demo CXR", "modality": "CXR",
                                   "images_root": "data/sample", "license": "CC0"}]),
        "images": images, "sources": sources, "annotations": ann, "splits": splits,
        "findings": findings, "versions": versions, "lineage": lineage,
        "agreement": pl.DataFrame(agreement), "pairs": pairs, "clusters": clusters,
        "outliers": outliers, "leakage": _leakage(DATASET, "official", images, splits,
                                                  ROOT_VERSION),
    }


def _annotations(rows: dict[str, list]) -> pl.DataFrame:
    return pl.DataFrame(rows).with_columns(
        pl.lit("").alias("annotator"),
        pl.when(pl.col("value") > 0).then(pl.lit("positive")).otherwise(pl.lit("negative"))
        .alias("meaning"), pl.lit(False).alias("is_invalid"),
    )


def _leakage(ds: str, scheme: str, images: pl.DataFrame, splits: pl.DataFrame,
             version: str | None) -> pl.DataFrame:
    leak = splits.join(images.select("image_id", "group_id"), on="image_id").group_by(
        "group_id").agg(pl.col("split").n_unique().alias("k")).filter(pl.col("k") > 1).height
    return pl.DataFrame([{"dataset_id": ds, "scheme": scheme, "split_a": "*", "split_b": "*",
                          "grouping": "group_id", "n_groups": leak, "version": version}])


def _derm(root: Path, rng: np.random.Generator) -> dict[str, pl.DataFrame]:
    """``demo-derm``: colour images with files, scheme ``dermamnist``, a few duplicate pairs."""
    img_dir = root / "data" / "derm"
    img_dir.mkdir(parents=True, exist_ok=True)
    im = None
    for i in range(N_DERM):  # images 2k and 2k + 1: one lesion, two captures
        im = _derm_image(rng) if i % 2 == 0 or im is None else _near_copy(im, rng)
        im.save(img_dir / f"derm{i:04d}.png", format="PNG")
    ids = [f"{DERM}:derm{i:04d}" for i in range(N_DERM)]
    groups = [f"{DERM}:lesion{i // 2:03d}" for i in range(N_DERM)]
    images = pl.DataFrame({
        "image_id": ids, "dataset_id": DERM, "native_id": [i.split(":")[1] for i in ids],
        "path": [f"derm{i:04d}.png" for i in range(N_DERM)], "width": 80, "height": 80,
        "mode": "RGB", "group_id": groups, "patient_id": None,
        "sex": rng.choice(["F", "M"], size=N_DERM).tolist(),
        "age": rng.integers(20, 90, N_DERM).astype(float),
    })
    splits = pl.DataFrame({"image_id": ids, "dataset_id": DERM, "scheme": DERM_SCHEME,
                           "split": rng.choice(["train", "val", "test"], size=N_DERM,
                                               p=[0.6, 0.2, 0.2]).tolist()})
    # the second image of a lesion is its near copy: pairs with high scores
    pairs = pl.DataFrame({"image_a": ids[0:6:2], "image_b": ids[1:7:2], "method": "descriptor",
                          "score": [0.995, 0.97, 0.94], "verified": [True, True, False]})
    outliers = pl.DataFrame({"image_id": ids, "score": rng.random(N_DERM)})
    return {
        "datasets": pl.DataFrame([{"dataset_id": DERM, "name": "Demo dermoscopy",
                                   "modality": "dermoscopy", "images_root": "data/derm",
                                   "license": "CC0"}]),
        "images": images, "splits": splits, "pairs": pairs, "outliers": outliers,
        "leakage": _leakage(DERM, DERM_SCHEME, images, splits, None),
    }


def _meta(rng: np.random.Generator) -> dict[str, pl.DataFrame]:
    """``demo-pc``: metadata only (no files), three sources over PadChest-many findings."""
    from medlake.catalog.stats import cohen_kappa

    ids = [f"{META}:s{i:04d}" for i in range(N_META)]
    groups = [f"{META}:p{i // 2:03d}" for i in range(N_META)]
    images = pl.DataFrame({
        "image_id": ids, "dataset_id": META, "native_id": [i.split(":")[1] for i in ids],
        "path": None, "group_id": groups, "patient_id": [g.split(":")[1] for g in groups],
        "view": rng.choice(["PA", "L"], size=N_META).tolist(),
        "sex": rng.choice(["F", "M"], size=N_META).tolist(),
        "age": rng.integers(20, 90, N_META).astype(float),
    }, schema_overrides={"path": pl.String})
    splits = pl.DataFrame({"image_id": ids, "dataset_id": META, "scheme": META_SCHEME,
                           "split": rng.choice(["train", "test"], size=N_META,
                                               p=[0.7, 0.3]).tolist()})
    ann_rows: dict[str, list] = {k: [] for k in ("image_id", "source_id", "finding", "value")}
    labels: dict[tuple[str, str], np.ndarray] = {}
    covered: dict[str, int] = {}
    for f_i, f in enumerate(META_FINDINGS):
        k = 2 + (f_i * 7) % (N_META - 1)  # images labelled for this finding: 2 .. N_META
        covered[f] = k
        truth = rng.random(k) < rng.uniform(0.1, 0.5)
        for s_i, src in enumerate(META_SOURCES):
            vals = truth ^ (rng.random(k) < (0.05, 0.15, 0.3)[s_i])
            labels[(src, f)] = vals
            ann_rows["image_id"] += ids[:k]
            ann_rows["source_id"] += [src] * k
            ann_rows["finding"] += [f] * k
            ann_rows["value"] += vals.astype(float).tolist()
    agreement = []
    for f in META_FINDINGS:
        for x in range(len(META_SOURCES)):
            for y in range(x + 1, len(META_SOURCES)):
                sa, sb = META_SOURCES[x], META_SOURCES[y]
                k = cohen_kappa(labels[(sa, f)].astype(int), labels[(sb, f)].astype(int),
                                labels=[0, 1])
                def fin(v: float) -> float | None:
                    return None if not np.isfinite(v) else float(v)
                agreement.append({
                    "dataset_id": META, "kind": "pair", "source_a": sa, "annotator_a": "",
                    "source_b": sb, "annotator_b": "", "finding": f, "subgroup": "",
                    "subgroup_value": "", "n_shared": covered[f], "kappa": fin(k["kappa"]),
                    "kappa_lo": fin(k["lo"]), "kappa_hi": fin(k["hi"])})
    sources = pl.DataFrame({
        "source_id": list(META_SOURCES), "dataset_id": META,
        "name": [s.split(":")[1] for s in META_SOURCES],
        "kind": ["expert", "report_nlp", "model"], "exhaustive": True,
        "negatives": "explicit", "value_type": "binary",
        "rule": ["clinical", "report mining", "classifier"],
        "description": ["physician read", "labels mined from reports", "a model's output"],
    })
    findings = pl.DataFrame({
        "source_id": [s for s in META_SOURCES for _ in META_FINDINGS],
        "finding": list(META_FINDINGS) * len(META_SOURCES),
        "shared_finding": list(META_FINDINGS) * len(META_SOURCES), "value_type": "binary",
    })
    return {
        "datasets": pl.DataFrame([{"dataset_id": META, "name": "Demo PadChest-like (metadata)",
                                   "modality": "CXR", "images_root": None, "license": "CC0"}],
                                 schema_overrides={"images_root": pl.String}),
        "images": images, "sources": sources, "annotations": _annotations(ann_rows),
        "splits": splits, "findings": findings, "agreement": pl.DataFrame(agreement),
        "leakage": _leakage(META, META_SCHEME, images, splits, None),
    }
