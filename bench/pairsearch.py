"""Benchmark: exact near-pair search over N unit vectors versus a bare blocked product and LanceDB.

Data (seeded): N unit vectors of ``--dim`` floats in clusters of about 100 (members at cosine
0.3-0.7 to each other), with N/50 planted near copies at cosine 0.85-0.99 to their source,
about two thirds of them above ``--threshold``. One run measures, for each size:

- baseline: a bare blocked float32 matrix product (torch, the same BLAS) that keeps every
  pair >= threshold (``np.nonzero`` of the upper triangle). Its pairs are the exact set.
- medlake: ``pipelines.duplicates.knn_pairs`` (the stage's search: each row's ``k`` best above
  the threshold), i.e. ``catalog.vectors.near_pairs``; recall against the exact set.
- LanceDB: ``VectorStore.add`` + ``ensure_index`` (IVF_PQ, cosine) then batched
  ``search_many`` queries (``k + 1`` nearest, refine_factor set), thresholded; its time is
  index build + queries (a seeded sample of ``--queries`` rows, time scaled to N), and recall of the
  exact pairs that have a queried row, with and without refine_factor.

Exact search costs O(N^2 d); the script fits ``c N^2`` to the measured sizes and the index's
cost to a power law, and prints where the index would become the faster choice.

    .venv/bin/python bench/pairsearch.py [--n 100000] [--sizes 25000,50000] [--record]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, peak_rss_mb, record

from medlake.catalog.vectors import VectorStore
from medlake.pipelines.duplicates import knn_pairs


def make(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """Clustered unit vectors with planted near copies; returns (vectors, planted pairs)."""
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n // 100)
    centre = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    lab = rng.integers(0, n_clusters, n)
    spread = rng.uniform(0.7, 1.5, n_clusters).astype(np.float32)[lab, None] / np.sqrt(dim)
    v = centre[lab] + spread * rng.standard_normal((n, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    m = n // 50
    src, dst = rng.permutation(n)[: 2 * m].reshape(2, m)
    u = rng.standard_normal((m, dim), dtype=np.float32)
    u -= (u * v[src]).sum(1, keepdims=True) * v[src]
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    c = rng.uniform(0.85, 0.99, (m, 1)).astype(np.float32)
    v[dst] = c * v[src] + np.sqrt(1 - c**2) * u
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return np.ascontiguousarray(v), m


def bare(v: np.ndarray, threshold: float, block: int, bf16: bool = False) -> set[tuple[int, int]]:
    """Baseline: float32 blocked products, every pair i < j >= threshold.

    ``bf16``: the same in bfloat16 (not exact; only to time medlake's own arithmetic).
    """
    import torch

    t = torch.from_numpy(v).to(torch.bfloat16) if bf16 else torch.from_numpy(v)
    out: set[tuple[int, int]] = set()
    for s in range(0, len(v), block):
        hit = t[s:s + block] @ t.T >= threshold
        i, j = (x.numpy() for x in torch.nonzero(hit, as_tuple=True))
        keep = i + s < j
        out.update(zip((i[keep] + s).tolist(), j[keep].tolist(), strict=True))
    return out


def lance(v: np.ndarray, threshold: float, k: int, queries: np.ndarray,
          refine: int) -> dict:
    """IVF_PQ index build + batched queries of the ``queries`` rows; found pairs both ways."""
    with tempfile.TemporaryDirectory() as tmp:
        vs = VectorStore(tmp)
        ids = [str(i) for i in range(len(v))]
        t0 = time.perf_counter()
        vs.add("bench", ids, ids, v)
        vs.ensure_index("bench", min_rows=0)
        build = time.perf_counter() - t0
        res = {"build_s": build}
        for name, rf in (("refined", refine), ("pq_only", None)):
            t0 = time.perf_counter()
            found: set[tuple[int, int]] = set()
            listed: set[tuple[int, int]] = set()  # in the k + 1 list, whatever its distance
            for s in range(0, len(queries), 2048):
                qs = queries[s:s + 2048]
                at = vs.search_many("bench", v[qs], k + 1, refine_factor=rf)
                qi = qs[at["query"].to_numpy()]
                hit = np.asarray(at["image_id"].to_pylist(), dtype=np.int64)
                ok = (at["similarity"].to_numpy() >= threshold) & (hit != qi)
                listed.update(zip(np.minimum(qi, hit).tolist(), np.maximum(qi, hit).tolist(),
                                  strict=True))
                found.update(zip(np.minimum(qi, hit)[ok].tolist(), np.maximum(qi, hit)[ok].tolist(),
                                 strict=True))
            res[name] = {"query_s": time.perf_counter() - t0, "found": found, "listed": listed}
    return res


def one(n: int, a: argparse.Namespace, ann: bool) -> dict:
    v, planted = make(n, a.dim)
    t0 = time.perf_counter()
    exact = bare(v, a.threshold, a.block)
    base_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = knn_pairs(v, k=a.k, threshold=a.threshold, block=a.block)
    med_s = time.perf_counter() - t0
    mine = {(int(i), int(j)) for i, j, _ in got}
    bf16_s = None
    if a.bf16_baseline:
        t0 = time.perf_counter()
        bare(v, a.threshold, a.block, bf16=True)
        bf16_s = time.perf_counter() - t0
    row = {"n": n, "planted": planted, "exact_pairs": len(exact), "base_s": base_s, "med_s": med_s,
           "bf16_s": bf16_s,
           "recall": len(mine & exact) / max(len(exact), 1), "extra": len(mine - exact)}
    if ann:
        nq = min(n, a.queries or n)
        qs = np.sort(np.random.default_rng(1).permutation(n)[:nq])
        res = lance(v, a.threshold, a.k, qs, a.refine)
        inq = np.zeros(n, bool)
        inq[qs] = True
        # pairs one of whose rows was queried; a query finds its own pairs
        want = {p for p in exact if inq[p[0]] or inq[p[1]]}
        scale = n / nq
        row["ann"] = {"build_s": res["build_s"], "queries": nq, "pairs_in_scope": len(want)}
        for name in ("refined", "pq_only"):
            r = res[name]
            row["ann"][name] = {"query_s": r["query_s"], "query_s_all": r["query_s"] * scale,
                                "recall": len(r["found"] & want) / max(len(want), 1),
                                "recall_at_k": len(r["listed"] & want) / max(len(want), 1)}
    row["peak_rss_mb"] = peak_rss_mb()
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--sizes", default="25000,50000", help="smaller sizes for the N^2 fit")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--block", type=int, default=4096)
    ap.add_argument("--refine", type=int, default=10)
    ap.add_argument("--queries", type=int, default=4000,
                    help="LanceDB queries, a seeded sample of rows (0: all N); time scaled to N")
    ap.add_argument("--bf16-baseline", action="store_true",
                    help="also time a bare bfloat16 blocked product (medlake's own arithmetic)")
    ap.add_argument("--no-ann", action="store_true", help="skip LanceDB")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    sizes = sorted({int(x) for x in a.sizes.split(",") if x} | {a.n})
    w, _ = make(2000, a.dim, seed=9)  # warm-up: torch import, thread pools, bfloat16 kernels
    bare(w, a.threshold, a.block)
    knn_pairs(w, k=a.k, threshold=a.threshold, block=a.block)
    rows = [one(n, a, ann=not a.no_ann) for n in sizes]
    report(rows, a)


def _ann_cells(r: dict) -> str:
    ann = r.get("ann")
    if not ann:
        return "- | - | -"
    q = "" if ann["queries"] == r["n"] else f" ({ann['queries']:,} queries, time scaled)"
    return (f"{ann['build_s']:.1f} + {ann['refined']['query_s_all']:.1f}{q} | "
            f"{ann['refined']['recall']:.4f} | {ann['pq_only']['recall']:.4f} "
            f"({ann['pq_only'].get('recall_at_k', float('nan')):.4f}) ")


def _fits(rows: list[dict]) -> list[str]:
    """c N^2 for exact search; a power law for the index; where they cross."""
    ns = np.array([r["n"] for r in rows], float)
    c_med = float(np.sum(np.array([r["med_s"] for r in rows]) * ns**2) / np.sum(ns**4))
    out = [(f"- exact search fit: {c_med:.3g} x N^2 s (1M vectors: {c_med * 1e12 / 3600:.1f} h; "
           f"one hour at N = {np.sqrt(3600 / c_med):,.0f})")]
    if len(rows) > 1 and all("ann" in r for r in rows):
        ann_s = np.array([r["ann"]["build_s"] + r["ann"]["refined"]["query_s_all"] for r in rows])
        p, logc = np.polyfit(np.log(ns), np.log(ann_s), 1)
        # c N^2 = e^logc N^p  ->  N = (e^logc / c)^(1 / (2 - p))
        cross = (np.exp(logc) / c_med) ** (1 / (2 - p)) if p < 2 else float("inf")
        out += [(f"- LanceDB fit: {np.exp(logc):.3g} x N^{p:.2f} s; the index becomes faster than "
                f"exact search at about N = {cross:,.0f} (and its recall is below 1.0)")]
    return out


def report(rows: list[dict], a: argparse.Namespace) -> None:
    bf = any(r.get("bf16_s") for r in rows)
    lines = [
        (f"- machine: {machine()}, shared with other engineers' jobs (load varies; timings "
        f"noisy); {a.dim}-d unit vectors, threshold {a.threshold}, k {a.k}, block {a.block}"),
        "",
        "| N | exact pairs | bare blocked fp32 product (s) | medlake knn_pairs (s) | ratio | "
        + ("bare bf16 product (s) | ratio | " if bf else "")
        + "medlake recall | LanceDB IVF_PQ build + queries (s) | LanceDB recall, refine_factor "
        f"{a.refine} | recall, no refine (partner in top k at all) | peak RSS (MiB) |",
        "|---:" * (10 + 2 * bf) + "|",
    ]
    for r in rows:
        b16 = (f"{r['bf16_s']:.1f} | {r['med_s'] / r['bf16_s']:.2f} | " if r.get("bf16_s")
               else ("- | - | " if bf else ""))
        lines.append(
            f"| {r['n']:,} | {r['exact_pairs']:,} | {r['base_s']:.1f} | {r['med_s']:.1f} | "
            f"{r['med_s'] / r['base_s']:.2f} | {b16}{r['recall']:.4f} (+{r['extra']} not in set) | "
            f"{_ann_cells(r)} | {r['peak_rss_mb']:.0f} |")
    lines += ["", *_fits(rows)]
    text = "\n".join(lines)
    print(text)
    if a.record:
        record("pairsearch (bench/pairsearch.py, issue #4)", text)


if __name__ == "__main__":
    main()
