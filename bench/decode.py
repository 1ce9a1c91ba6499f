"""Benchmark: reduced-size JPEG decoding in ingest, the duplicates features and the embed loader.

Large JPEGs (MIMIC-CXR-JPG ships chest X-rays of ~3000 x 2500 px; many exports are 1024 px
and more) are decoded at a DCT scale that keeps at least twice the pixels the stage uses
(``catalog.imageio.open_image(min_side=...)``). This times, in one run and on the same
generated files, per image CPU of (a) ``pipelines.verify.features`` with reduced decoding
(the default) against the baseline, the same function decoding every pixel
(``reduced=False``); (b) the descriptor-v1 loader step (``pipelines.embed``'s ``_Images``
item) with and without its ``min_side``; (c) ingest's file check (``imageio.inspect``:
JPEGs at their smallest DCT scale) against reading, hashing and decoding every pixel. It
also reports how far the reduced results are from the full ones (mean absolute difference
of the 256-px frame in grey levels; cosine of the descriptors; inspect's width, height and
verdict). Files are made once per run in a temporary folder.

    .venv/bin/python bench/decode.py [--n 40] [--record]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, record

from medlake.catalog.embedders import DescriptorEmbedder
from medlake.catalog.imageio import inspect, load_8bit
from medlake.pipelines import embed, verify

SHAPES = (("grey 3000x2500 (MIMIC-CXR-JPG-like)", 3000, 2500, "L"),
          ("grey 1024x1024", 1024, 1024, "L"),
          ("RGB 600x450 (HAM10000-like)", 600, 450, "RGB"))


def picture(w: int, h: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    ch = 3 if mode == "RGB" else 1
    base = np.zeros((h, w, ch), np.float32)
    for s in (128, 32, 8):  # anatomy-like structure at three scales, plus sensor noise
        small = rng.random((h // s + 1, w // s + 1, ch)).astype(np.float32)
        base += cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, ch) / 3
    noise = rng.normal(0, 2.0, base.shape).astype(np.float32)
    arr = np.clip(base * 255 + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr[..., 0] if ch == 1 else arr, mode)


def full_inspect(f: Path) -> tuple[str, tuple[int, int]]:
    """The baseline of ``inspect``: read, sha256 and decode every pixel."""
    data = f.read_bytes()
    im = Image.open(io.BytesIO(data))
    im.load()
    return hashlib.sha256(data).hexdigest(), im.size


def cpu_per_image(fn, files: list[Path]) -> tuple[float, list]:
    c = time.process_time()
    out = [fn(f) for f in files]
    return 1000 * (time.process_time() - c) / len(files), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="files per shape")
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    prep = embed.preparer(DescriptorEmbedder())
    rows = ["| files | KB/file | stage step | full decode ms/image | reduced ms/image | ratio | difference |",
            "|---|---:|---|---:|---:|---:|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, w, h, mode in SHAPES:
            files = []
            for i in range(args.n):
                f = Path(tmp) / f"{w}x{h}-{i}.jpg"
                picture(w, h, mode, i).save(f, quality=90)
                files.append(f)
            kb = sum(f.stat().st_size for f in files) / len(files) / 1024
            full_t, full = cpu_per_image(lambda f: verify.features(str(f), reduced=False), files)
            red_t, red = cpu_per_image(lambda f: verify.features(str(f)), files)
            diff = np.mean([np.abs(a["g"].astype(int) - b["g"].astype(int)).mean()
                            for a, b in zip(full, red, strict=True)])
            rows.append(f"| {name} | {kb:,.0f} | duplicates features | {full_t:.1f} | {red_t:.1f} | "
                        f"{full_t / red_t:.2f} | frame differs by {diff:.2f} grey levels (mean) |")
            full_i, _ = cpu_per_image(full_inspect, files)
            red_i, infos = cpu_per_image(inspect, files)
            same = all(i.ok and (i.width, i.height) == (w, h) for i in infos)
            rows.append(f"| {name} | {kb:,.0f} | ingest check (inspect) | {full_i:.1f} | {red_i:.1f} | "
                        f"{full_i / red_i:.2f} | {'same' if same else 'DIFFERENT'} width, height, verdict |")
            ef_t, ef = cpu_per_image(lambda f: prep(load_8bit(f)), files)
            er_t, er = cpu_per_image(lambda f: prep(prep.load(f)), files)  # the loader's step
            cos = min(float(a @ b) for a, b in zip(ef, er, strict=True))
            rows.append(f"| {name} | {kb:,.0f} | embed descriptor-v1 | {ef_t:.1f} | {er_t:.1f} | "
                        f"{ef_t / er_t:.2f} | cosine to the full decode >= {cos:.4f} |")
            print(rows[-2], rows[-1], sep="\n", flush=True)
    head = (f"`python bench/decode.py --n {args.n}` (CPU per image, one thread; baseline: the "
            "same step decoding every pixel):")
    body = "\n".join([machine(), "", head, "", *rows])
    print(body)
    if args.record:
        record("reduced-size JPEG decoding (bench/decode.py, issue #14 part 3)", body)


if __name__ == "__main__":
    main()
