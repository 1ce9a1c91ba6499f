"""Scenarios run by tests/scale_harness.py inside the namespace, on its Ray cluster and S3 server.

Each takes the running cluster and a work folder and returns a dict for ``result.json``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import yaml
from versions_helpers import BIN, sh

CLIP = "ViT-S-32-alt"  # the smallest ViT config open_clip ships (22.6M-parameter image tower)
CLIP_IMAGES = 12
RECIPE = """dataset: synth-derm
parent: synth-derm@original
labels:
  dx: {source: "synth-derm:clinic", finding: diagnosis}
rules: []
export: {images: true}
"""


def set_vectors(root: Path, uri: str | None) -> None:
    """Point params.yaml's ``vectors.uri`` at ``uri`` (None: back to lake/vectors)."""
    f = root / "params.yaml"
    p = yaml.safe_load(f.read_text()) or {}
    p.pop("vectors", None)
    if uri:
        p["vectors"] = {"uri": uri}
    f.write_text(yaml.safe_dump(p, sort_keys=False))


def lake(cl: Any, work: Path, n_captures: int) -> Any:
    """``medlake init`` with an S3 DVC remote, synthetic images ingested and fingerprinted."""
    from medlake.catalog import Catalog, Workspace
    from medlake.pipelines import fingerprint, ingest
    from medlake.demo.synthetic import generate

    root = work / "ws"
    sh(str(BIN / "medlake"), "init", str(root), "--remote", "s3://dvc/store",
       "--endpoint-url", cl.endpoint, cwd=work)
    for k, v in (("user.email", "t@example.org"), ("user.name", "medlake test")):
        sh("git", "config", k, v, cwd=root)
    generate(root / "data/synthetic", n_captures=n_captures, seed=3, modalities=("derm",))
    cat = Catalog(Workspace(root))
    ingest.run(cat, "generic", root / "data/synthetic/derm.yaml")
    fingerprint.run(cat)
    return cat


def compare_embed(cat: Any, cl: Any) -> dict[str, Any]:
    """Local engine into lake/vectors, Ray engine (in two runs: resume) into s3://vectors."""
    from medlake.catalog.storage import open_vectors
    from medlake.pipelines import embed, ray_embed

    out: dict[str, Any] = {}
    root = cat.ws.root
    set_vectors(root, None)
    t = time.time()
    out["local"] = dict(embed.run(cat, workers=0, batch_size=16).counts)
    out["local_s"] = time.time() - t
    ids_l, vec_l = open_vectors(cat.ws).load(out["local"]["model"])
    set_vectors(root, "s3://vectors/ws")
    t = time.time()
    out["ray_part"] = ray_embed.run(cat, address=cl.address, batch_size=16, limit=10,
                                    commit_rows=4)
    out["ray_rest"] = ray_embed.run(cat, address=cl.address, batch_size=16)
    out["ray_s"] = time.time() - t
    out["ray_again"] = ray_embed.run(cat, address=cl.address, batch_size=16)
    vs = open_vectors(cat.ws)
    out["s3_store"] = type(vs).__name__
    ids_r, vec_r = vs.load(out["local"]["model"])
    out["n_local"], out["n_ray"] = len(ids_l), len(ids_r)
    out["same_ids"] = ids_l == ids_r
    out["max_abs_diff"] = float(np.abs(vec_l - vec_r).max()) if out["same_ids"] else None
    out["vector_type"] = str(vs.db.open_table(vs.db.list_tables().tables[0]).schema.field("vector").type)
    out["s3_objects"] = _s3_count(cl, "vectors/ws")
    out["similar_s3"] = embed.similar(cat, ids_r[0], k=3)
    from click.testing import CliRunner

    from medlake.cli.main import main

    r = CliRunner().invoke(main, ["embed", "-w", str(root), "--engine", "ray", "--address",
                                  cl.address])
    out["cli"] = {"exit": r.exit_code, "output": r.output[-500:]}
    return out


