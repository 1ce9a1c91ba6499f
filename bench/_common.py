"""Shared by the benchmarks: where the real data is, peak memory, RESULTS.md."""

from __future__ import annotations

import datetime as dt
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"


def real_data() -> Path:
    p = Path(os.environ.get("MEDLAKE_REAL_DATA") or REPO.parent / "shared" / "data")
    if not p.is_dir():
        sys.exit(f"real data not found at {p} (set MEDLAKE_REAL_DATA)")
    return p.resolve()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_child(code: str, *args: str, timeout: float | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (so peak memory is its own); it prints one JSON.

    Raises ``subprocess.TimeoutExpired`` (the child killed) when it runs over ``timeout`` s.
    """
    out = subprocess.run(
        [sys.executable, "-c", code, *args], check=False, capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def record(section: str, body: str) -> None:
    """Append a dated section to bench/RESULTS.md."""
    stamp = dt.date.today().isoformat()
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nNewest last. Machine: see each entry.\n"
    text = text.rstrip("\n") + f"\n\n## {section} — {stamp}\n\n{body.strip()}\n"
    RESULTS.write_text(text)


def machine() -> str:
    return f"{os.cpu_count()} cores, Python {sys.version.split()[0]}"
