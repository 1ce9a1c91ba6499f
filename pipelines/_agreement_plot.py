"""Plots of the agreement table: kappa heatmaps per finding and a PPV forest plot (Agg)."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl


def _rater(source: str, annotator: str) -> str:
    return source.split(":", 1)[-1] + (f"/{annotator}" if annotator else "")


def plot_agreement(df: pl.DataFrame, out: Path, *, max_findings: int = 6) -> Path:
    """Write a PNG: one kappa heatmap per finding (raters x raters, n shared in each cell)
    and a forest plot of PPV (or, for positive-only sources, confirmed share) with Wilson
    95% intervals. Returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = df.filter((pl.col("subgroup") == "") & pl.col("kind").is_in(["pair", "annotators"]))
    # one heatmap per (dataset, finding): raters of different datasets never share an image
    counts = base.group_by("dataset_id", "finding").agg(pl.len().alias("n"), pl.col("n_shared").sum())
    top = (counts.sort(["n", "n_shared", "dataset_id", "finding"], descending=[True, True, False, False])
           .with_columns(pl.int_range(pl.len()).over("dataset_id").alias("rank"))  # each dataset first
           .sort(["rank", "n", "n_shared", "dataset_id", "finding"],
                 descending=[False, True, True, False, False]).head(max_findings))
    findings = list(top.select("dataset_id", "finding").iter_rows())
    forest = df.filter(pl.col("subgroup") == "").with_columns(
        pl.coalesce("ppv", "pos_confirmed").alias("p"),
        pl.coalesce("ppv_lo", "pos_confirmed_lo").alias("lo"),
        pl.coalesce("ppv_hi", "pos_confirmed_hi").alias("hi"),
    ).filter(pl.col("p").is_not_null()).head(30)
    ncol = max(1, min(3, len(findings)))
    nrow = (len(findings) + ncol - 1) // ncol + 1
    fig = plt.figure(figsize=(6 * ncol, 5 * nrow))
    for i, (ds, f) in enumerate(findings):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        sub = base.filter((pl.col("finding") == f) & (pl.col("dataset_id") == ds))
        names = sorted({_rater(s, a) for s, a in zip(sub["source_a"], sub["annotator_a"])}
                       | {_rater(s, a) for s, a in zip(sub["source_b"], sub["annotator_b"])})[:12]
        idx = {n: j for j, n in enumerate(names)}
        grid = [[float("nan")] * len(names) for _ in names]
        for r in sub.iter_rows(named=True):
            a, b = _rater(r["source_a"], r["annotator_a"]), _rater(r["source_b"], r["annotator_b"])
            if a in idx and b in idx:
                k = r["kappa"] if r["kappa"] is not None else float("nan")
                grid[idx[a]][idx[b]] = grid[idx[b]][idx[a]] = k
                for x, y in ((idx[a], idx[b]), (idx[b], idx[a])):
                    ax.text(y, x, f"{k:.2f}\nn={r['n_shared']}" if not math.isnan(k) else f"–\nn={r['n_shared']}",
                            ha="center", va="center", fontsize=7)
        im = ax.imshow(grid, vmin=-1, vmax=1, cmap="RdYlGn")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(f"kappa: {f} ({ds})", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.7)
    ax = fig.add_subplot(nrow, 1, nrow)
    if forest.height:
        labels = [f"{r['finding']}: {_rater(r['source_a'], r['annotator_a'])} vs "
                  f"{_rater(r['source_b'], r['annotator_b'])}" for r in forest.iter_rows(named=True)]
        y = list(range(forest.height))
        p, lo, hi = forest["p"].to_list(), forest["lo"].to_list(), forest["hi"].to_list()
        ax.errorbar(p, y, xerr=[[max(a - b, 0) for a, b in zip(p, lo)], [max(b - a, 0) for a, b in zip(p, hi)]],
                    fmt="o", capsize=3)
        ax.set_yticks(y, labels, fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_xlabel("PPV against the reference (or share of positives confirmed), Wilson 95% CI")
    else:
        ax.text(0.5, 0.5, "no PPV: set a reference pair in params.yaml agreement.references",
                ha="center", va="center")
        ax.set_axis_off()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
