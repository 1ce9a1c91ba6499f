"""Benchmark: stages killed (SIGKILL) at every commit step and at random moments.

For ingest, fingerprint, embed, duplicates, materialize and review compaction on a small
synthetic workspace (``tests/fault_harness.py``), each trial kills the stage in a child
process, then counts

* *raw half*: the killed run left a transaction partly renamed on disk (what a plain glob
  would read before any medlake process opens the lake; recovery finishes it);
* *reader half*: a separate reader process (medlake: ``Catalog.read``/``query``/``sql``)
  saw a half state: a transaction partly old and partly new, or a cross-table check failing
  (an annotation or split without its image, a root version's count differing from its
  split, a version folder differing from its ``versions``/``lineage`` rows, a verdict twice);
* *differences*: files under ``lake/tables`` and ``lake/versions`` whose sha256 differs from
  a clean run after the stage is run again (leftover temporary files included).

Baseline: the same kinds of trials (every step of its own clean run, the same number of
random kills) with the old publication emulated (``legacy_patch``: each file renamed on its
own, no intent file, no recovery of any kind).

    .venv/bin/python bench/faults.py [--captures 16] [--random 2] [--record] [--verbose]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import machine, record
from fault_harness import STAGES, Harness, Trial


def run_mode(work: Path, *, legacy: bool, captures: int, random_kills: int,
             echo: object) -> tuple[list[Trial], float]:
    t0 = time.monotonic()
    trials: list[Trial] = []
    with Harness(work, n_captures=captures, legacy=legacy, echo=echo) as h:
        h.prepare()
        for stage in STAGES:
            for args in h.plan(stage, every_step=True, random_kills=random_kills):
                trials.append(h.trial(stage, **args))
    return trials, time.monotonic() - t0


def table(rows: dict[str, list[Trial]]) -> str:
    head = ("| stage | publication | trials | killed | raw half (on disk, before recovery) "
            "| half states seen by a reader | trials with differences after rerun |\n"
            "|---|---|---:|---:|---:|---:|---:|\n")
    lines = []
    for mode, trials in rows.items():
        for stage in [*STAGES, "all"]:
            ts = [t for t in trials if stage in ("all", t.stage)]
            lines.append(
                f"| {'**all**' if stage == 'all' else stage} | {mode} | {len(ts)} | "
                f"{sum(t.killed for t in ts)} | {sum(bool(t.raw_half) for t in ts)} | "
                f"{sum(t.half_seen for t in ts)} | {sum(bool(t.diffs) for t in ts)} |")
    return head + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captures", type=int, default=16, help="synthetic captures (~1.6 images each)")
    ap.add_argument("--random", type=int, default=2, help="random kills per stage")
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    ap.add_argument("--verbose", action="store_true", help="print every trial")
    a = ap.parse_args()
    echo = print if a.verbose else (lambda m: None)
    rows: dict[str, list[Trial]] = {}
    secs: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mlk-faults") as tmp:
        for mode, legacy in (("intent + recovery (medlake)", False),
                             ("one rename per file (old, emulated)", True)):
            rows[mode], secs[mode] = run_mode(Path(tmp) / ("legacy" if legacy else "intent"),
                                              legacy=legacy, captures=a.captures,
                                              random_kills=a.random, echo=echo)
            print(f"{mode}: {len(rows[mode])} trials in {secs[mode]:.0f} s", flush=True)
    (mode_new, new), (mode_old, old) = rows.items()
    body = table(rows)
    examples = [next(t for t in old if t.stage == s and t.half_seen)
                for s in STAGES if any(t.stage == s and t.half_seen for t in old)]
    notes = "\n".join(f"  - {t.stage} `{t.fault}`: {'; '.join((t.problems + t.half)[:2])}"
                      for t in examples)
    leftovers = sum(1 for t in old if any(d.startswith("extra:") for d in t.diffs))
    text = (
        f"- machine: {machine()}, shared; `python bench/faults.py --captures {a.captures} "
        f"--random {a.random}`; {len(new)} + {len(old)} trials "
        f"({secs[mode_new]:.0f} s + {secs[mode_old]:.0f} s); every rename/deletion "
        "step of each stage's clean run (kill before step N, `MEDLAKE_FAULT=step:N`) plus "
        f"{a.random} random kills per stage (each step slowed by 0.05 s)\n\n{body}\n\n"
        f"- medlake: {sum(t.half_seen for t in new)} half states seen by readers in {len(new)} "
        f"trials, {sum(bool(t.diffs) for t in new)} reruns with differences; "
        f"{sum(bool(t.raw_half) for t in new)} kills left a commit half renamed on disk, all "
        "finished by the next process that opened the lake\n"
        f"- old publication: {sum(t.half_seen for t in old)} half states seen by readers in "
        f"{len(old)} trials; {leftovers} reruns left the killed run's temporary files behind; "
        f"examples:\n{notes}\n")
    print(text)
    if a.record:
        record("crash safety: stages killed mid-commit (bench/faults.py, issue 13)", text)


if __name__ == "__main__":
    main()
