"""Benchmark: medlake's full ingest of every public CXR and dermatology metadata file
versus pandas merely reading the same files (``pandas.read_csv``), in one run.

Goal: ingest (parse, normalise, write Parquet) takes no longer than pandas' read.
Prints both times, the ratio and each side's peak memory; ``--record`` appends the
figures to bench/RESULTS.md.

    .venv/bin/python bench/ingest.py [--record] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import sys

from _common import machine, real_data, record, run_child

MEDLAKE = r"""
import json, sys, tempfile, time, os
from pathlib import Path
from catalog import Catalog, Workspace
from pipelines import adapters, ingest
from bench._common import peak_rss_mb
real = Path(sys.argv[1])
order = json.loads(sys.argv[2])
root = Path(tempfile.mkdtemp()) / "ws"
(root / ".dvc").mkdir(parents=True)
cat = Catalog(Workspace(root))
reg = adapters.registry()
times = {}
t0 = time.perf_counter()
rows = 0
for name in order:
    t = time.perf_counter()
    res = ingest.run(cat, name, real / reg[name].default_path)
    times[name] = round(time.perf_counter() - t, 3)
    rows += res.rows_read
total = time.perf_counter() - t0
print(json.dumps({"seconds": total, "per_format": times, "rows": rows, "peak_mb": peak_rss_mb()}))
"""

PANDAS = r"""
import json, sys, time
import pandas as pd
from bench._common import peak_rss_mb
files = json.loads(sys.argv[1])
t0 = time.perf_counter()
rows = 0
for f in files:
    rows += len(pd.read_csv(f, low_memory=False))
print(json.dumps({"seconds": time.perf_counter() - t0, "rows": rows, "peak_mb": peak_rss_mb()}))
"""


def plan() -> list[str]:
    """Adapters with a public file, linked ones after the dataset they label."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", action="store_true", help="append results to bench/RESULTS.md")
    ap.add_argument("--repeat", type=int, default=2, help="runs per side; the best is kept")
    a = ap.parse_args()
    real = real_data()
    order = plan()
    from pipelines import adapters

    reg = adapters.registry()
    files = sorted({str(real / reg[n].default_path) for n in order})
    # each side in its own fresh process, alternating, best of N
    med = min((run_child(MEDLAKE, str(real), json.dumps(order)) for _ in range(a.repeat)),
              key=lambda r: r["seconds"])
    pan = min((run_child(PANDAS, json.dumps(files)) for _ in range(a.repeat)),
              key=lambda r: r["seconds"])
    ratio = med["seconds"] / pan["seconds"]
    lines = [
        f"machine: {machine()}; {len(files)} files, {len(order)} formats, "
        f"{med['rows']:,} input rows (pandas read {pan['rows']:,})",
        "",
        "| | seconds | peak memory (MiB) |",
        "|---|---:|---:|",
        f"| medlake ingest (parse, normalise, write Parquet) | {med['seconds']:.2f} | {med['peak_mb']:.0f} |",
        f"| pandas.read_csv only (baseline) | {pan['seconds']:.2f} | {pan['peak_mb']:.0f} |",
        f"| ratio medlake / pandas | {ratio:.2f} | {med['peak_mb'] / pan['peak_mb']:.2f} |",
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
