"""Benchmark: medlake's full ingest of every public CXR and dermatology metadata file
versus pandas merely reading the same files (``pandas.read_csv``), in one run.

Goal: ingest (parse, normalise, write Parquet) takes no longer than pandas' read.
medlake's side runs the ``ingest`` stage itself (``pipelines.ingest.run_all``, what
``medlake ingest --all`` runs) over the public entries of the repository's params.yaml, in
a temporary workspace, with its default worker pool; one more run with ``processes=1``
gives the sequential figure and per-format times. The baseline reads every file medlake reads (the RSNA adapter also reads the DICOM-header
CSV beside the labels), with pandas' defaults plus ``low_memory=False``. Each side runs in its
own fresh process (imports not timed), the two alternating, best of ``--repeat``. Prints
both wall times, the ratio, each side's CPU seconds (user + system, all threads: less
sensitive to other load on the machine; worker processes included) and peak memory; the
sequential run also measures a floor: the CPU time of Polars merely reading the inputs plus
writing the stage's output tables (already built) with medlake's Parquet settings, i.e. an
ingest that did no normalising at all; ``--record`` appends the figures
to bench/RESULTS.md.

    .venv/bin/python bench/ingest.py [--record] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from _common import REPO, machine, real_data, record, run_child

MEDLAKE = r"""
import json, multiprocessing.forkserver, os, resource, sys, tempfile, time
from pathlib import Path
import yaml
from medlake.catalog import Catalog, Workspace
from medlake.pipelines import ingest
from bench._common import cpu_seconds, peak_rss_mb
real = Path(sys.argv[1])
entries = json.loads(sys.argv[2])
tmp = tempfile.TemporaryDirectory()
root = Path(tmp.name) / "ws"
(root / ".dvc").mkdir(parents=True)
(root / "params.yaml").write_text(yaml.safe_dump({"real_data": str(real), "ingest": entries}))
cat = Catalog(Workspace(root))
processes = int(sys.argv[3]) or None
stamps = []
cpu0 = cpu_seconds()
t0 = time.perf_counter()
# the 'ingest' stage (medlake ingest --all); echo is called as each entry's result is in
results = ingest.run_all(cat, echo=lambda m: stamps.append(time.perf_counter()),
                         processes=processes)
total = time.perf_counter() - t0
# the fork server reaps the workers; stopping it adds their CPU time to RUSAGE_CHILDREN
fs = multiprocessing.forkserver._forkserver
if getattr(fs, "_forkserver_pid", None):
    fs._stop()
cpu = cpu_seconds() - cpu0
children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
floor = {}
if processes == 1:  # the floor: reading the inputs and writing the outputs, nothing between
    import polars as pl, pyarrow.parquet as pq
    from medlake.catalog.tables import _write
    outs = sorted((root / "lake" / "tables").rglob("*.parquet"))
    tabs = [pq.read_table(f) for f in outs]
    c0 = cpu_seconds()
    for i, t in enumerate(tabs):
        _write(t, Path(tmp.name) / f"floor{i}.parquet")
    floor["write_cpu"] = cpu_seconds() - c0
    floor["out_rows"] = sum(t.num_rows for t in tabs)
    floor["out_files"] = len(outs)
    c0 = cpu_seconds()
    for f in json.loads(sys.argv[4]):
        pl.read_csv(f, infer_schema=False)
    floor["read_cpu"] = cpu_seconds() - c0
tmp.cleanup()
print(json.dumps({"floor": floor, "seconds": total, "cpu": cpu, "rows": sum(r.rows_read for r in results),
                  "per_format": {r.adapter: round(t - s, 3) for r, s, t
                                 in zip(results, [t0, *stamps], stamps)},
                  "files": [f.file for r in results for f in r.files], "peak_mb": peak_rss_mb(),
                  "worker_peak_mb": children_mb, "workers": os.cpu_count()}))
"""

PANDAS = r"""
import json, sys, time
import pandas as pd
from bench._common import cpu_seconds, peak_rss_mb
files = json.loads(sys.argv[1])
cpu0 = cpu_seconds()
t0 = time.perf_counter()
rows = 0
for f in files:
    rows += len(pd.read_csv(f, low_memory=False))
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": cpu_seconds() - cpu0,
                  "rows": rows, "peak_mb": peak_rss_mb()}))
