"""A small, realistic workspace for the UI's tests and benchmark (seeded, written through catalog).

It writes every table the pages show — datasets, images, sources, annotations, splits,
findings, versions (a root and a corrected child with a datasheet), lineage, agreement,
fingerprints, pairs, clusters, outliers, leakage — with :class:`catalog.Transaction`, plus
real PNG files made with Pillow for the first ``n_files`` images. Pairs are ordered so
that the highest-scoring ones name images that have files.
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


@dataclass(frozen=True)
class SampleSummary:
    """What :func:`build` wrote: row counts per table and the number of image files."""

    root: Path
    counts: dict[str, int]
    n_files: int


def _png(path: Path, rng: np.random.Generator, size: int) -> None:
    base = rng.integers(20, 90)
    arr = (rng.normal(base, 12, (size, size))).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "L")
    d = ImageDraw.Draw(im)
    c = int(rng.integers(size // 4, size // 2))
    d.ellipse((c // 2, c // 2, size - c // 2, size - c // 3), outline=int(rng.integers(150, 250)),
              width=3)
    im.save(path, format="PNG")


def build(root: Path | str, *, n_images: int = 60, n_pairs: int = 20, n_files: int | None = None,
          seed: int = 0) -> SampleSummary:
    """Write the sample workspace at ``root`` (a bare lake: ``.dvc/`` folder, no git).

    Parameters
    ----------
    root
        Folder to create (or fill: tables are replaced, files rewritten).
    n_images, n_pairs
        Rows of the images and pairs tables.
    n_files
        Images that get a real PNG (default: all); the rest have paths without files.
    seed
        Every random choice; the same arguments give the same tables.

    Returns
    -------
    SampleSummary
    """
    rng = np.random.default_rng(seed)
    root = Path(root).resolve()
    (root / ".dvc").mkdir(parents=True, exist_ok=True)
    cat = Catalog(Workspace(root))
    n_files = n_images if n_files is None else min(n_files, n_images)
    img_dir = root / "data" / "sample"
    img_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        _png(img_dir / f"img{i:06d}.png", rng, 96)

    ids = [f"{DATASET}:img{i:06d}" for i in range(n_images)]
    groups = [f"{DATASET}:p{i // 3:05d}" for i in range(n_images)]
    split_of = rng.choice(["train", "val", "test"], size=n_images, p=[0.7, 0.15, 0.15])
    images = pl.DataFrame({
        "image_id": ids, "dataset_id": DATASET, "native_id": [i.split(":")[1] for i in ids],
        "path": [f"img{i:06d}.png" for i in range(n_images)], "width": 96, "height": 96,
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
    ann = pl.DataFrame(ann_rows).with_columns(
        pl.lit("").alias("annotator"),
        pl.when(pl.col("value") > 0).then(pl.lit("positive")).otherwise(pl.lit("negative"))
        .alias("meaning"), pl.lit(False).alias("is_invalid"),
    )
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
        for sub, val, mask in (("", "", np.ones(n_images, bool)),):
            agreement.append({"dataset_id": DATASET, "source_a": SOURCES[0], "annotator_a": "",
                              "source_b": SOURCES[1], "annotator_b": "", "finding": f,
                              "subgroup": sub, "subgroup_value": val,
                              "n_shared": int(mask.sum()), "kappa": 0.9 - 0.2 * f_i,
                              "kappa_lo": 0.8 - 0.2 * f_i, "kappa_hi": 0.95 - 0.2 * f_i})
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
    outliers = pl.DataFrame({"image_id": ids, "score": o}).with_columns(
        pl.col("score").rank("ordinal", descending=True).cast(pl.Int64).alias("rank"))
    leak = splits.join(images.select("image_id", "group_id"), on="image_id").group_by(
        "group_id").agg(pl.col("split").n_unique().alias("k")).filter(pl.col("k") > 1).height
    leakage = pl.DataFrame([{"dataset_id": DATASET, "scheme": "official", "split_a": "*",
                             "split_b": "*", "grouping": "group_id", "n_groups": leak,
                             "version": ROOT_VERSION}])
    tables = {
        "datasets": pl.DataFrame([{"dataset_id": DATASET, "name": "Demo CXR", "modality": "CXR",
                                   "images_root": "data/sample", "license": "CC0"}]),
        "images": images, "sources": sources, "annotations": ann, "splits": splits,
        "findings": findings, "versions": versions, "lineage": lineage,
        "agreement": pl.DataFrame(agreement),
        "fingerprints": images.select("image_id", "width", "height", "mode"),
        "pairs": pairs, "clusters": clusters, "outliers": outliers, "leakage": leakage,
    }
    with cat.transaction() as tx:
        for name, df in tables.items():
            tx.write(name, df, stage=STAGE, partition=DATASET)
    return SampleSummary(root, {k: len(v) for k, v in tables.items()}, n_files)
