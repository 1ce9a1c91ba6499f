"""Benchmark: materialise a 10k-image version (no resize; 4 resizes with 1 and 2 processes).

Prints medlake's figure beside a baseline measured in the same run and the ratio:
no resize  -> baseline ``shutil.copytree`` of the image folder (what a plain copy costs);
resize     -> baseline a bare PIL bicubic loop over the same files and sizes.

Usage: ``python bench/versions.py [N_IMAGES]`` (default 10000). Not run by the tests.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from catalog import Catalog, Workspace
from pipelines import materialize

SIZES = [28, 64, 128, 224]


def build(root: Path, n: int) -> Catalog:
    (root / ".dvc").mkdir(parents=True)
    cat = Catalog(Workspace(root.resolve()))
    img_dir = root / "data/imgs"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
    ids = [f"I{i:06d}" for i in range(n)]
    for i, nid in enumerate(ids):
        Image.fromarray(np.roll(base, i % 96, axis=1)).save(img_dir / f"{nid}.png", compress_level=1)
    iid = [f"b:{x}" for x in ids]
    with cat.transaction() as tx:
        tx.write("datasets", [{"dataset_id": "b", "name": "bench", "images_root": "data/imgs"}],
                 stage="ingest")
        tx.write("images", pl.DataFrame({"image_id": iid, "dataset_id": "b", "native_id": ids,
                                         "path": [f"{x}.png" for x in ids], "width": 96, "height": 96,
                                         "group_id": [f"g{i // 3}" for i in range(n)]}), stage="ingest")
        tx.write("splits", pl.DataFrame({"image_id": iid, "dataset_id": "b", "scheme": "s",
                                         "split": [["train", "val", "test"][i % 3] for i in range(n)]}),
                 stage="ingest")
        tx.write("annotations", pl.DataFrame({"image_id": iid, "source_id": "b:l", "annotator": "",
                                              "finding": "l", "category": [f"c{i % 5}" for i in range(n)]}),
                 stage="ingest")
        tx.write("versions", [{"name": "b@s", "dataset_id": "b", "kind": "root", "scheme": "s"}],
                 stage="ingest")
    for name, export in (("plain", "{images: true}"), ("resized", f"{{images: true, sizes: {SIZES}}}")):
        (root / "recipes").mkdir(exist_ok=True)
        (root / "recipes" / f"{name}.yaml").write_text(
            f"dataset: b\nparent: b@s\nlabels: {{l: b:l}}\nrules: [{{fix_leakage: {{to: train}}}}]\n"
            f"export: {export}\n")
    return cat


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        cat = build(Path(d) / "ws", n)
        src = cat.ws.root / "data/imgs"
        base = timed(lambda: shutil.copytree(src, Path(d) / "copy"))
        med = timed(lambda: materialize.run(cat, "plain"))
        print(f"materialise {n:,} images, no resize: medlake {med:.2f} s | copytree {base:.2f} s "
              f"| ratio {med / base:.2f}")
        files = sorted(src.glob("*.png"))

        def pil_loop() -> None:
            out = Path(d) / "pil"
            out.mkdir(exist_ok=True)
            for f in files:
                with Image.open(f) as im:
                    im = im.convert("RGB")
                    for s in SIZES:
                        im.resize((s, s), Image.Resampling.BICUBIC).save(out / f"{f.stem}_{s}.png")

        base_r = timed(pil_loop)
        for procs in (1, 2):
            t = timed(lambda p=procs: materialize.run(cat, "resized", processes=p))
            print(f"materialise {n:,} images + {len(SIZES)} sizes, {procs} process(es): medlake "
                  f"{t:.2f} s ({n / t:,.0f} images/s) | bare PIL loop {base_r:.2f} s "
                  f"({n / base_r:,.0f} images/s) | ratio {t / base_r:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
