"""Connecting to a Ray cluster for the ``--engine ray`` stages (``embed``, ``duplicates``).

Only the Ray engine modules import this; the local engine never imports Ray. Ray and its
helpers come with the optional extra ``pip install 'medlake[scale]'``.
"""

from __future__ import annotations

import os
from typing import Any

from medlake.catalog import CatalogError


class RayEngineError(CatalogError):
    """Ray is missing, or the cluster cannot be reached."""


def connect(address: str | None = None) -> Any:
    """``ray`` connected to the cluster at ``address`` (``HOST:PORT``).

    Without ``address``: ``RAY_ADDRESS`` when set, else a Ray instance on this machine.
    Connecting twice is harmless (the open connection is kept).

    Raises
    ------
    RayEngineError
        When Ray is not installed or the cluster does not answer.
    """
    try:
        import ray
    except ImportError as e:
        raise RayEngineError("the Ray engine needs the 'scale' extra: pip install "
                             "'medlake[scale]' (ray[data], lance-ray, dvc[s3])") from e
    if ray.is_initialized():
        return ray
    addr = address or os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(address=addr, log_to_driver=False, logging_level="ERROR",
                 configure_logging=True, include_dashboard=False if addr is None else None)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayEngineError(f"cannot reach the Ray cluster at {addr or 'a new local instance'} "
                             f"({e}); start it with 'ray start --head' and pass --address "
                             "HOST:PORT") from e
    return ray


def cluster_cpus(ray: Any) -> int:
    """CPUs of the whole cluster (at least 1): how many tasks or actors run at once."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_gpus(ray: Any) -> int:
    """GPUs of the whole cluster (0 on a CPU cluster)."""
    return int(ray.cluster_resources().get("GPU", 0))


def slices(n: int, parts: int, *, min_size: int = 1) -> list[tuple[int, int]]:
    """``parts`` contiguous (start, stop) ranges covering ``range(n)``, each >= ``min_size``."""
    parts = max(1, min(parts, -(-n // max(min_size, 1)))) if n else 1
    step = -(-n // parts) if n else 0
    return [(s, min(s + step, n)) for s in range(0, n, step)] if n else []
