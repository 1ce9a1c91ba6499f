"""Benchmark: materialise a 10k-image version; resize scaling; DVC push/pull plain vs packed.

Prints medlake's figure beside a baseline measured in the same run and the ratio:

* no resize  -> baseline ``shutil.copytree`` of the image folder (what a plain copy costs);
* resize     -> 4 bicubic sizes with 1 and 2 worker processes (a smaller N, default 2,000)
  against a bare PIL loop over the same files and sizes; the 2-vs-1 process speed-up;
* DVC        -> ``dvc push`` to a local directory remote, then ``dvc pull`` into a fresh
  ``git clone``, of the same 10k-image version stored as plain files and packed
  (``export: {pack: shards}``); the plain/packed ratio decides whether packing pays.

Usage: ``python bench/versions.py [--n 10000] [--resize-n 2000] [--parts materialize,resize,dvc]
[--record]``. Not run by the tests; ``--record`` appends the figures to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import cpu_seconds, machine, record
from medlake.catalog import Catalog, Workspace, run_dvc
from medlake.pipelines import materialize

SIZES = [28, 64, 128, 224]


def build(root: Path, n: int, px: int = 96) -> Catalog:
    (root / ".dvc").mkdir(parents=True)
    cat = Catalog(Workspace(root.resolve()))
    img_dir = root / "data/imgs"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (px, px, 3), dtype=np.uint8)
    ids = [f"I{i:06d}" for i in range(n)]
    for i, nid in enumerate(ids):
        arr = np.roll(base, i % px, axis=1)
        arr[0, 0] = (i & 255, (i >> 8) & 255, (i >> 16) & 255)  # every file unique (DVC dedups)
        Image.fromarray(arr).save(img_dir / f"{nid}.png", compress_level=1)
    iid = [f"b:{x}" for x in ids]
    with cat.transaction() as tx:
        tx.write("datasets", [{"dataset_id": "b", "name": "bench", "images_root": "data/imgs"}],
                 stage="ingest")
        tx.write("images", pl.DataFrame({"image_id": iid, "dataset_id": "b", "native_id": ids,
                                         "path": [f"{x}.png" for x in ids], "width": px, "height": px,
                                         "group_id": [f"g{i // 3}" for i in range(n)]}), stage="ingest")
        tx.write("splits", pl.DataFrame({"image_id": iid, "dataset_id": "b", "scheme": "s",
                                         "split": [["train", "val", "test"][i % 3] for i in range(n)]}),
                 stage="ingest")
        tx.write("annotations", pl.DataFrame({"image_id": iid, "source_id": "b:l", "annotator": "",
                                              "finding": "l", "category": [f"c{i % 5}" for i in range(n)]}),
                 stage="ingest")
        tx.write("versions", [{"name": "b@s", "dataset_id": "b", "kind": "root", "scheme": "s"}],
                 stage="ingest")
    for name, export in (("plain", "{images: true}"), ("resized", f"{{images: true, sizes: {SIZES}}}"),
                         ("packed", "{images: true, pack: shards}")):
        (root / "recipes").mkdir(exist_ok=True)
        (root / "recipes" / f"{name}.yaml").write_text(
            f"dataset: b\nparent: b@s\nlabels: {{l: b:l}}\nrules: [{{fix_leakage: {{to: train}}}}]\n"
            f"export: {export}\n")
    return cat


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def bench_materialize(d: Path, cat: Catalog, n: int) -> list[str]:
    src = cat.ws.root / "data/imgs"
    base = timed(lambda: shutil.copytree(src, d / "copy"))
    med = timed(lambda: materialize.run(cat, "plain"))
    line = (f"| materialise {n:,} images, no resize (hardlinks) | {med:.2f} s | `shutil.copytree` "
            f"of the images {base:.2f} s | {med / base:.2f} |")
    print(line)
    return [line]


def bench_resize(d: Path, n: int) -> list[str]:
    cat = build(d / "ws_resize", n)
    files = sorted((cat.ws.root / "data/imgs").glob("*.png"))

    def pil_loop() -> None:
        out = d / "pil"
        out.mkdir(exist_ok=True)
        for f in files:
            with Image.open(f) as im:
                im = im.convert("RGB")
                for s in SIZES:
                    im.resize((s, s), Image.Resampling.BICUBIC).save(out / f"{f.stem}_{s}.png")

    base = timed(pil_loop)
    lines, t = [], {}
    for procs in (1, 2):
        c0, load = cpu_seconds(), os.getloadavg()[0]
        t[procs] = timed(lambda p=procs: materialize.run(cat, "resized", processes=p))
        cores = (cpu_seconds() - c0) / t[procs]
        lines.append(f"| materialise {n:,} images + bicubic resize to {'/'.join(map(str, SIZES))}, "
                     f"{procs} process(es) | {t[procs]:.2f} s ({n / t[procs]:,.0f} images/s; "
                     f"{cores:.2f} cores busy on average, load average {load:.1f}) | "
                     f"bare PIL loop, 1 process {base:.2f} s ({n / base:,.0f} images/s) | "
                     f"{t[procs] / base:.2f} |")
        print(lines[-1], flush=True)
    lines.append(f"| speed-up 2 processes vs 1 | {t[1] / t[2]:.2f}x | ideal 2.00x on 2 free cores | |")
    print(lines[-1])
    return lines


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def bench_dvc(d: Path, cat: Catalog, n: int) -> list[str]:
    """dvc add / push / pull (fresh clone) of the plain and the packed version."""
    materialize.run(cat, "plain")
    res = materialize.run(cat, "packed")
    repo, remote = d / "repo", d / "remote"
    repo.mkdir()
    _git("init", "-q", cwd=repo)
    _git("config", "user.email", "bench@example.org", cwd=repo)
    _git("config", "user.name", "bench", cwd=repo)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    run_dvc(["init", "-q"], repo, env=env)
    run_dvc(["remote", "add", "-d", "local", str(remote)], repo, env=env)
    t: dict[str, dict[str, float]] = {}
    files = {}
    for name in ("plain", "packed"):
        os.rename(cat.ws.versions_dir / name, repo / name)
        files[name] = sum(1 for p in (repo / name).rglob("*") if p.is_file())
        t[name] = {"add": timed(lambda x=name: run_dvc(["add", "-q", x], repo, env=env))}
    _git("add", "-A", cwd=repo)
    _git("commit", "-qm", "versions", cwd=repo)
    for name in ("plain", "packed"):
        t[name]["push"] = timed(lambda x=name: run_dvc(["push", "-q", f"{x}.dvc"], repo, env=env))
        # a fresh clone each: DVC's default cache.type (copy into the workspace), then
        # hardlink (the reference workspace's .dvc/config: reflink,hardlink,copy)
        for how in ("copy", "hardlink"):
            clone = d / f"clone_{name}_{how}"
            _git("clone", "-q", str(repo), str(clone), cwd=d)
            if how == "hardlink":
                run_dvc(["config", "--local", "cache.type", "reflink,hardlink,copy"], clone, env=env)
            t[name][f"pull ({how})"] = timed(
                lambda c=clone, x=name: run_dvc(["pull", "-q", f"{x}.dvc"], c, env=env))
            if _digest(clone / name) != _digest(repo / name):
                raise SystemExit(f"pulled {name} differs from the pushed one")
    size = sum(p.stat().st_size for p in (repo / "plain").rglob("*") if p.is_file()) / 2**20
    lines = []
    for step in ("add", "push", "pull (copy)", "pull (hardlink)"):
        lines.append(f"| `dvc {step}` of the {n:,}-image version ({size:,.0f} MiB) | packed "
                     f"({files['packed']} files, "
                     f"{res.files.get('shards', 0)} shards) {t['packed'][step]:.2f} s | plain "
                     f"({files['plain']:,} files) {t['plain'][step]:.2f} s | "
                     f"{t['plain'][step] / t['packed'][step]:.1f}x faster packed |")
    for how in ("copy", "hardlink"):
        pp = {k: v["push"] + v[f"pull ({how})"] for k, v in t.items()}
        lines.append(f"| **push + pull ({how})** | packed {pp['packed']:.2f} s | plain "
                     f"{pp['plain']:.2f} s | **{pp['plain'] / pp['packed']:.1f}x** faster packed "
                     "(pulled trees byte-identical) |")
    print("\n".join(lines))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="images for materialise and DVC")
    ap.add_argument("--resize-n", type=int, default=2_000, help="images for the resize part")
    ap.add_argument("--parts", default="materialize,resize,dvc")
    ap.add_argument("--px", type=int, default=96, help="image side in pixels (random PNGs)")
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    a = ap.parse_args()
    parts = a.parts.split(",")
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cat = build(d / "ws", a.n, a.px) if {"materialize", "dvc"} & set(parts) else None
        if "materialize" in parts:
            lines += bench_materialize(d, cat, a.n)
        if "resize" in parts:
            lines += bench_resize(d, a.resize_n)
        if "dvc" in parts:
            lines += bench_dvc(d, cat, a.n)
    if a.record:
        record(f"versions: {a.parts} (bench/versions.py)",
               f"{machine()}, shared with other engineers' jobs (timings noisy); {a.px}x{a.px} "
               "random PNGs, one run.\n\n"
               "| measurement | medlake | baseline (same run) | ratio |\n|---|---|---|---|\n"
               + "\n".join(lines))


if __name__ == "__main__":
    main()
