"""The ``embed`` stage on Ray Data: one model per actor, vectors written through lance-ray.

The images still to embed (the same :func:`pipelines.embed.todo` as the local engine: an
(image_id, sha256) already stored for the model is skipped) become a Ray Dataset; a
class-based ``map_batches`` step holds one embedder per actor (one GPU per actor when the
cluster has GPUs, else one CPU) and returns an Arrow table whose ``vector`` column is a
``fixed_size_list<float32>`` (not Ray's tensor extension type, which LanceDB cannot search).
``lance_ray.write_lance(..., stream=True)`` appends to the workspace's LanceDB table (local
or ``s3://``, see :mod:`catalog.storage`) and commits every ``commit_rows`` rows, so a run
killed half way keeps its finished commits and the next run does the rest.

Image files must be readable at the same path on every node (a shared file system).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from medlake.catalog import Catalog
from medlake.catalog.embedders import make_embedder
from medlake.catalog.storage import open_vectors, storage_options, table_uri
from medlake.catalog.vectors import vector_table
from medlake.pipelines import embed as local
from medlake.pipelines.ray_engine import cluster_cpus, cluster_gpus, connect


class EmbedActor:
    """Ray Data map step: holds one embedder; Arrow batches of files in, vectors out."""

    def __init__(self, model: str, pretrained: str | None) -> None:
        self.emb = make_embedder(model, pretrained)
        self.prep = local.preparer(self.emb)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids, shas = batch["image_id"].to_pylist(), batch["sha256"].to_pylist()
        images = local._Images(batch["file"].to_pylist(), self.prep)
        idx, stacked = local._collate([images[i] for i in range(len(images))])
        if not idx:  # every file of the batch unreadable
            return vector_table(self.emb.name, [], [], np.zeros((0, 1), np.float32))
        vec = local.model_vectors(self.emb, stacked)
        return vector_table(self.emb.name, [ids[i] for i in idx], [shas[i] for i in idx], vec)


def blocks(table: pa.Table, batch_size: int, actors: int, *, per_actor: int = 4) -> list[pa.Table]:
    """``table`` cut into Ray Data input blocks of whole batches, about ``per_actor`` per actor.

    One block is processed by one actor, so a single block (``from_arrow`` of one table)
    would leave every actor but one idle.

    Parameters
    ----------
    table : pyarrow.Table
        The rows to embed.
    batch_size : int
        Rows per model batch; every block but the last holds a whole number of batches.
    actors : int
        Model replicas the blocks are spread over.
    per_actor : int
        Blocks per actor (more smooths out slow images; each block costs one task).

    Returns
    -------
    list of pyarrow.Table
        Zero-copy slices covering ``table`` in order (``[table]`` when it is empty).
    """
    n = table.num_rows
    rows = batch_size * max(1, -(-n // (batch_size * max(actors, 1) * per_actor)))
    return [table.slice(s, rows) for s in range(0, n, rows)] or [table]


def run(cat: Catalog, params: Any = None, *, address: str | None = None, model: str | None = None,
        pretrained: str | None = None, batch_size: int | None = None, limit: int | None = None,
        actors: int | None = None, commit_rows: int = 1024, echo: Any = None) -> dict[str, Any]:
    """Embed every fingerprinted image not embedded yet, on the Ray cluster at ``address``.

    Parameters
    ----------
    address : str, optional
        ``HOST:PORT`` of the Ray head (default ``RAY_ADDRESS``, else a local Ray instance).
    model, pretrained, batch_size, limit
        As :func:`pipelines.embed.run` (``params.yaml: embed``).
    actors : int, optional
        Model replicas (default: one per GPU of the cluster, else one per CPU).
    commit_rows : int
        Rows per LanceDB commit (the unit a killed run keeps).

    Returns
    -------
    dict
        As :func:`pipelines.embed.run`, plus ``engine`` = ``'ray'`` and ``actors``.
    """
    from medlake.catalog.params import to_dict

    p = to_dict(local.DECLARATION.load_params(cat, params, {
        "model": model, "pretrained": pretrained, "batch_size": batch_size}))
    name = make_embedder(p["model"], p["pretrained"]).name  # fails early on missing weights
    if p["pretrained"]:  # actors run in other folders: a path relative to here must be absolute
        p["pretrained"] = str(Path(p["pretrained"]).resolve())
    vs = open_vectors(cat.ws)
    total = len(cat.read("fingerprints", columns=["image_id"]))
    df = local.todo(cat, name, vs)
    if limit is not None:
        df = df.head(limit)
    out = {"model": name, "embedded": 0, "skipped": total - len(df) if limit is None else None,
           "unreadable": 0, "index": False, "engine": "ray", "actors": 0}
    if df.height == 0:
        return out
    ray = connect(address)
    import lance_ray
    import ray.data as rdata

    ctx = rdata.DataContext.get_current()
    ctx.enable_progress_bars = False
    gpus = cluster_gpus(ray)
    n_act = actors or (gpus or cluster_cpus(ray))
    out["actors"] = n_act
    bs = int(p["batch_size"])
    ds = rdata.from_arrow(blocks(df.select("image_id", "sha256", "file").to_arrow(), bs, n_act))
    ds = ds.map_batches(EmbedActor, fn_constructor_kwargs={"model": p["model"],
                                                           "pretrained": p["pretrained"]},
                        batch_size=bs, batch_format="pyarrow",
                        concurrency=n_act, **({"num_gpus": 1} if gpus else {"num_cpus": 1}))
    uri = table_uri(cat.ws, name)
    lance_ray.write_lance(ds, uri, mode="append" if vs.has(name) else "create", stream=True,
                          batch_size=commit_rows, storage_options=storage_options(uri))
    vs = open_vectors(cat.ws)  # reopened: lance-ray committed new table versions
    left = local.todo(cat, name, vs).join(df.select("image_id"), on="image_id")
    out["embedded"] = len(df) - len(left)
    out["unreadable"] = len(df) - out["embedded"]
    out["index"] = vs.ensure_index(name)
    if echo:
        echo(f"embedded {out['embedded']:,} of {len(df):,} on {n_act} Ray actor(s)")
    return out
