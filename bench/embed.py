"""Benchmark: the embed pipeline's images/s versus the model's forward pass alone.

Builds a temporary workspace with the demo's synthetic images (``medlake.demo.synthetic``, both
modalities; ingested and fingerprinted, not timed), then measures in one run, per model:

- forward alone (in a fresh interpreter, as the pipeline): the embedder on images decoded
  and preprocessed beforehand (open_clip:
  ``OpenClipEmbedder.forward`` on the preprocessed tensors, batch by batch; descriptor: the
  descriptor of each decoded image), images/s;
- pipeline: ``pipelines.embed.run`` from files to LanceDB (decode + preprocess in the
  DataLoader, model, one LanceDB commit per batch) with ``workers`` 0 and ``--workers``,
  each in a fresh interpreter (imports warmed first) with a time limit (a DataLoader that
  hangs is reported, not waited for); images/s of the whole ``run`` call, which includes
  building the model (timed separately and reported). Both sides get the same untimed
  warm-up first: one forward pass of a full batch in the process (a cold process spends
  seconds on its first batches: kernel selection and memory pools, not loading).

ratio = pipeline images/s / forward-alone images/s; >= 0.9 means loading is not the
bottleneck. The pipeline's images/s are also given less the model's construction (one-off,
not loading; the forward-alone side does not count it either) and after the first batch. ``--repeat R`` interleaves R rounds of all measurements and keeps the best of
each (the machine's load drifts). Runs on CUDA (mixed precision, as the embedder does there) with ``--device cuda``.

    .venv/bin/python bench/embed.py [--n 300] [--device cpu|cuda] [--workers 2] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, record, run_child

from medlake.catalog import Catalog, Workspace
from medlake.catalog.embedders import DESCRIPTOR, make_embedder
from medlake.catalog.imageio import ImageReadError, load_rgb
from medlake.pipelines.fingerprint import image_files

CHILD = """
import json, sys, time
from pathlib import Path
from medlake.catalog import Catalog, Workspace
from medlake.catalog.embedders import make_embedder
from medlake.pipelines import embed
root, model, workers, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
import lancedb, torch, torch.utils.data  # noqa: E401,F401  imports warmed, not timed
make_embedder(model)  # run() builds the model again (timed: build_s)
t0 = time.perf_counter()
warm = make_embedder(model)
build = time.perf_counter() - t0
if hasattr(warm, "tensors"):  # the same warm-up as the forward-alone side: one full batch
    from PIL import Image
    warm.forward(warm.tensors([Image.new("RGB", (256, 256), (90, 90, 90))] * batch))
del warm
marks = []
t0 = time.perf_counter()
res = embed.run(Catalog(Workspace(Path(root))), model=model, workers=workers, batch_size=batch,
                echo=lambda msg: marks.append(time.perf_counter()))
total = time.perf_counter() - t0
print(json.dumps({"total_s": total, "build_s": build, "embedded": res["embedded"], "unreadable": res["unreadable"],
                  "first_batch_s": marks[0] - t0 if marks else None,
                  "loop_s": marks[-1] - t0 if marks else None}))
"""


def workspace(tmp: Path, n: int) -> Catalog:
    """Synthetic images (about ``n``), ingested and fingerprinted."""
    from medlake.pipelines import fingerprint, ingest
    from medlake.demo.synthetic import generate

    root = tmp / "ws"
    (root / ".dvc").mkdir(parents=True)
    generate(root / "syn", n_captures=max(4, int(n / 1.5)), seed=0)
    cat = Catalog(Workspace(root))
    for m in ("derm", "cxr"):
        ingest.run(cat, "generic", root / "syn" / f"{m}.yaml")
    fingerprint.run(cat)
    return cat


def forward_alone(cat: Catalog, model: str, device: str, batch: int) -> dict:
    """Images decoded and preprocessed first; then only the model is timed."""
    import torch

    t0 = time.perf_counter()
    emb = make_embedder(model, None, device=device)
    build_s = time.perf_counter() - t0
    images = []
    for f in image_files(cat)["file"].to_list():
        try:
            images.append(load_rgb(f))
        except (ImageReadError, OSError):
            continue
    if model == DESCRIPTOR:
        t0 = time.perf_counter()
        for s in range(0, len(images), batch):
            emb.embed(images[s:s + batch])
        secs = time.perf_counter() - t0
    else:
        batches = [emb.tensors(images[s:s + batch]) for s in range(0, len(images), batch)]
        emb.forward(batches[0])  # warm-up (kernels, autocast caches); the pipeline gets the same
        if emb.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in batches:
            emb.forward(b)  # returns numpy: synchronises on CUDA
        secs = time.perf_counter() - t0
    return {"images": len(images), "secs": secs, "ips": len(images) / secs, "build_s": build_s}


FORWARD_CHILD = """
import json, sys
from pathlib import Path
sys.path.insert(0, "bench")
import embed as bench_embed
from medlake.catalog import Catalog, Workspace
print(json.dumps(bench_embed.forward_alone(Catalog(Workspace(Path(sys.argv[1]))), sys.argv[2],
                                           sys.argv[3], int(sys.argv[4]))))
