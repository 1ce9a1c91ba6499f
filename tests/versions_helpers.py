"""Small generated workspaces for the version tests: real tables, real PNG files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from medlake.catalog import Catalog

BIN = Path(sys.executable).parent  # the venv's medlake and dvc

DS = "toy"
LABELS = ["nevus", "melanoma", "bcc"]


def build_toy(cat: Catalog, *, n_groups: int = 12, seed: int = 0, images: bool = True,
              clusters: bool = True) -> pl.DataFrame:
    """A dataset 'toy': groups of 1-3 images spread over train/val/test (some leak), one
    label source with a few unknowns, real PNGs of varied sizes, and two duplicate clusters
    (one whose labels agree, one whose labels conflict). Returns the images frame."""
    rng = np.random.default_rng(seed)
    root = cat.ws.root / "data" / "toy"
    rows, splits, ann = [], [], []
    k = 0
    for g in range(n_groups):
        label = LABELS[g % len(LABELS)]
        for _ in range(1 + g % 3):
            k += 1
            nid = f"T{k:03d}"
            w, h = 20 + 4 * (k % 5), 16 + 3 * (k % 4)
            if images:
                arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                root.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / f"{nid}.png")
            rows.append({"image_id": f"{DS}:{nid}", "dataset_id": DS, "native_id": nid,
                         "path": f"{nid}.png", "width": w, "height": h, "group_id": f"{DS}:G{g:02d}"})
            splits.append({"image_id": f"{DS}:{nid}", "dataset_id": DS, "scheme": "orig",
                           "split": ["train", "val", "test"][int(rng.integers(0, 3))]})
            unknown = k % 11 == 0
            ann.append({"image_id": f"{DS}:{nid}", "source_id": f"{DS}:dx", "annotator": "",
                        "finding": "dx", "category": None if unknown else label,
                        "raw_value": "unknown" if unknown else label,
                        "meaning": "unknown" if unknown else "positive", "is_invalid": False})
            ann.append({"image_id": f"{DS}:{nid}", "source_id": f"{DS}:expert", "annotator": "",
                        "finding": "dx", "category": "melanoma" if k % 4 == 0 else label,
                        "raw_value": label, "meaning": "positive", "is_invalid": False})
    images_df = pl.DataFrame(rows)
    with cat.transaction() as tx:
        tx.write("datasets", [{"dataset_id": DS, "name": "Toy derm", "modality": "derm",
                               "license": "CC-BY-NC-4.0", "citation": "Toy et al. 2024",
                               "images_root": "data/toy" if images else None}],
                 stage="ingest", partition=DS)
        tx.write("images", images_df, stage="ingest", partition=DS)
        tx.write("splits", splits, stage="ingest", partition=DS)
        tx.write("annotations", ann, stage="ingest", partition=DS)
        tx.write("sources", [
            {"source_id": f"{DS}:dx", "dataset_id": DS, "name": "dx", "kind": "non_expert",
             "value_type": "category", "rule": "clinic label"},
            {"source_id": f"{DS}:expert", "dataset_id": DS, "name": "expert", "kind": "expert",
             "value_type": "category", "rule": "expert re-read"}], stage="ingest", partition=DS)
        counts = pl.DataFrame(splits).group_by("split").len().sort("split")
        tx.write("versions", [{"name": f"{DS}@orig", "dataset_id": DS, "kind": "root",
                               "scheme": "orig", "n_images": len(rows),
                               "counts": json.dumps({"split": dict(counts.iter_rows())})}],
                 stage="ingest", partition=DS)
    if clusters:
        # c1: two nevus images (labels agree); c2: a bcc and a melanoma image (conflict)
        lab = {r["image_id"]: r["category"] for r in ann if r["source_id"] == f"{DS}:dx"}
        ids = sorted(lab)
        same = [a for a in ids if lab[a] == "nevus"][:1] + [a for a in ids if lab[a] == "nevus"][-1:]
        diff = [a for a in ids if lab[a] == "bcc"][:1] + [a for a in ids if lab[a] == "melanoma"][-1:]
        cat.write("clusters", [{"image_id": same[0], "cluster_id": "c1"},
                               {"image_id": same[1], "cluster_id": "c1"},
                               {"image_id": diff[0], "cluster_id": "c2"},
                               {"image_id": diff[1], "cluster_id": "c2"}],
                  stage="duplicates", partition=DS)
    return images_df


def write_recipe(cat: Catalog, name: str, text: str) -> Path:
    p = cat.ws.recipes_dir / f"{name}.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


TOY_RECIPE = """
dataset: toy
parent: toy@orig
labels:
  dx: "toy:dx/dx"
rules:
  - fix_leakage: {to: train}
  - duplicates: {mode: keep_one}
  - drop_unknown: {labels: [dx]}
  - resplit: {ratios: {train: 0.6, val: 0.2, test: 0.2}, seed: 3, stratify: dx}
export: {images: true, sizes: [8, 16], npz: dx}
"""


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def sh(*cmd: str, cwd: Path) -> str:
    """Run a command (the venv's bin first on PATH); its output, or an error with the tail of it."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    if r.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed in {cwd}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout + r.stderr
