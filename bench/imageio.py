"""Benchmark: the generic adapter reading a folder of images versus a plain serial loop.

Generates N images (half JPEG, half PNG, 256x256) in a temporary folder, then times, in one
run: (a) the baseline, a serial Python loop that opens, fully decodes and sha256-hashes each
file with Pillow and hashlib (what a user script would do); (b) ``catalog.imageio.inspect_many``
(thread pool, same work plus mode/EXIF/bomb checks); (c) the whole ``medlake ingest generic``
of the folder with a manifest (reading + tables + Parquet). Prints seconds, files per second
and the ratio to the baseline; ``--record`` appends them to bench/RESULTS.md.

    .venv/bin/python bench/imageio.py [--n 2000] [--record]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, record

from medlake.catalog import Catalog, Workspace
from medlake.catalog.imageio import inspect_many
from medlake.pipelines import ingest


def make(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        arr = np.roll(base, i, axis=1)
        p = folder / (f"im{i:05d}.jpg" if i % 2 else f"im{i:05d}.png")
        Image.fromarray(arr).save(p, quality=90)
        paths.append(p)
    (folder.parent / "m.csv").write_text("id,path\n" + "".join(f"{p.stem},{p.name}\n" for p in paths))
    return paths


def baseline(paths: list[Path]) -> int:
    ok = 0
    for p in paths:
        data = p.read_bytes()
        hashlib.sha256(data).hexdigest()
        im = Image.open(io.BytesIO(data))
        im.load()
        ok += 1
    return ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    paths = make(tmp / "img", a.n)
    t = time.perf_counter()
    baseline(paths)
    base_s = time.perf_counter() - t
    t = time.perf_counter()
    infos = inspect_many(paths)
    pool_s = time.perf_counter() - t
    if not all(i.ok for i in infos):
        sys.exit("some generated images were not read")
    root = tmp / "ws"
    (root / ".dvc").mkdir(parents=True)
    t = time.perf_counter()
    res = ingest.run(Catalog(Workspace(root)), "generic", tmp / "img", dataset_id="bench",
                     manifest="../m.csv", id="id", path="path")
    ingest_s = time.perf_counter() - t
    if res.rows_quarantined:
        sys.exit(res.summary())
    lines = [
        f"{a.n:,} images 256x256 (half JPEG, half PNG); {machine()}",
        f"baseline serial Pillow decode + sha256 : {base_s:7.2f} s  ({a.n / base_s:7.0f} files/s)",
        (f"medlake imageio.inspect_many (threads) : {pool_s:7.2f} s  ({a.n / pool_s:7.0f} files/s)  "
        f"ratio {pool_s / base_s:.2f}"),
        (f"medlake ingest generic (whole stage)   : {ingest_s:7.2f} s  ({a.n / ingest_s:7.0f} files/s)  "
        f"ratio {ingest_s / base_s:.2f}"),
    ]
    print("\n".join(lines))
    if a.record:
        record("imageio: reading image folders", "```\n" + "\n".join(lines) + "\n```")


if __name__ == "__main__":
    main()
