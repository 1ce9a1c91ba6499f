"""Stage ``embed``: image vectors into LanceDB (``lake/vectors``), incremental and resumable.

``params.yaml: embed`` names the ``model`` (``descriptor-v1``, weights-free, the default; or
an open_clip model name) and ``pretrained`` (None or a local checkpoint file). Images whose
(image_id, sha256) is already stored for the model are skipped; every batch is one LanceDB
commit, so a run killed half way keeps what it finished and a re-run does the rest.
Decoding runs in parallel with the model: in a torch DataLoader's worker processes (started
from a fork server, see :func:`_worker_context`) with ``workers`` > 0; with ``workers: 0``
(the default) in one background thread of this process when the model runs on a GPU (Pillow
and torch release the GIL while they work, and no process has to start; see
:func:`prefetch`), in turn with the model on the CPU, whose threads use every core already.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import click
import numpy as np
import polars as pl

from medlake.catalog import Catalog, CatalogError
from medlake.catalog.descriptors import DescriptorCache
from medlake.catalog.embedders import DESCRIPTOR, DescriptorEmbedder, make_embedder
from medlake.catalog.imageio import ImageReadError, load_8bit, load_rgb
from medlake.catalog.storage import open_vectors
from medlake.catalog.params import defaults, param, to_dict
from medlake.catalog.vectors import VectorStore, table_name
from medlake.pipelines.fingerprint import image_files
from medlake.pipelines.stage import Counts, Stage

log = logging.getLogger(__name__)
STAGE = "embed"
COMMIT_ROWS = 4096  # vectors per LanceDB commit (a killed run redoes at most these many):
# one commit per batch of 32 made 3,000+ fragments at 100k images and grew memory with them


@dataclass(frozen=True)
class Params:
    """``params.yaml: embed``."""

    model: str = param(DESCRIPTOR, "descriptor-v1 (weights-free) or an open_clip model name")
    pretrained: str | None = param(None, "local checkpoint file (never downloaded); null: none")
    batch_size: int = param(64, "images per batch of the model", min=1)
    workers: int = param(0, "DataLoader worker processes (0: decode in this process)", min=0)


DEFAULTS: dict[str, Any] = defaults(Params)


class _Images:
    """torch Dataset of (index, tensor or None); unreadable files give None (skipped later)."""

    def __init__(self, files: list[str], prep: Any) -> None:
        self.files, self.prep = files, prep

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        try:
            return i, self.prep(self.prep.load(self.files[i]))
        except (ImageReadError, OSError):
            return i, None


def _collate(items: list[tuple[int, Any]]) -> tuple[list[int], Any]:
    good = [(i, t) for i, t in items if t is not None]
    if not good:
        return [], None
    if isinstance(good[0][1], np.ndarray):
        return [i for i, _ in good], np.stack([t for _, t in good])
    import torch

    return [i for i, _ in good], torch.stack([t for _, t in good])


def _batches(data: _Images, size: int) -> Iterator[tuple[list[int], Any]]:
    """What ``DataLoader(data, batch_size=size, collate_fn=_collate)`` yields with no worker
    processes, without importing torch: the descriptor (a weights-free model computed in
    :class:`_DescriptorPrep`) never needs it, and its import costs ~1.8 s of CPU."""
    for s in range(0, len(data), size):
        yield _collate([data[i] for i in range(s, min(s + size, len(data)))])


def todo(cat: Catalog, model_name: str, vs: VectorStore) -> pl.DataFrame:
    """Fingerprinted images not yet embedded with ``model_name`` (by image_id and sha256)."""
    fp = cat.read("fingerprints", columns=["image_id", "sha256"], required=True,
                  hint="run 'medlake fingerprint' first")
    files = image_files(cat).select("image_id", "file")
    df = fp.join(files, on="image_id", how="inner").sort("image_id")
    done = vs.keys(model_name)
    keep = [(i, s) not in done for i, s in zip(df["image_id"], df["sha256"], strict=True)]
    return df.filter(pl.Series(keep, dtype=pl.Boolean))


def run(cat: Catalog, params: Params | dict[str, Any] | None = None, *,
        model: str | None = None, pretrained: str | None = None,
        batch_size: int | None = None, workers: int | None = None, limit: int | None = None,
        engine: str = "local", address: str | None = None, echo: Any = None) -> Counts:
    """Embed every fingerprinted image that is not embedded yet with the configured model.

    Parameters
    ----------
    model, pretrained, batch_size, workers
        Override ``params.yaml: embed`` (see :data:`DEFAULTS`).
    limit : int, optional
        Stop after this many new images (the rest is done by the next run).

    Returns
    -------
    dict
        ``model`` (its full name), ``embedded`` (new), ``skipped`` (already there),
        ``unreadable``, ``index`` (whether an ANN index was built).
    """
    prm = DECLARATION.load_params(cat, params, {"model": model, "pretrained": pretrained,
                                                "batch_size": batch_size, "workers": workers})
    if engine == "ray":
        from medlake.pipelines import ray_embed

        out = ray_embed.run(cat, prm, address=address, limit=limit)
        return _result(out, export_table(cat, out["model"]))
    p = to_dict(prm)
    emb = make_embedder(p["model"], p["pretrained"])
    vs = open_vectors(cat.ws)
    total = len(cat.read("fingerprints", columns=["image_id"]))
    df = todo(cat, emb.name, vs)
    if limit is not None:
        df = df.head(limit)
    ids, shas, files = df["image_id"].to_list(), df["sha256"].to_list(), df["file"].to_list()
    out = {"model": emb.name, "embedded": 0, "skipped": total - len(ids) if limit is None else None,
           "unreadable": 0, "index": False}
    if ids:
        held: list[tuple[list[int], np.ndarray]] = []  # written COMMIT_ROWS at a time

        def commit() -> None:
            if held:
                idx = [i for part, _ in held for i in part]
                vs.add(emb.name, [ids[i] for i in idx], [shas[i] for i in idx],
                       np.concatenate([v for _, v in held]))
                held.clear()

        def take(idx: list[int], vecs: np.ndarray) -> None:
            held.append((idx, vecs))
            if sum(len(part) for part, _ in held) >= COMMIT_ROWS:
                commit()
            out["embedded"] += len(idx)
            if echo:
                echo(f"embedded {out['embedded']:,} of {len(ids):,}")

        done: set[int] = set()
        for idx, vecs in _cached(cat, emb, ids, shas, int(p["batch_size"])):
            take(idx, vecs)
            done.update(idx)
        rest = [n for n in range(len(ids)) if n not in done]  # decoded here
        data = _Images([files[n] for n in rest], preparer(emb))
        if int(p["workers"]) == 0 and not hasattr(emb, "forward"):
            loader: Iterable[tuple[list[int], Any]] = _batches(data, int(p["batch_size"]))
        else:
            import torch
            from torch.utils.data import DataLoader

            loader = DataLoader(data, batch_size=int(p["batch_size"]),
                                num_workers=int(p["workers"]), collate_fn=_collate,
                                pin_memory=torch.cuda.is_available(),
                                multiprocessing_context=_worker_context(int(p["workers"])))
        # workers 0: on a GPU a background thread decodes while the GPU computes; on the CPU
        # the model's threads already use every core, and a decoding thread only competes
        # with them (measured: 294 images ViT-B-32, 20.5 s with the thread, 19.6 s without)
        overlap = int(p["workers"]) == 0 and getattr(emb, "device", "cpu") != "cpu"
        for idx, batch in (prefetch(loader) if overlap else loader) if rest else ():
            if idx:
                take([rest[i] for i in idx], model_vectors(emb, batch))
        commit()
        out["unreadable"] = len(ids) - out["embedded"]
        out["index"] = vs.ensure_index(emb.name)
    return _result(out, export_table(cat, emb.name, vs))


def _cached(cat: Catalog, emb: Any, ids: list[str], shas: list[str],
            size: int) -> Iterator[tuple[list[int], np.ndarray]]:
    """(positions, vectors) of the descriptor-v1 vectors ``fingerprint`` left for these
    images (:mod:`catalog.descriptors`: computed from the pixels this stage would decode,
    the same vectors), at most ``size`` at a time; none for another model."""
    if not isinstance(emb, DescriptorEmbedder):
        return
    wanted = {(i, s): n for n, (i, s) in enumerate(zip(ids, shas, strict=True))}
    for pos, vecs in DescriptorCache(cat.ws.lake).find(wanted):
        for s in range(0, len(pos), size):
            yield pos[s:s + size], vecs[s:s + size]


def _result(out: dict[str, Any], exported: int) -> Counts:
    skipped = "" if out["skipped"] is None else f", {out['skipped']:,} already embedded"
    return Counts(STAGE, {**out, "exported": exported},
                  f"embed ({out['model']}): {out['embedded']:,} embedded{skipped}, "
                  f"{out['unreadable']:,} unreadable" + (", ANN index built" if out["index"] else ""))


def export_table(cat: Catalog, model: str, vs: VectorStore | None = None) -> int:
    """Write the ``embeddings`` table of ``model``: one row per fingerprinted image with a
    vector, sorted by image id (the DVC-tracked, byte-reproducible record of the stage;
    LanceDB's files carry random ids and are the working store). Returns the rows written."""
    import pyarrow as pa

    vs = vs or open_vectors(cat.ws)
    fp = cat.read("fingerprints", columns=["image_id", "sha256"]).sort("image_id")
    ids, mat = vs.load(model, fp["image_id"].to_list()) if vs.has(model) else ([], None)
    sha = dict(zip(fp["image_id"], fp["sha256"], strict=True))
    mat = np.zeros((0, 1), np.float32) if mat is None else np.ascontiguousarray(mat, np.float32)
    flat = pa.array(mat.ravel(), pa.float32())
    offsets = pa.array(np.arange(0, len(ids) * mat.shape[1] + 1, max(mat.shape[1], 1),
                                 dtype=np.int32)[:len(ids) + 1])
    at = pa.table({"image_id": pa.array(ids, pa.string()),
                   "model": pa.array([model] * len(ids), pa.string()),
                   "sha256": pa.array([sha[i] for i in ids], pa.string()),
                   "vector": pa.ListArray.from_arrays(offsets, flat)})
    with cat.transaction() as tx:
        tx.write("embeddings", at, stage=STAGE, partition=table_name(model))
    return at.num_rows


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Yield ``items`` in order, produced by a background thread up to ``depth`` ahead.

    The producer's exception is raised in the consumer at the point it happened; when the
    consumer stops early (an error in the model, a closed generator) the thread is told to
    stop and is joined, so nothing keeps running.
    """
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put(("item", x)):
                    return
            put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(("error", e))

    t = threading.Thread(target=produce, name="medlake-embed-prefetch", daemon=True)
    t.start()
    try:
        while True:
            kind, x = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise x
            yield x
    finally:
        stop.set()
        t.join()


def _worker_context(workers: int) -> Any:
    """Start loader workers from a fork server, not by forking this process.

    This process has LanceDB's async runtime and polars' thread pool running; a fork taken
    while one of their threads holds a lock can hang the worker (LanceDB warns about it and
    recommends forkserver or spawn). The fork server is a fresh, idle interpreter that has
    imported torch and this module once (paid once per run). A script that calls ``run`` with
    workers > 0 needs the usual ``if __name__ == "__main__":`` guard.
    """
    if workers <= 0:
        return None
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "medlake.pipelines.embed"])
    return ctx


def preparer(emb: Any) -> Any:
    """Per-image step run in the loader: open_clip's transform, or the whole descriptor.

    Both engines (local and Ray) call this, so their vectors stay identical.
    """
    if hasattr(emb, "preprocess"):
        return _ClipPrep(emb.preprocess, 2 * emb.input_side)
    return _DescriptorPrep()


class _ClipPrep:
    """open_clip's transform, with the decode size it needs (twice its input side)."""

    def __init__(self, preprocess: Any, min_side: int) -> None:
        self.preprocess, self.min_side = preprocess, min_side

    def load(self, path: str) -> Any:
        """The file as RGB; a large JPEG decoded at a reduced DCT scale that keeps twice the
        pixels the model's input needs (both get reduced by the transform after)."""
        return load_rgb(path, min_side=self.min_side)

    def __call__(self, im: Any) -> Any:
        return self.preprocess(im)


def model_vectors(emb: Any, batch: Any) -> Any:
    """Vectors of a collated batch: the model's forward pass (the descriptor is done already)."""
    return emb.forward(batch) if hasattr(emb, "forward") else batch


class _DescriptorPrep:
    """The descriptor is computed in the loader's workers (it is the whole model)."""

    min_side = DescriptorEmbedder.decode_side  # twice the descriptor's square

    def load(self, path: str) -> Any:
        """The file as 8-bit RGB, or grey for a grey file (the descriptor reduces it as grey:
        the same vector, without a full-size RGB copy); a large JPEG decoded reduced."""
        return load_8bit(path, min_side=self.min_side)

    def __call__(self, im: Any) -> np.ndarray:
        return DescriptorEmbedder()._one(im)


def similar(cat: Catalog, image_id: str, *, k: int = 10, model: str | None = None) -> list[tuple[str, float]]:
    """The ``k`` images most similar to ``image_id`` (itself excluded): [(image_id, cosine)]."""
    name = model or (cat.ws.param("embed.model") or DESCRIPTOR)
    vs = open_vectors(cat.ws)
    stored = _stored_models(vs)
    full = next((n for n in stored if n == name or n.startswith(f"openclip:{name}:")), None)
    if full is None:
        raise CatalogError(f"similar: no vectors for model '{name}' (stored: {stored or 'none'}); "
                           "run 'medlake embed' first")
    ids, mat = vs.load(full, [image_id])
    if not ids:
        raise CatalogError(f"similar: image '{image_id}' has no {full} vector; is the id right "
                           "(dataset:native_id) and has 'medlake embed' run since it was ingested?")
    hits = vs.search(full, mat[0], k + 1)
    return [(i, s) for i, s in hits if i != image_id][:k]


def _stored_models(vs: VectorStore) -> list[str]:
    out = []
    for t in vs.db.list_tables().tables:
        if t.startswith("emb_"):
            at = vs.db.open_table(t).search().select(["model"]).limit(1).to_arrow()
            out += at["model"].to_pylist()
    return out


DECLARATION = Stage(
    name=STAGE, params=Params, run=run,
    reads=("fingerprints", "images", "datasets"), writes=("embeddings",),
    help="Embed every fingerprinted image not yet embedded with the configured model.\n\n"
         "Vectors go to LanceDB (lake/vectors: working store and index, keyed by image id, "
         "sha256 and model; a re-run embeds only new or changed images, a killed run keeps its "
         "finished commits, every 4,096 vectors) and to the 'embeddings' table (the tracked record).",
    options=(
        click.option("--limit", type=int, default=None, help="Stop after this many new images."),
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
                     show_default=True, help="ray: a Ray Data pipeline on a cluster."),
        click.option("--address", default=None, help="Ray head HOST:PORT (default: RAY_ADDRESS)."),
    ),
    example="medlake embed --model ViT-B-32 --pretrained weights/vit_b32.pt",
)


if __name__ == "__main__":
    from medlake.cli.main import run_stage

    run_stage("embed")
