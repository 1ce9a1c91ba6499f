"""Shared fixture for the image-stage tests: one small synthetic lake per test session.

Imported by test_fingerprint/test_embed/test_duplicates/test_outliers (``from images_helpers
import synth_lake``); session scope, so the images are generated, ingested, fingerprinted and
embedded (descriptor-v1) once.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from medlake.catalog import Catalog, Workspace

N_CAPTURES = 70


@pytest.fixture(scope="session", name="synth_lake")
def _synth_lake(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """A bare lake with both synthetic modalities ingested, fingerprinted and embedded."""
    from medlake.pipelines import embed, fingerprint, ingest
    from medlake.demo.synthetic import generate

    root = (tmp_path_factory.mktemp("imglake") / "ws").resolve()
    (root / ".dvc").mkdir(parents=True)
    generate(root / "syn", n_captures=N_CAPTURES, seed=0)
    cat = Catalog(Workspace(root))
    for m in ("derm", "cxr"):
        ingest.run(cat, "generic", root / "syn" / f"{m}.yaml")
    fingerprint.run(cat)
    embed.run(cat, workers=0)
    return cat


def truth_id(file: str) -> str:
    """``images/cxr/C00001.png`` -> ``synth-cxr:C00001`` (the catalog's image id)."""
    p = Path(file)
    return f"synth-{p.parent.name}:{p.stem}"


def truth(cat: Catalog) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(truth_files, truth_pairs) with catalog ids (``id``, ``id_a``/``id_b`` sorted)."""
    syn = cat.ws.root / "syn"
    files = pl.read_csv(syn / "truth_files.csv", infer_schema_length=0)
    files = files.with_columns(pl.col("file").map_elements(truth_id, return_dtype=pl.String).alias("id"))
    pairs = pl.read_csv(syn / "truth_pairs.csv", infer_schema_length=0)
    a = pairs["file_a"].map_elements(truth_id, return_dtype=pl.String)
    b = pairs["file_b"].map_elements(truth_id, return_dtype=pl.String)
    pairs = pairs.with_columns(pl.min_horizontal(a, b).alias("id_a"), pl.max_horizontal(a, b).alias("id_b"))
    return files, pairs