"""


def plan() -> list[dict[str, str]]:
    """The public-data entries of the repository's ``params.yaml`` ``ingest:`` list (the
    stage's own list, in its order), keeping those whose file is present."""
    import yaml

    real = real_data()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return [e for e in params.get("ingest") or []
            if str(e["path"]).startswith("real:") and (real / str(e["path"])[5:]).exists()]


def read_files(real: Path, names: list[str]) -> list[str]:
    """The paths of the files medlake read (reports name files; find them under ``real``)."""
    out = []
    for name in dict.fromkeys(names):
        hits = sorted(real.rglob(name))
        if len(hits) != 1:
            sys.exit(f"cannot tell which file '{name}' is under {real}: {hits}")
        out.append(str(hits[0]))
    return sorted(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", action="store_true", help="append results to bench/RESULTS.md")
    ap.add_argument("--repeat", type=int, default=3, help="runs per side; the best is kept")
    a = ap.parse_args()
    real = real_data()
    order = plan()
    # each side in its own fresh process, alternating, best of N; then one sequential run
    # (processes=1: the same stage without its worker pool) for the A/B and per-format times
    load = os.getloadavg()[0]
    meds, pans = [], []
    for _ in range(a.repeat):
        meds.append(run_child(MEDLAKE, str(real), json.dumps(order), "0"))
        files = read_files(real, meds[0]["files"])
        pans.append(run_child(PANDAS, json.dumps(files)))
    seq = run_child(MEDLAKE, str(real), json.dumps(order), "1", json.dumps(files))
    med = min(meds, key=lambda r: r["seconds"])
    pan = min(pans, key=lambda r: r["seconds"])
    ratio = med["seconds"] / pan["seconds"]
    cpu_med, cpu_pan = min(r["cpu"] for r in meds), min(r["cpu"] for r in pans)
    fl = seq["floor"]
    floor_cpu = fl["read_cpu"] + fl["write_cpu"]
    # upper bound: the parent plus every worker at the largest worker's peak at once
    peak = med["peak_mb"] + med["workers"] * med["worker_peak_mb"]
    lines = [
        (f"machine: {machine()}; {len(files)} files, {len(order)} formats, "
         f"{med['rows']:,} input rows (pandas read {pan['rows']:,}); load average "
         f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (machine shared)"),
        "",
        "| | seconds | peak memory (MiB) |",
        "|---|---:|---:|",
        (f"| medlake ingest --all ({med['workers']} worker processes; parse, normalise, "
         f"write Parquet) | {med['seconds']:.2f} | {peak:.0f} |"),
        f"| pandas.read_csv only (baseline) | {pan['seconds']:.2f} | {pan['peak_mb']:.0f} |",
        f"| ratio medlake / pandas | {ratio:.2f} | {peak / pan['peak_mb']:.2f} |",
        f"| medlake, same stage with processes=1 (one run) | {seq['seconds']:.2f} | {seq['peak_mb']:.0f} |",
        "",
        (f"CPU seconds (user + system, all threads and worker processes; best of {a.repeat}): "
         f"medlake {cpu_med:.2f}, pandas {cpu_pan:.2f}, ratio {cpu_med / cpu_pan:.2f}; "
         f"medlake with processes=1 {seq['cpu']:.2f}"),
        (f"peak memory of the parallel run: parent {med['peak_mb']:.0f} MiB + "
         f"{med['workers']} x largest worker {med['worker_peak_mb']:.0f} MiB (upper bound)"),
        "",
        "per format, processes=1 (s): " + ", ".join(f"{k} {v}" for k, v in seq["per_format"].items()),
        "",
        (f"floor (no normalising at all): Polars reading the inputs {fl['read_cpu']:.2f} CPU-s + "
         f"writing the {fl['out_rows']:,} output rows ({fl['out_files']} Parquet files, medlake's "
         f"settings) {fl['write_cpu']:.2f} CPU-s = {floor_cpu:.2f} CPU-s; spread perfectly over "
         f"{med['workers']} cores {floor_cpu / med['workers']:.2f} s = "
         f"{floor_cpu / med['workers'] / pan['seconds']:.2f} x the pandas read"),
        "",
        f"goal: ratio <= 1.0 -> {'met' if ratio <= 1.0 else 'NOT met'}",
    ]
    out = "\n".join(lines)
    print(out)
    if a.record:
        record("Ingest: all public metadata vs pandas.read_csv", out)


if __name__ == "__main__":
    main()
