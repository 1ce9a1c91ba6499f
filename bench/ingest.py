"""Benchmark: medlake's full ingest of every public CXR and dermatology metadata file
versus pandas merely reading the same files (``pandas.read_csv``), in one run.

Goal: ingest (parse, normalise, write Parquet) takes no longer than pandas' read.
The baseline reads every file medlake reads (the RSNA adapter also reads the DICOM-header
CSV beside the labels), with pandas' defaults plus ``low_memory=False``. Each side runs in its
own fresh process (imports not timed), the two alternating, best of ``--repeat``. Prints
both wall times, the ratio, each side's CPU seconds (user + system, all threads: less
sensitive to other load on the machine) and peak memory; ``--record`` appends the figures
to bench/RESULTS.md.

    .venv/bin/python bench/ingest.py [--record] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from _common import machine, real_data, record, run_child

# user + system seconds of this process, all its threads
CPU = """
import resource
def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
"""

MEDLAKE = r"""
import json, sys, tempfile, time, os
from pathlib import Path
from catalog import Catalog, Workspace
from pipelines import adapters, ingest
from bench._common import peak_rss_mb
CPU
real = Path(sys.argv[1])
order = json.loads(sys.argv[2])
tmp = tempfile.TemporaryDirectory()
root = Path(tmp.name) / "ws"
(root / ".dvc").mkdir(parents=True)
cat = Catalog(Workspace(root))
reg = adapters.registry()
times, read = {}, []
cpu0 = cpu_seconds()
t0 = time.perf_counter()
rows = 0
for name in order:
    t = time.perf_counter()
    res = ingest.run(cat, name, real / reg[name].default_path)
    times[name] = round(time.perf_counter() - t, 3)
    rows += res.rows_read
    read += [f.file for f in res.files]
total = time.perf_counter() - t0
cpu = cpu_seconds() - cpu0
tmp.cleanup()
print(json.dumps({"seconds": total, "cpu": cpu, "per_format": times, "rows": rows,
                  "files": read, "peak_mb": peak_rss_mb()}))
""".replace("CPU\n", CPU)

PANDAS = r"""
import json, sys, time
import pandas as pd
from bench._common import peak_rss_mb
CPU
files = json.loads(sys.argv[1])
cpu0 = cpu_seconds()
t0 = time.perf_counter()
rows = 0
for f in files:
    rows += len(pd.read_csv(f, low_memory=False))
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": cpu_seconds() - cpu0,
                  "rows": rows, "peak_mb": peak_rss_mb()}))
""".replace("CPU\n", CPU)


def plan() -> list[str]:
    """Adapters with a public file, linked ones after the dataset they label."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipelines import adapters

    reg = {n: a for n, a in adapters.registry().items() if a.default_path}
    real = real_data()
    reg = {n: a for n, a in reg.items() if (real / a.default_path).exists()}
    order: list[str] = []

    def visit(n: str) -> None:
        if n in order or n not in reg:
            return
        if reg[n].links_to:
            if reg[n].links_to not in reg:
                return
            visit(reg[n].links_to)
        order.append(n)

    for n in sorted(reg):
        visit(n)
    return order


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
    # each side in its own fresh process, alternating, best of N
    load = os.getloadavg()[0]
    meds, pans = [], []
    for _ in range(a.repeat):
        meds.append(run_child(MEDLAKE, str(real), json.dumps(order)))
        files = read_files(real, meds[0]["files"])
        pans.append(run_child(PANDAS, json.dumps(files)))
    med = min(meds, key=lambda r: r["seconds"])
    pan = min(pans, key=lambda r: r["seconds"])
    ratio = med["seconds"] / pan["seconds"]
    cpu_med, cpu_pan = min(r["cpu"] for r in meds), min(r["cpu"] for r in pans)
    lines = [
        (f"machine: {machine()}; {len(files)} files, {len(order)} formats, "
         f"{med['rows']:,} input rows (pandas read {pan['rows']:,}); load average "
         f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (machine shared)"),
        "",
        "| | seconds | peak memory (MiB) |",
        "|---|---:|---:|",
        f"| medlake ingest (parse, normalise, write Parquet) | {med['seconds']:.2f} | {med['peak_mb']:.0f} |",
        f"| pandas.read_csv only (baseline) | {pan['seconds']:.2f} | {pan['peak_mb']:.0f} |",
        f"| ratio medlake / pandas | {ratio:.2f} | {med['peak_mb'] / pan['peak_mb']:.2f} |",
        "",
        (f"CPU seconds (user + system, all threads; best of {a.repeat}): medlake "
         f"{cpu_med:.2f}, pandas {cpu_pan:.2f}, ratio {cpu_med / cpu_pan:.2f}"),
        "",
        "per format (s): " + ", ".join(f"{k} {v}" for k, v in med["per_format"].items()),
        "",
        f"goal: ratio <= 1.0 -> {'met' if ratio <= 1.0 else 'NOT met'}",
    ]
    out = "\n".join(lines)
    print(out)
    if a.record:
        record("Ingest: all public metadata vs pandas.read_csv", out)


if __name__ == "__main__":
    main()
