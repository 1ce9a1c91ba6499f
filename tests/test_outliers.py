"""Stage outliers: synthetic non-medical images rank at the top; scores vs a direct computation; CLI."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from images_helpers import _synth_lake, truth  # noqa: F401  (session fixture synth_lake)
from sklearn.neighbors import NearestNeighbors

from medlake.catalog import CatalogError
from medlake.catalog.vectors import VectorStore
from medlake.cli.main import main
from medlake.pipelines import outliers


def test_outliers_rank_on_top(synth_lake):
    cat = synth_lake
    res = outliers.run(cat, k=10)
    files, _ = truth(cat)
    planted = set(files.filter(pl.col("role") == "outlier")["id"])
    out = cat.read("outliers").sort("rank")
    assert res["images"] == len(out) == len(cat.read("fingerprints"))
    assert out["rank"].to_list() == list(range(1, len(out) + 1))
    top = set(out.head(len(planted) + 2)["image_id"])
    assert len(planted & top) >= len(planted) - 1, (planted - top)
    assert (out["k"] == 10).all() and (out["model"] == "descriptor-v1").all()


def test_scores_match_sklearn(synth_lake):
    cat = synth_lake
    outliers.run(cat, k=5)
    out = cat.read("outliers").sort("image_id")
    _ids, vecs = VectorStore(cat.ws.vectors_dir).load("descriptor-v1", out["image_id"].to_list())
    nn = NearestNeighbors(n_neighbors=6, metric="cosine").fit(vecs)
    dist, _ = nn.kneighbors(vecs)
    ref = (1 - dist[:, 1:]).mean(axis=1)  # column 0 is the point itself
    np.testing.assert_allclose(out["mean_sim"].to_numpy(), ref, atol=1e-4)
    np.testing.assert_allclose(out["score"].to_numpy(), 1 - ref, atol=1e-4)
    blocked = outliers.knn_mean(vecs, k=5, block=7)
    np.testing.assert_allclose(blocked, out["mean_sim"].to_numpy(), atol=1e-6)


def test_bad_k_and_cli(synth_lake):
    with pytest.raises(CatalogError, match=r"outliers\.k: found 0 .*>= 1"):
        outliers.run(synth_lake, k=0)
    r = CliRunner().invoke(main, ["outliers", "-w", str(synth_lake.ws.root), "--k", "3", "--show", "2"])
    assert r.exit_code == 0, r.output
    assert "k=3" in r.output and r.output.count("mean_sim=") == 2