def compare_duplicates(cat: Any, cl: Any) -> dict[str, Any]:
    """duplicates local (vectors local) vs Ray (vectors on S3): pairs and clusters equal."""
    from medlake.pipelines import duplicates

    out: dict[str, Any] = {}
    root = cat.ws.root
    set_vectors(root, None)
    t = time.time()
    out["local"] = dict(duplicates.run(cat).counts)
    out["local_s"] = time.time() - t
    pairs_l, clu_l = cat.read("pairs"), cat.read("clusters")
    set_vectors(root, "s3://vectors/ws")
    t = time.time()
    out["ray"] = dict(duplicates.run(cat, engine="ray", address=cl.address).counts)
    out["ray_s"] = time.time() - t
    pairs_r, clu_r = cat.read("pairs"), cat.read("clusters")
    out["n_pairs"] = pairs_l.height
    out["n_vector_pairs"] = pairs_l.filter(pl.col("method").str.contains("vector")).height
    out["pairs_equal"] = pairs_l.equals(pairs_r)
    out["clusters_equal"] = clu_l.equals(clu_r)
    out["n_clusters"] = clu_l["cluster_id"].n_unique()
    return out


def compare_clip(cat: Any, cl: Any, work: Path) -> dict[str, Any]:
    """A checkpointed open_clip model: local engine vs ``medlake embed --engine ray``.

    One model (:data:`CLIP`) is built once with fixed random weights and saved as a local
    checkpoint; ``params.yaml: embed`` names it by a path relative to the workspace (the
    driver resolves it, actors run in other folders). The local engine (batches of 8, torch
    threads as configured) and the 2-node cluster (batches of 3, one thread per actor) embed
    the same first :data:`CLIP_IMAGES` images; the vectors must agree within 1e-6.
    """
    import open_clip
    import torch
    from click.testing import CliRunner

    from medlake.catalog.storage import open_vectors
    from medlake.cli.main import main
    from medlake.pipelines import embed

    root, ckpt, out = cat.ws.root, work / "clip.pt", {"model_config": CLIP}
    torch.manual_seed(0)
    torch.save(open_clip.create_model(CLIP, pretrained=None).state_dict(), ckpt)
    out["checkpoint_mb"] = ckpt.stat().st_size / 1e6
    before = _set_embed(root, {"model": CLIP, "pretrained": "../clip.pt", "batch_size": 8})
    here = Path.cwd()
    os.chdir(root)  # a relative checkpoint path, as in a DVC stage (cwd = workspace)
    try:
        set_vectors(root, None)
        t = time.time()
        out["local"] = dict(embed.run(cat, workers=0, limit=CLIP_IMAGES).counts)
        out["local_s"] = time.time() - t
        name = out["local"]["model"]
        ids_l, vec_l = open_vectors(cat.ws).load(name)
        set_vectors(root, "s3://vectors/ws")
        t = time.time()
        r = CliRunner().invoke(main, ["embed", "-w", str(root), "--engine", "ray", "--address",
                                      cl.address, "--limit", str(CLIP_IMAGES), "--batch-size", "3"])
        out["ray_s"] = time.time() - t
        out["cli"] = {"exit": r.exit_code, "output": r.output[-500:] + repr(r.exception or "")}
        ids_r, vec_r = open_vectors(cat.ws).load(name) if r.exit_code == 0 else ([], None)
    finally:
        os.chdir(here)
        _set_embed(root, before)
        set_vectors(root, None)
        ckpt.unlink(missing_ok=True)
    out["n_local"], out["n_ray"], out["dim"] = len(ids_l), len(ids_r), int(vec_l.shape[1])
    out["same_ids"] = ids_l == ids_r
    out["max_abs_diff"] = float(np.abs(vec_l - vec_r).max()) if out["same_ids"] else None
    out["min_pair_distance"] = float(min(np.abs(vec_l[i] - vec_l[j]).max()
                                         for i in range(len(vec_l)) for j in range(i)))
    return out


def _set_embed(root: Path, embed: dict[str, Any] | None) -> dict[str, Any] | None:
    """Set (or with None remove) ``params.yaml: embed``; returns the previous value."""
    f = root / "params.yaml"
    p = yaml.safe_load(f.read_text()) or {}
    before = p.pop("embed", None)
    if embed:
        p["embed"] = embed
    f.write_text(yaml.safe_dump(p, sort_keys=False))
    return before


