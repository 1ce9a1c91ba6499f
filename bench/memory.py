"""Benchmark: peak memory (RSS) of every image stage at growing sizes, and its growth per image.

For each size (``--sizes 1000,10000``) a synthetic derm + CXR image set is generated once
with :func:`demo.synthetic.generate` and cached outside the repository
(``~/.cache/medlake/bench-images/<n>/``, or ``MEDLAKE_BENCH_CACHE``); every run starts from an
empty lake there. Each stage runs in a fresh interpreter whose peak RSS (``ru_maxrss``) is
its own: ingest (generic adapter, both manifests), fingerprint, embed (weights-free
``descriptor-v1``), duplicates (repository ``params.yaml`` thresholds), outliers. Beside
them, in the same run: the interpreter with medlake's stage modules imported and nothing
done (the floor every stage pays), and the ratio. The per-image growth is the slope
between two sizes. Goal (issue 14): every stage <= 2 GB at 100k images.

    .venv/bin/python bench/memory.py [--sizes 1000,10000] [--generate-only] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import REPO, machine, record, run_child

from medlake.demo.synthetic import generate

IMAGES_PER_CAPTURE = 1.47  # as in bench/duplicates.py
STAGES = ("ingest", "fingerprint", "embed", "duplicates", "outliers")
GOAL_MB = 2048

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import yaml
from medlake.catalog import Catalog, Workspace
from medlake.pipelines import duplicates, embed, fingerprint, ingest, outliers
root, stage = Path(sys.argv[1]), sys.argv[2]
repo = yaml.safe_load(open(sys.argv[3])) or {}
cat = Catalog(Workspace(root))
t0 = time.process_time()
if stage == "ingest":
    for m in ("derm", "cxr"):
        ingest.run(cat, "generic", root / "syn" / f"{m}.yaml")
elif stage == "fingerprint":
    fingerprint.run(cat, params={**fingerprint.DEFAULTS, **(repo.get("fingerprint") or {})})
elif stage == "embed":
    embed.run(cat, model=(repo.get("embed") or {}).get("model"), workers=0)
elif stage == "duplicates":
    duplicates.run(cat, params={**duplicates.DEFAULTS, **(repo.get("duplicates") or {})})
elif stage == "outliers":
    outliers.run(cat, params={**outliers.DEFAULTS, **(repo.get("outliers") or {})})
n = cat.read("images", columns=["image_id"]).height if stage != "none" else 0
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "cpu_s": time.process_time() - t0, "images": n}))
"""


def cache_root() -> Path:
    return Path(os.environ.get("MEDLAKE_BENCH_CACHE") or Path.home() / ".cache/medlake/bench-images")


def image_set(n: int, *, here: bool = False) -> Path:
    """The workspace folder for ``n`` images, its images generated once (cached).

    Generated in a child interpreter unless ``here``: Linux carries a process's peak RSS
    across fork and exec into the children it starts, so a parent that had just generated
    100k images (1.7 GB) floored every stage's measured peak at its own size.
    """
    root = cache_root() / str(n)
    if (root / "syn" / "truth_files.csv").exists():
        return root
    if not here:  # the child generates it (here=True), or fails and raises here
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--sizes", str(n),
                        "--generate-only"], check=True)
    else:
        t = time.perf_counter()
        (root / ".dvc").mkdir(parents=True, exist_ok=True)
        generate(root / "syn", n_captures=max(8, round(n / IMAGES_PER_CAPTURE)), seed=0,
                 workers=2, overwrite=True)
        print(f"generated {n:,} images in {time.perf_counter() - t:.0f} s -> {root}", flush=True)
    return root


def measure(n: int) -> dict[str, dict]:
    root = image_set(n)
    shutil.rmtree(root / "lake", ignore_errors=True)
    out = {"baseline": run_child(CHILD, str(root), "none", str(REPO / "params.yaml"))}
    for stage in STAGES:
        t = time.perf_counter()
        out[stage] = run_child(CHILD, str(root), stage, str(REPO / "params.yaml"))
        out[stage]["wall_s"] = time.perf_counter() - t
        print(f"  {n:,}: {stage}: peak {out[stage]['rss_mb']:,.0f} MB, "
              f"{out[stage]['cpu_s']:.0f} CPU-s, {out[stage]['wall_s']:.0f} s wall", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    if a.generate_only:
        for n in sizes:
            image_set(n, here=True)
        return
    res = {n: measure(n) for n in sizes}
    images = {n: res[n]["ingest"]["images"] for n in sizes}
    head = ("| stage | " + " | ".join(f"peak MB at {images[n]:,}" for n in sizes)
            + " | growth KB/image | interpreter + imports MB | ratio at the largest |")
    lines = [f"machine: {machine()}; load average at the end {os.getloadavg()[0]:.2f}", "",
             head, "|---|" + "---:|" * (len(sizes) + 3)]
    big, small = sizes[-1], sizes[0]
    base = res[big]["baseline"]["rss_mb"]
    for stage in STAGES:
        peaks = [res[n][stage]["rss_mb"] for n in sizes]
        growth = ((peaks[-1] - peaks[0]) * 1024 / max(images[big] - images[small], 1)
                  if len(sizes) > 1 else float("nan"))
        lines.append(f"| {stage} | " + " | ".join(f"{p:,.0f}" for p in peaks)
                     + f" | {growth:.1f} | {base:,.0f} | {peaks[-1] / base:.1f} |")
    worst = {stage: res[big][stage]["rss_mb"] for stage in STAGES}
    per_100k = {s: res[big][s]["rss_mb"] + (res[big][s]["rss_mb"] - res[small][s]["rss_mb"])
                * (100_000 - images[big]) / max(images[big] - images[small], 1) for s in STAGES}
    lines += ["", "CPU seconds per stage: " + "; ".join(
        f"{n:,}: " + ", ".join(f"{s} {res[n][s]['cpu_s']:.0f}" for s in STAGES) for n in sizes)]
    if big >= 100_000:  # the requested size (the generator gives ~97%)
        lines.append(f"- goal <= {GOAL_MB:,} MB per stage at {images[big]:,}: "
                     + ("met" if max(worst.values()) <= GOAL_MB else "NOT met")
                     + f" (largest {max(worst, key=worst.get)} {max(worst.values()):,.0f} MB)")
    elif len(sizes) > 1:
        lines.append("- linear projection to 100k images from the two largest sizes: "
                     + ", ".join(f"{s} {per_100k[s]:,.0f} MB" for s in STAGES))
    print("\n".join(lines))
    print(json.dumps({str(n): res[n] for n in sizes}))
    if a.record:
        record("memory per image stage (bench/memory.py, issue 14)", "\n".join(lines))


if __name__ == "__main__":
    main()
