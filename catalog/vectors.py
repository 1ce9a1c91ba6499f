"""Image embeddings in LanceDB, one table per model, keyed by image id, sha256 and model.

This module does not import the catalog's storage modules (tables, SQL); the pipelines join
vectors with tables by ``image_id``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medlake.catalog.errors import MissingTableError

INDEX_MIN_ROWS = 50_000  # below this, exact search is fast enough and exact
_SAFE = re.compile(r"[^A-Za-z0-9_]+")


def table_name(model: str) -> str:
    """LanceDB table of one model: ``emb_`` + the model name with other characters as ``_``."""
    return "emb_" + _SAFE.sub("_", model)


def vector_table(model: str, image_ids: list[str], sha256: list[str], vectors: np.ndarray) -> pa.Table:
    """The LanceDB table layout (image_id, sha256, model, vector as fixed_size_list<float32>)."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.table({
        "image_id": pa.array(image_ids, pa.string()), "sha256": pa.array(sha256, pa.string()),
        "model": pa.array([model] * len(image_ids), pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1]),
    })


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
        at = vector_table(model, image_ids, sha256, vectors)
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
        at = self.search_many(model, np.asarray(vector, dtype=np.float32)[None, :], k)
        return list(zip(at["image_id"].to_pylist(), at["similarity"].to_pylist(), strict=True))

    def search_many(self, model: str, vectors: np.ndarray, k: int = 10, *,
                    refine_factor: int | None = 10, nprobes: int | None = None) -> pa.Table:
        """The ``k`` nearest stored images of each query row, in one batched LanceDB query.

        Parameters
        ----------
        vectors : numpy.ndarray
            (q, dim) queries.
        refine_factor : int, optional
            With an IVF_PQ index, re-rank ``k * refine_factor`` PQ candidates by their exact
            distance (without it IVF_PQ loses about half the true neighbours); None: PQ only.
        nprobes : int, optional
            IVF partitions searched per query (LanceDB's default when None).

        Returns
        -------
        pyarrow.Table
            query (row of ``vectors``), image_id, similarity (1 - cosine distance).
        """
        tbl = self.db.open_table(table_name(model))
        q = tbl.search(np.asarray(vectors, dtype=np.float32)).distance_type("cosine").limit(k)
        if tbl.list_indices():
            if refine_factor:
                q = q.refine_factor(refine_factor)
            if nprobes:
                q = q.nprobes(nprobes)
        at = q.select(["image_id"]).to_arrow()
        query = at["query_index"] if "query_index" in at.column_names else pa.array([0] * at.num_rows)
        sim = pc.subtract(1.0, at["_distance"].cast(pa.float64()))
        return pa.table({"query": query, "image_id": at["image_id"], "similarity": sim})

    def ensure_index(self, model: str, *, min_rows: int = INDEX_MIN_ROWS) -> bool:
        """Build an IVF_PQ cosine index once the table has ``min_rows`` rows; True if built."""
        from lancedb.index import IvfPq

        tbl = self.db.open_table(table_name(model))
        n = tbl.count_rows()
        if n < min_rows or tbl.list_indices():
            return False
        dim = tbl.schema.field("vector").type.list_size
        sub = next(s for s in (16, 8, 4, 2, 1) if dim % s == 0)
        tbl.create_index("vector", config=IvfPq(distance_type="cosine", num_sub_vectors=sub,
                                                num_partitions=max(1, int(np.sqrt(n)))))
        return True


# Exact search for near pairs. The block products are screened in bfloat16 where the hardware
# has it (about twice as fast as float32 on CPUs with AVX512-BF16/AMX, tensor cores on GPUs),
# with a margin wider than bfloat16's worst-case error, then every candidate is re-scored in
# float32: the result is the exact float32 answer, never the full N x N matrix.
_BF16_MARGIN = 0.02  # > 2u|a||b| (inputs) + u (output) + u (threshold cast), u = 2**-8, unit rows
_F32_MARGIN = 1e-4


def _device(device: str | None) -> Any:
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _low_precision(dev: Any) -> bool:
    """bfloat16 screening only where it is native (emulated bfloat16 is slower than float32)."""
    import torch

    if dev.type == "cuda":
        return True
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


CPU_BLOCK_ENTRIES = 1 << 25  # similarities per block on the CPU (128 MiB of float32)