"""


def pipeline(cat: Catalog, model: str, workers: int, batch: int, timeout: int) -> dict:
    """``embed.run`` in a fresh interpreter on an empty vector store; None fields if it hung."""
    shutil.rmtree(cat.ws.vectors_dir, ignore_errors=True)
    try:  # the device choice reaches the child through os.environ (see main)
        res = run_child(CHILD, str(cat.ws.root), model, str(workers), str(batch), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"workers": workers, "hung": True, "timeout_s": timeout}
    # images/s of the whole run (files -> LanceDB), model construction included; steady:
    # after the first batch (start-up: model, table reads, worker start)
    first = min(batch, res["embedded"])
    steady = (res["embedded"] - first) / max(res["loop_s"] - res["first_batch_s"], 1e-9)
    res.update(workers=workers, hung=False, ips=res["embedded"] / res["total_s"], steady_ips=steady)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300, help="about this many synthetic images")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers besides 0")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--models", default=f"ViT-B-32,{DESCRIPTOR}")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per pipeline run")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved rounds; best of each")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    tmp = Path(tempfile.mkdtemp(prefix="medlake-bench-embed-"))
    try:
        cat = workspace(tmp, a.n)
        rows = []
        for model in a.models.split(","):
            # load drifts: forward and pipelines interleaved, ``--repeat`` rounds, best of each
            fwds, runs = [], {}
            for _ in range(a.repeat):
                # in a fresh interpreter, as the pipeline runs (same conditions)
                fwds.append(run_child(FORWARD_CHILD, str(cat.ws.root), model, a.device,
                                      str(a.batch), timeout=a.timeout))
                for w in sorted({0, a.workers}):
                    r = pipeline(cat, model, w, a.batch, a.timeout)
                    if w not in runs or r.get("ips", 0) > runs[w].get("ips", 0):
                        runs[w] = r
            fwd = max(fwds, key=lambda f: f["ips"])
            fwd["ips_runs"] = [f["ips"] for f in fwds]
            runs = list(runs.values())
            rows.append((model, fwd, runs))
            print(json.dumps({"model": model, "forward": fwd, "pipeline": runs}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(rows, a)


def report(rows: list, a: argparse.Namespace) -> None:
    mp = " (mixed precision)" if a.device == "cuda" else ""
    lines = [
        (f"- machine: {machine()}, device {a.device}{mp}, shared with other engineers' jobs "
        f"(timings noisy); batch {a.batch}; synthetic images (demo generator, both modalities); "
        "open_clip with pretrained=None (random weights)"),
        "",
        (f"| model | images | forward alone (images/s, best of {a.repeat}) | pipeline workers | "
        "pipeline (images/s, best) | ratio | pipeline less model build (images/s) | ratio | "
        "steady after 1st batch (images/s) | ratio | model build (s, in pipeline time) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, fwd, runs in rows:
        f = f"{fwd['ips']:.1f} (rounds: {', '.join(f'{x:.1f}' for x in fwd['ips_runs'])})"
        for r in runs:
            if r["hung"]:
                lines.append(f"| {model} | {fwd['images']} | {f} | {r['workers']} | "
                             f"hung (killed after {r['timeout_s']} s) | - | - | - | - | - | - |")
                continue
            lean = r["embedded"] / max(r["total_s"] - r["build_s"], 1e-9)
            lines.append(f"| {model} | {r['embedded']} | {f} | {r['workers']} | "
                         f"{r['ips']:.1f} | {r['ips'] / fwd['ips']:.2f} | {lean:.1f} | "
                         f"{lean / fwd['ips']:.2f} | {r['steady_ips']:.1f} | "
                         f"{r['steady_ips'] / fwd['ips']:.2f} | {r['build_s']:.1f} |")
    text = "\n".join(lines)
    print(text)
    if a.record:
        record(f"embed throughput (bench/embed.py, issue #4, {a.device})", text)


if __name__ == "__main__":
    main()
