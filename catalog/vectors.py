"""Image embeddings in LanceDB, one table per model, keyed by image id, sha256 and model.

This module does not import the catalog's storage modules (tables, SQL); the pipelines join
vectors with tables by ``image_id``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from catalog.errors import MissingTableError

INDEX_MIN_ROWS = 50_000  # below this, exact search is fast enough and exact
_SAFE = re.compile(r"[^A-Za-z0-9_]+")


def table_name(model: str) -> str:
    """LanceDB table of one model: ``emb_`` + the model name with other characters as ``_``."""
    return "emb_" + _SAFE.sub("_", model)


class VectorStore:
    """LanceDB tables under ``path`` (a workspace's ``lake/vectors``).

    Example
    -------
    >>> vs = VectorStore("lake/vectors")  # doctest: +SKIP
    >>> vs.add("descriptor-v1", ["d:1"], ["ab.."], np.ones((1, 128), "float32"))  # doctest: +SKIP
    """

    def __init__(self, path: Path | str) -> None:
        import lancedb

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.db = lancedb.connect(str(self.path))

    def has(self, model: str) -> bool:
        return table_name(model) in self.db.list_tables().tables

    def keys(self, model: str) -> set[tuple[str, str]]:
        """(image_id, sha256) pairs already stored for ``model``."""
        if not self.has(model):
            return set()
        at = self.db.open_table(table_name(model)).to_arrow().select(["image_id", "sha256"])
        return set(zip(at["image_id"].to_pylist(), at["sha256"].to_pylist(), strict=True))

    def add(self, model: str, image_ids: list[str], sha256: list[str], vectors: np.ndarray) -> None:
        """Append one batch (a LanceDB commit: a killed run keeps the batches already added)."""
        if len(image_ids) == 0:
            return
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        at = pa.table({
            "image_id": pa.array(image_ids, pa.string()), "sha256": pa.array(sha256, pa.string()),
            "model": pa.array([model] * len(image_ids), pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1]),
        })
        name = table_name(model)
        if self.has(model):
            self.db.open_table(name).add(at)
        else:
            self.db.create_table(name, data=at)

    def load(self, model: str, image_ids: list[str] | None = None) -> tuple[list[str], np.ndarray]:
        """Ids and an (n, dim) float32 matrix; the latest row wins when an id was re-embedded."""
        if not self.has(model):
            raise MissingTableError(f"vectors of {model}", "run 'medlake embed' first")
        at = self.db.open_table(table_name(model)).to_arrow()
        ids = at["image_id"].to_pylist()
        mat = np.asarray(at["vector"].combine_chunks().flatten().to_numpy(), dtype=np.float32)
        mat = mat.reshape(len(ids), -1)
        last = {i: k for k, i in enumerate(ids)}
        keep = sorted(last) if image_ids is None else [i for i in image_ids if i in last]
        return keep, mat[[last[i] for i in keep]] if keep else mat[:0]

    def search(self, model: str, vector: np.ndarray, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` nearest stored images by cosine similarity: [(image_id, similarity)]."""
        tbl = self.db.open_table(table_name(model))
        q = tbl.search(np.asarray(vector, dtype=np.float32)).distance_type("cosine").limit(k)
        if tbl.list_indices():
            q = q.refine_factor(10)  # IVF_PQ alone loses about half the true neighbours
        at = q.select(["image_id"]).to_arrow()
        return [(i, 1.0 - float(d)) for i, d in
                zip(at["image_id"].to_pylist(), at["_distance"].to_pylist(), strict=True)]

    def ensure_index(self, model: str, *, min_rows: int = INDEX_MIN_ROWS) -> bool:
        """Build an IVF_PQ cosine index once the table has ``min_rows`` rows; True if built."""
        tbl = self.db.open_table(table_name(model))
        n = tbl.count_rows()
        if n < min_rows or tbl.list_indices():
            return False
        dim = tbl.schema.field("vector").type.list_size
        sub = next(s for s in (16, 8, 4, 2, 1) if dim % s == 0)
        tbl.create_index(metric="cosine", num_partitions=max(1, int(np.sqrt(n))),
                         num_sub_vectors=sub)
        return True