def near_pairs(vecs: np.ndarray, *, threshold: float, k: int | None = None, block: int = 4096,
               device: str | None = None, rows: tuple[int, int] | None = None) -> np.ndarray:
    """Pairs of rows with cosine (dot product) >= ``threshold``, exact, in blocks.

    Parameters
    ----------
    vecs : numpy.ndarray
        (n, d) float vectors, normally of unit length.
    threshold : float
        Lowest dot product kept.
    k : int, optional
        Keep, per row, only its ``k`` highest partners above the threshold (a pair stays when
        either row keeps it; ties broken by the lower index); None keeps all pairs.
    block : int
        Rows per matrix product: memory O(block x n), never the full n x n matrix. On the
        CPU it is lowered to keep a block's similarities within :data:`CPU_BLOCK_ENTRIES`
        values (the result does not depend on the block).
    device : str, optional
        torch device; default CUDA when present, else the CPU.
    rows : (int, int), optional
        Search only from rows ``start <= i < stop`` (against all rows): one task's share of a
        distributed search (``pipelines.ray_duplicates``). The union of the results over
        slices that cover every row equals the result without ``rows``.

    Returns
    -------
    numpy.ndarray
        (m, 3) float64 rows (i, j, dot) with i < j, sorted by (i, j); dot is float32-exact.
    """
    import torch

    v = np.ascontiguousarray(vecs, dtype=np.float32)
    n = len(v)
    k = None if k is None else min(k, n - 1)
    if n < 2 or (k is not None and k <= 0):
        return np.zeros((0, 3))
    dev = _device(device)
    low = _low_precision(dev)
    big = float(np.max(np.einsum("ij,ij->i", v, v)))  # max |row|^2 scales the error bound
    margin = (_BF16_MARGIN if low else _F32_MARGIN) * max(big, 1.0)
    if dev.type == "cpu":  # 100k rows x 4096 would be 1.6 GB of similarities per block
        block = max(1, min(block, CPU_BLOCK_ENTRIES // n))
    full = torch.from_numpy(v).to(dev)
    screen = full.to(torch.bfloat16) if low else full
    parts = []
    r0, r1 = rows or (0, n)
    with torch.inference_mode():
        for s in range(r0, r1, block):
            sims = screen[s:min(s + block, r1)] @ screen.T
            r = torch.arange(len(sims), device=dev)
            sims[r, r + s] = -torch.inf
            hit = sims >= threshold - margin
            dense = None
            # rows with more than k hits get their exact top k; found from the sparse hits
            # (count_nonzero is ~20x cheaper than a per-row sum) unless hits are many
            if k is not None and int(torch.count_nonzero(hit)) > 64 * k * len(sims):
                dense = torch.nonzero(hit.sum(1) > k).ravel()
                hit[dense] = False
            i, j = torch.nonzero(hit, as_tuple=True)
            if k is not None:
                if dense is None:
                    cnt = torch.bincount(i, minlength=len(sims))
                    dense = torch.nonzero(cnt > k).ravel()
                    keep = cnt[i] <= k
                    i, j = i[keep], j[keep]
                if len(dense):
                    ti, tj = _exact_top(full, s, dense, k)
                    i, j = torch.cat([i, ti]), torch.cat([j, tj])
            parts.append(_rescore(v, i.cpu().numpy() + s, j.cpu().numpy(), threshold))
    res = np.concatenate(parts) if parts else np.zeros((0, 3))
    if k is not None:
        order = np.lexsort((res[:, 1], -res[:, 2], res[:, 0]))
        res = res[order]
        start = np.searchsorted(res[:, 0], res[:, 0], side="left")
        res = res[np.arange(len(res)) - start < k]
    a, b = np.minimum(res[:, 0], res[:, 1]), np.maximum(res[:, 0], res[:, 1])
    res = np.stack([a, b, res[:, 2]], axis=1)
    _, first = np.unique(res[:, :2], axis=0, return_index=True)
    return res[first]


def _exact_top(full: Any, s: int, dense: Any, k: int) -> tuple[Any, Any]:
    """Exact float32 top ``k`` of block rows ``dense`` (block-relative): (rows, cols)."""
    import torch

    sims = full[dense + s] @ full.T
    sims[torch.arange(len(dense), device=sims.device), dense + s] = -torch.inf
    top = torch.topk(sims, k, dim=1).indices
    return dense.repeat_interleave(k), top.ravel()


def _rescore(v: np.ndarray, i: np.ndarray, j: np.ndarray, threshold: float,
             chunk: int = 1 << 16) -> np.ndarray:
    """(i, j, float32 dot) of candidate pairs whose exact dot is >= ``threshold``."""
    out = []
    for s in range(0, len(i), chunk):
        a, b = i[s:s + chunk], j[s:s + chunk]
        dot = np.einsum("ij,ij->i", v[a], v[b])
        keep = dot >= threshold
        out.append(np.stack([a[keep], b[keep], dot[keep]], axis=1).astype(np.float64))
    return np.concatenate(out) if out else np.zeros((0, 3))
