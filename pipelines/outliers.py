"""Stage ``outliers``: images least like their nearest neighbours, ranked.

For each image with a vector (``params.yaml: embed.model``, the weights-free descriptor by
default), the mean cosine similarity to its ``k`` nearest other images (``params.yaml:
outliers.k``, default 10), found by exact blocked matrix products over every dataset of the
workspace (memory O(block x N), never the full N x N matrix). ``score = 1 - mean_sim``;
``rank`` 1 is the most outlying image. Non-medical pictures in a medical set, wrong
modalities and broken renders rank near the top.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from dataclasses import dataclass

import click

from medlake.catalog import Catalog, CatalogError, to_json
from medlake.catalog.embedders import DESCRIPTOR
from medlake.catalog.params import defaults, param, to_dict
from medlake.catalog.storage import open_vectors
from medlake.pipelines.stage import Counts, Stage

STAGE = "outliers"


@dataclass(frozen=True)
class Params:
    """``params.yaml: outliers``."""

    k: int = param(10, "neighbours per image whose mean cosine similarity is the score", min=1)
    model: str | None = param(None, "vector model (null: embed.model)")
    block: int = param(4096, "rows per block of the exact neighbour search", min=1)


DEFAULTS: dict[str, Any] = defaults(Params)


BLOCK_ENTRIES = 1 << 24  # similarities per block (64 MiB of float32, twice with the partition)


def knn_mean(vecs: np.ndarray, *, k: int, block: int = 4096) -> np.ndarray:
    """Mean cosine similarity of each row to its ``k`` nearest other rows (exact, blocked).

    Parameters
    ----------
    vecs : numpy.ndarray
        (n, d) L2-normalised rows.
    k : int
        Neighbours per row (capped at n - 1).
    block : int
        Rows per matrix product (lowered to keep a block within :data:`BLOCK_ENTRIES`
        similarities).

    Returns
    -------
    numpy.ndarray
        (n,) float64 means.
    """
    n = len(vecs)
    if n < 2:
        raise CatalogError(f"outliers: need at least 2 images with vectors, found {n}")
    k = max(1, min(int(k), n - 1))
    out = np.empty(n, dtype=np.float64)
    block = max(1, min(block, BLOCK_ENTRIES // n))  # 100k x 4096 similarities: 1.6 GB a block
    for s in range(0, n, block):
        sims = vecs[s:s + block] @ vecs.T
        rows = np.arange(s, min(s + block, n))
        sims[rows - s, rows] = -np.inf  # not its own neighbour
        top = np.partition(sims, n - k, axis=1)[:, n - k:] if k < n else sims
        out[rows] = top.astype(np.float64).mean(axis=1)
    return out


def run(cat: Catalog, params: Params | dict[str, Any] | None = None, *, k: int | None = None,
        model: str | None = None, show: int = 0, echo: Any = None) -> Counts:
    """Score and rank every fingerprinted image with a vector; write the ``outliers`` table.

    Parameters
    ----------
    cat : Catalog
    k : int, optional
        Neighbours (default ``params.yaml: outliers.k``, else 10).
    model : str, optional
        Vector model (default ``outliers.model``, else ``embed.model``, else descriptor-v1).
    params : Params or dict, optional
        Replaces ``params.yaml: outliers``.
    show : int
        Lines of the top of the ranking in the summary.

    Returns
    -------
    Counts
        ``images`` (ranked), ``missing`` (fingerprinted but without a vector), ``k``,
        ``model``, ``top`` (the 20 highest-ranked rows as dicts).
    """
    p = to_dict(DECLARATION.load_params(cat, params, {"k": k, "model": model}))
    embed_model = (cat.ws.params().get("embed") or {}).get("model")
    name = p.get("model") or embed_model or DESCRIPTOR
    p["model"] = name
    fp = cat.read("fingerprints", columns=["image_id", "dataset_id"], required=True,
                  hint="run 'medlake fingerprint' and 'medlake embed' first").sort("image_id")
    if fp.height == 0:  # a metadata-only workspace: nothing to rank, an empty table
        from medlake.catalog import spec

        with cat.transaction() as tx:
            tx.write("outliers", spec("outliers").schema.empty_table(), stage=STAGE,
                     partition="all")
        return Counts(STAGE, {"images": 0, "missing": 0, "k": 0, "model": name, "top": []},
                      "outliers: no fingerprinted images (metadata only?); nothing to rank")
    vs = open_vectors(cat.ws)
    if not vs.has(name):
        raise CatalogError(f"outliers: no vectors of model '{name}' in {vs.path.name}; "
                           "run 'medlake embed' first")
    ids, vecs = vs.load(name, fp["image_id"].to_list())
    if len(ids) < 2:
        raise CatalogError(f"outliers: {len(ids)} fingerprinted images have a {name} vector; "
                           "run 'medlake embed' first")
    mean = knn_mean(vecs, k=int(p["k"]), block=int(p["block"]))
    kk = min(int(p["k"]), len(ids) - 1)
    df = (pl.DataFrame({"image_id": ids, "mean_sim": mean})
          .join(fp, on="image_id", how="left")
          .with_columns((1.0 - pl.col("mean_sim")).alias("score"))
          .sort(["score", "image_id"], descending=[True, False])
          .with_row_index("rank", offset=1)
          .with_columns(pl.col("rank").cast(pl.Int64), pl.lit(name).alias("model"),
                        pl.lit(kk, dtype=pl.Int64).alias("k"), pl.lit(to_json(p)).alias("params")))
    with cat.transaction() as tx:
        tx.write("outliers", df.sort("image_id"), stage=STAGE, partition="all")
    counts = {"images": len(df), "missing": len(fp) - len(ids), "k": kk, "model": name,
              "top": df.head(20).to_dicts()}
    lines = [f"outliers ({name}, k={kk}): {len(df):,} images ranked"]
    lines += [f"{r['rank']:>5}  {r['image_id']:30s}  mean_sim={r['mean_sim']:.3f}"
              for r in counts["top"][:show]]
    return Counts(STAGE, counts, "\n".join(lines))


DECLARATION = Stage(
    name=STAGE, params=Params, run=run,
    reads=("fingerprints", "embeddings"), writes=("outliers",),
    help="Rank images by mean cosine similarity to their k nearest neighbours (lowest first).",
    options=(click.option("--show", type=int, default=10, show_default=True,
                          help="Print the top N."),),
    dvc_args="--show 0", example="medlake outliers --k 20 --show 5",
    extra_params=("embed.model",),
)


if __name__ == "__main__":
    from medlake.cli.main import run_stage

    run_stage("outliers")
