"""The ``duplicates`` stage on Ray: exact near-pair search and verification as Ray tasks.

The vectors go to the object store once; each task runs
:func:`catalog.vectors.near_pairs` for one slice of query rows against all rows (the same
code as the local engine, so the union of the slices is the local result), and each
verification task runs :func:`pipelines.duplicates.verify_pairs` on a contiguous chunk of
candidate pairs (features cached within the chunk). Image files must be readable at the same
path on every node (a shared file system).

Use through ``medlake duplicates --engine ray [--address HOST:PORT]`` or
``pipelines.duplicates.run(cat, engine="ray", address=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from medlake.pipelines.ray_engine import cluster_cpus, connect, slices

TASKS_PER_CPU = 2  # a few tasks per CPU keep every node busy without much per-task overhead


def engine(address: str | None = None) -> tuple[Callable[..., np.ndarray], Callable[..., list]]:
    """(knn, verifier) running on the Ray cluster at ``address``, for ``duplicates.run``."""
    ray = connect(address)

    def knn(vecs: np.ndarray, *, k: int, threshold: float, block: int = 4096) -> np.ndarray:
        return knn_pairs(ray, vecs, k=k, threshold=threshold, block=block)

    def verifier(jobs: list[tuple[str, str, int, int]], p: dict[str, Any]) -> list[dict]:
        return verify_pairs(ray, jobs, p)

    return knn, verifier


def knn_pairs(ray: Any, vecs: np.ndarray, *, k: int, threshold: float,
              block: int = 4096) -> np.ndarray:
    """:func:`pipelines.duplicates.knn_pairs` with one Ray task per slice of query rows."""
    n = len(vecs)
    if n < 2:
        return np.zeros((0, 3))
    task = ray.remote(num_cpus=1)(_near_pairs_slice)
    ref = ray.put(np.ascontiguousarray(vecs, dtype=np.float32))
    parts = ray.get([task.remote(ref, threshold, k, block, r)
                     for r in slices(n, cluster_cpus(ray) * TASKS_PER_CPU, min_size=256)])
    res = np.concatenate(parts) if parts else np.zeros((0, 3))
    _, first = np.unique(res[:, :2], axis=0, return_index=True)
    return res[first]


def _near_pairs_slice(vecs: np.ndarray, threshold: float, k: int, block: int,
                      rows: tuple[int, int]) -> np.ndarray:
    from medlake.catalog.vectors import near_pairs

    return near_pairs(vecs, threshold=threshold, k=k, block=block, rows=rows)


def verify_pairs(ray: Any, jobs: list[tuple[str, str, int, int]],
                 p: dict[str, Any]) -> list[dict[str, Any]]:
    """:func:`pipelines.duplicates.verify_pairs` over contiguous chunks, one Ray task each."""
    if not jobs:
        return []
    task = ray.remote(num_cpus=1)(_verify_chunk)
    parts = ray.get([task.remote(jobs[s:e], p)
                     for s, e in slices(len(jobs), cluster_cpus(ray) * TASKS_PER_CPU,
                                        min_size=16)])
    return [r for part in parts for r in part]


def _verify_chunk(jobs: list[tuple[str, str, int, int]], p: dict[str, Any]) -> list[dict]:
    from medlake.pipelines.duplicates import verify_pairs as local

    return local(jobs, p)