def dvc_roundtrip(cat: Any, cl: Any, work: Path) -> dict[str, Any]:
    """A version built by a DVC stage, pushed to SeaweedFS, pulled into a fresh clone."""
    from versions_helpers import tree_digest

    root = cat.ws.root
    (root / "recipes/mini.yaml").write_text(RECIPE)
    stage = {"cmd": "medlake materialize recipes/mini.yaml", "deps": ["recipes/mini.yaml"],
             "outs": ["lake/versions/mini"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"mini": stage}}))
    set_vectors(root, None)
    sh(str(BIN / "dvc"), "repro", "mini", cwd=root)
    config = (root / ".dvc/config").read_text()
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "mini version", cwd=root)
    pushed = sh(str(BIN / "dvc"), "push", cwd=root)
    clone = work / "clone"
    sh("git", "clone", "-q", str(root), str(clone), cwd=work)
    sh(str(BIN / "dvc"), "pull", "mini", cwd=clone)
    a, b = tree_digest(root / "lake/versions/mini"), tree_digest(clone / "lake/versions/mini")
    return {"config": config, "push": pushed[-300:], "files": len(a), "identical": a == b,
            "remote_objects": _s3_count(cl, "dvc/store")}


def _s3_count(cl: Any, prefix: str) -> int:
    return len(cl.s3().find(prefix))


def test(cl: Any, work: Path) -> dict[str, Any]:
    cat = lake(cl, work, n_captures=30)
    return {"embed": compare_embed(cat, cl), "duplicates": compare_duplicates(cat, cl),
            "dvc": dvc_roundtrip(cat, cl, work), "clip": compare_clip(cat, cl, work)}


def bench(cl: Any, work: Path) -> dict[str, Any]:
    """Timings: per-task overhead, exact pair search and embedding, local vs the cluster."""
    import ray

    from medlake.pipelines import ray_duplicates
    from medlake.pipelines.duplicates import knn_pairs
    from medlake.pipelines.ray_engine import connect

    n_img = int(os.environ.get("SCALE_BENCH_CAPTURES", "150"))
    n_vec = int(os.environ.get("SCALE_BENCH_VECTORS", "40000"))
    out: dict[str, Any] = {}
    t = time.time()
    connect(cl.address)
    out["connect_s"] = time.time() - t

    @ray.remote(num_cpus=1)
    def noop(x: int) -> int:
        return x

    ray.get([noop.remote(i) for i in range(20)])  # warm the worker pools
    t = time.time()
    ray.get([noop.remote(i) for i in range(400)])
    out["task_overhead_ms"] = (time.time() - t) / 400 * 1000
    rng = np.random.default_rng(0)
    v = rng.standard_normal((n_vec, 512), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    t = time.time()
    loc = knn_pairs(v, k=10, threshold=0.2)
    out["knn_local_s"] = time.time() - t
    t = time.time()
    rem = ray_duplicates.knn_pairs(ray, v, k=10, threshold=0.2)
    out["knn_ray_s"] = time.time() - t
    out["knn_n"], out["knn_pairs"], out["knn_equal"] = n_vec, len(loc), bool(np.array_equal(loc, rem))
    cat = lake(cl, work, n_captures=n_img)
    emb = compare_embed(cat, cl)
    out["embed_images"] = emb["n_local"]
    out["embed_local_s"], out["embed_ray_s"] = emb["local_s"], emb["ray_s"]
    out["embed_max_abs_diff"] = emb["max_abs_diff"]
    tables = sum(f.stat().st_size for f in (cat.ws.root / "lake/tables").rglob("*.parquet"))
    out["table_bytes_per_image"] = tables / emb["n_local"]
    out["s3_vector_bytes_per_image"] = _s3_bytes(cl, "vectors/ws") / emb["n_local"]
    from medlake.catalog.embedders import make_embedder
    from medlake.catalog.imageio import load_rgb
    from medlake.pipelines.fingerprint import image_files

    files = image_files(cat)["file"].to_list()[:32]
    vit = make_embedder("ViT-B-32", None)
    batch = vit.tensors([load_rgb(f) for f in files])
    t = time.time()
    vit.forward(batch)
    out["vit_b32_images_per_s_local"] = len(files) / (time.time() - t)
    return out


def _s3_bytes(cl: Any, prefix: str) -> int:
    return int(cl.s3().du(prefix))


SCENARIOS = {"test": test, "bench": bench}
