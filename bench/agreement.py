"""Benchmark: the whole agreement table versus a pandas + scikit-learn loop, in one run.

Ingests NIH ChestX-ray14 with its linked sources (Google experts, bounding boxes), PadChest
with the two tube sources, and VinDr-CXR into a temporary lake, then times (a) medlake's
``agreement`` stage for those three datasets (reading the tables, every pair, annotator pair,
subgroup, Fleiss/alpha and writing Parquet) and (b) a straightforward loop: for every source
pair (and annotator pair), finding and subgroup, a pandas merge and
``sklearn.metrics.cohen_kappa_score`` — the kappas only. It prints both times, the ratio and
whether both give the same kappas; ``--record`` appends them to bench/RESULTS.md.

    .venv/bin/python bench/agreement.py [--repeat 5] [--record]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
from sklearn.metrics import cohen_kappa_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import machine, real_data, record
from medlake.catalog import Catalog, Workspace
from medlake.pipelines import agreement, ingest

FILES = [("nih-cxr14", "cxr/Data_Entry_2017_v2020.csv.gz"),
         ("nih-bbox", "cxr/BBox_List_2017.csv.gz"),
         ("google2019", "cxr/google2019_nih-chest-xray-labels.csv.gz"),
         ("padchest", "cxr/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"),
         ("tubes-raw", "purrlab_tubes/Annotations_raw.csv"),
         ("tubes-aggregated", "purrlab_tubes/Annotations_aggregated.csv"),
         ("vindr-cxr", "cxr/vinbigdata-train.csv.gz")]
DATASETS = ["nih-cxr14", "padchest", "vindr-cxr"]
SUBGROUPS = ["view", "sex"]


def baseline(cat: Catalog) -> pd.DataFrame:
    """Kappa per (rater pair, finding, subgroup) with pandas merges and scikit-learn."""
    src = cat.read("sources").to_pandas().set_index("source_id")
    fnd = cat.read("findings").to_pandas()
    shared = {(r.source_id, r.finding): r.shared_finding for r in fnd.itertuples()}
    out = []
    for ds in DATASETS:
        ann = cat.read("annotations", where=f"source_id LIKE '{ds}:%'").to_pandas()
        ann["shared"] = [shared[k] for k in zip(ann.source_id, ann.finding)]
        vt = ann.source_id.map(src.value_type)
        ann["code"] = np.where(vt == "graded",
                               np.where(ann.value == 0.5, np.nan, (ann.value > 0.5) * 1.0),
                               ann.value)
        ann.loc[ann.value.isna(), "code"] = np.nan
        cov = cat.read("coverage", where=f"source_id LIKE '{ds}:%'").to_pandas()
        img = cat.read("images", where=f"dataset_id = '{ds}'").to_pandas().set_index("image_id")
        ids = sorted(ann.source_id.unique())
        for a, b in itertools.combinations_with_replacement(ids, 2):
            if "none" in (src.negatives[a], src.negatives[b]):
                continue  # positive-only: no kappa
            common = sorted(set(ann.shared[ann.source_id == a]) & set(ann.shared[ann.source_id == b]))
            if src.negatives[a] == "implicit":
                common = sorted(set(fnd.shared_finding[fnd.source_id == a]) & set(
                    ann.shared[ann.source_id == b]) | set(common))
            for f in common:
                la, lb = (_side(ann, cov, src, s, f) for s in (a, b))
                for (aa, xa), (ab, xb) in itertools.product(la.groupby("annotator"), lb.groupby("annotator")):
                    if a == b and aa >= ab:
                        continue
                    m = xa.merge(xb, on="image_id").dropna(subset=["code_x", "code_y"])
                    if m.empty:
                        continue
                    m = m.join(img[SUBGROUPS], on="image_id")
                    parts = [("", "", m)] + [(c, v, g) for c in SUBGROUPS for v, g in m.groupby(c)]
                    for c, v, g in parts:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            k = cohen_kappa_score(g.code_x, g.code_y)
                        out.append((a, aa, b, ab, f, c, v, len(g), k))
    return pd.DataFrame(out, columns=["source_a", "annotator_a", "source_b", "annotator_b",
                                      "finding", "subgroup", "subgroup_value", "n", "kappa"])


def _side(ann, cov, src, s, f):
    rows = ann[(ann.source_id == s) & (ann.shared == f)][["image_id", "annotator", "code"]]
    if src.negatives[s] != "implicit":
        return rows
    dense = cov[cov.source_id == s][["image_id"]].merge(rows, on="image_id", how="left")
    return dense.fillna({"annotator": "", "code": 0.0})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    ap.add_argument("--repeat", type=int, default=5, help="medlake runs (best and median shown)")
    args = ap.parse_args()
    data = real_data()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ws"
        (root / ".dvc").mkdir(parents=True)
        cat = Catalog(Workspace(root.resolve()))
        for fmt, path in FILES:
            ingest.run(cat, fmt, data / path)
        (root / "params.yaml").write_text(
            "agreement:\n  subgroups: [view, sex]\n  references:\n"
            "    - {test: 'nih-cxr14:report_nlp', reference: 'nih-cxr14:google2019_expert'}\n")
        agreement.run(cat, "nih-cxr14")  # warm-up (imports, first Parquet scan)
        runs, cpu = [], []
        for _ in range(args.repeat):  # the machine is shared: best and median of several
            t, c = time.perf_counter(), time.process_time()
            agreement.run(cat, datasets=DATASETS)
            runs.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        ours, med = min(runs), float(np.median(runs))
        t = time.perf_counter()
        base = baseline(cat)
        theirs = time.perf_counter() - t
        agr = cat.read("agreement").filter(pl.col("kind").is_in(["pair", "annotators"])).to_pandas()
        fwd = agr.merge(base, on=["source_a", "annotator_a", "source_b", "annotator_b", "finding",
                                  "subgroup", "subgroup_value"], suffixes=("", "_base"))
        swapped = base.rename(columns={"source_a": "source_b", "source_b": "source_a",
                                       "annotator_a": "annotator_b", "annotator_b": "annotator_a"})
        rev = agr.merge(swapped, on=["source_a", "annotator_a", "source_b", "annotator_b",
                                     "finding", "subgroup", "subgroup_value"], suffixes=("", "_base"))
        both = pd.concat([fwd, rev]).drop_duplicates(
            subset=["source_a", "annotator_a", "source_b", "annotator_b", "finding", "subgroup",
                    "subgroup_value"])
        defined = both.kappa.notna() & both.kappa_base.notna() & np.isfinite(both.kappa_base)
        diff = float((both.kappa[defined] - both.kappa_base[defined]).abs().max())
        same_n = bool((both.n_shared == both.n).all())
        undefined_agree = bool((both.kappa.isna() == ~np.isfinite(both.kappa_base.fillna(np.nan))).all())
    lines = [
        f"machine: {machine()}",
        ("medlake agreement (nih-cxr14 + linked, padchest + tubes, vindr-cxr; read, compute, "
         f"write): best {ours:.2f} s, median {med:.2f} s of {len(runs)} runs "
         f"(CPU time, all threads: best {min(cpu):.2f} s)"),
        f"pandas + scikit-learn loop (kappas only, {len(base):,} groups): {theirs:.2f} s",
        f"ratio: {theirs / ours:.1f}x faster (best), {theirs / med:.1f}x (median)",
        f"load average at the end: {os.getloadavg()[0]:.1f} (shared machine)",
        (f"same kappas: {int(defined.sum()):,} compared, max |difference| {diff:.2e}; "
         f"n shared equal: {same_n}; undefined in the same places: {undefined_agree}; "
         f"groups matched: {len(both):,} of {len(base):,}"),
    ]
    print("\n".join(lines))
    if args.record:
        record("agreement (bench/agreement.py)", "\n".join(f"- {x}" for x in lines))


if __name__ == "__main__":
    main()
