"""Benchmark: the README's SQL examples on the demo workspace, end to end, against plain DuckDB.

Each ``$ .venv/bin/medlake sql "..."`` example of README.md runs as a user runs it (the CLI in
a fresh interpreter: start-up, the sandbox pinning the lake's files, the query, rendering),
beside the same query through a trusted DuckDB connection whose views scan the Parquet files
directly (:func:`catalog.sql.trusted_query`, no sandbox) in one warm process: the floor a
query engine over these files gives. Goal (issue 15): every example <= 2 s. Run after
``make demo``:

    .venv/bin/python bench/readme_queries.py [--repeat 3] [--record]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import REPO, machine, record

from medlake.catalog.sql import trusted_query
from test_readme_examples import EXAMPLES

GOAL_S = 2.0


def cli_seconds(query: str) -> float:
    t = time.perf_counter()
    subprocess.run([str(REPO / ".venv/bin/medlake"), "sql", query, "--workspace", str(REPO)],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - t


def duckdb_seconds(query: str) -> float:
    t = time.perf_counter()
    trusted_query(REPO / "lake" / "tables", query)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per query (the best counts)")
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    a = ap.parse_args()
    if not (REPO / "lake" / "tables" / "images").is_dir():
        sys.exit("the demo workspace's lake is absent: run 'make demo' first")
    load0 = os.getloadavg()
    rows = []
    for argv, _ in EXAMPLES:
        if argv[0] != "sql":
            continue
        q = argv[1]
        duckdb_seconds(q)  # warm the page cache for both sides
        med = min(cli_seconds(q) for _ in range(a.repeat))
        base = min(duckdb_seconds(q) for _ in range(a.repeat))
        first = " ".join(q.split())[:60]
        rows.append((first, med, base))
        print(f"{med:6.2f} s medlake sql (CLI)  {base:6.2f} s DuckDB on the files  "
              f"ratio {med / base:5.1f}  {first}", flush=True)
    worst = max(r[1] for r in rows)
    lines = [f"machine: {machine()}; load average at the start {load0[0]:.2f}, at the end "
             f"{os.getloadavg()[0]:.2f}; best of {a.repeat} runs per query",
             "", "| README query | medlake sql, CLI end to end (s) | DuckDB over the Parquet files, "
             "warm process (s) | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| `{q}` | {m:.2f} | {b:.2f} | {m / b:.1f} |" for q, m, b in rows]
    lines += ["", f"- goal: every README query <= {GOAL_S:.0f} s end to end: "
              f"{'met' if worst <= GOAL_S else 'NOT met'} (slowest {worst:.2f} s). The medlake "
              "side includes interpreter start-up, pinning every table's files for the "
              "sandbox and rendering the table."]
    print("\n".join(lines))
    if a.record:
        record("README queries on the demo workspace (bench/readme_queries.py, issue 15)",
               "\n".join(lines))


if __name__ == "__main__":
    main()
