"""Benchmark: the local engine against a 2-node Ray cluster (one CPU each) in one run.

Inside a loopback-only namespace (tests/scale_harness.py, scenario ``bench``) it starts
SeaweedFS and two Ray nodes and measures: start-up seconds (head, worker, S3 server), per-task
overhead (400 no-op tasks), the exact near-pair search (``knn_pairs`` local vs
``ray_duplicates.knn_pairs``: N x 512 random unit vectors, k 10) and ``embed`` with
descriptor-v1 (local DataLoader into lake/vectors vs Ray Data actors into LanceDB on S3).
On a 2-core machine the cluster is expected to be slower: the figures are its overhead.

    .venv/bin/python bench/scale.py [--vectors 40000] [--captures 150] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import REPO, machine, record

UNSHARE = ["unshare", "-rn", "--pid", "--fork", "--kill-child", "--mount-proc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", type=int, default=40000)
    ap.add_argument("--captures", type=int, default=150, help="synthetic derm captures")
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlk-bench") as tmp:
        env = {**os.environ, "PYTHONPATH": str(REPO), "SCALE_BENCH_VECTORS": str(a.vectors),
               "SCALE_BENCH_CAPTURES": str(a.captures), "RAY_USAGE_STATS_ENABLED": "0"}
        proc = subprocess.run([*UNSHARE, sys.executable, str(REPO / "tests/scale_harness.py"),
                               tmp, "bench"], env=env, capture_output=True, text=True, check=False)
        out = Path(tmp) / "result.json"
        if not out.exists():
            sys.exit(f"harness failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        r = json.loads(out.read_text())
    if not r.get("ok"):
        sys.exit(r.get("error"))
    s, st = r, r["startup"]
    rows = [
        ("start-up: ray head / worker / S3 server (s)",
         f"{st['ray_head_s']:.1f} / {st['ray_worker_s']:.1f} / {st['weed_s']:.1f}", "", ""),
        ("driver connect (s)", f"{s['connect_s']:.1f}", "", ""),
        ("per-task overhead (ms, 400 no-op tasks)", f"{s['task_overhead_ms']:.1f}", "", ""),
        (f"exact pair search {s['knn_n']:,} x 512, k 10 (s)", f"{s['knn_ray_s']:.2f}",
         f"{s['knn_local_s']:.2f}", f"{s['knn_ray_s'] / s['knn_local_s']:.2f}"),
        (f"embed descriptor-v1, {s['embed_images']} images (s)", f"{s['embed_ray_s']:.1f}",
         f"{s['embed_local_s']:.1f}", f"{s['embed_ray_s'] / s['embed_local_s']:.2f}"),
    ]
    rows += [("ViT-B-32 CPU forward, batch 32, this process (images/s)",
              f"{s['vit_b32_images_per_s_local']:.1f}", "", ""),
             ("lake tables per image (bytes, synthetic derm)", f"{s['table_bytes_per_image']:.0f}",
              "", ""),
             ("LanceDB on S3 per image, descriptor-v1 (bytes)",
              f"{s['s3_vector_bytes_per_image']:.0f}", "", "")]
    table = ["| figure | Ray 2 nodes x 1 CPU | local engine | ratio (Ray / local) |",
             "|---|---|---|---|", *[f"| {a_} | {b} | {c} | {d} |" for a_, b, c, d in rows]]
    checks = (f"pair sets equal: {s['knn_equal']} ({s['knn_pairs']:,} pairs); embed vectors max "
              f"|diff| {s['embed_max_abs_diff']}; cleanup: {r['cleanup']['stopped']} processes "
              f"stopped, left {r['cleanup']['left_processes'] or 'none'}")
    text = "\n".join(table) + f"\n\n{checks}\n"
    print(text)
    if a.record:
        record("scale (issue #7): local engine vs 2-node Ray cluster, LanceDB on SeaweedFS S3",
               f"Machine: {machine()}, loaded (other engineers' jobs running); both nodes and the "
               f"local engine share the same 2 cores, so the ratio is overhead, not speed-up.\n\n"
               + text)


if __name__ == "__main__":
    main()
