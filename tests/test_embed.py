"""Stage embed: incremental, resume after kill, open_clip (random weights), missing weights, similar, CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from images_helpers import _synth_lake  # noqa: F401  (session fixture synth_lake)

from medlake.catalog import Catalog, CatalogError, Workspace
from medlake.catalog.embedders import EmbedderError
from medlake.catalog.vectors import VectorStore, table_name
from medlake.cli.main import main
from medlake.pipelines import embed, fingerprint, ingest

REPO = Path(__file__).resolve().parents[1]


def test_second_run_embeds_nothing(synth_lake):
    res = embed.run(synth_lake, workers=0)
    assert res["embedded"] == 0 and res["skipped"] == len(synth_lake.read("fingerprints"))
    r = CliRunner().invoke(main, ["embed", "-w", str(synth_lake.ws.root), "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "0 embedded" in r.output and "already embedded" in r.output


def test_vectors_unit_and_similar(synth_lake):
    vs = VectorStore(synth_lake.ws.vectors_dir)
    ids, mat = vs.load("descriptor-v1")
    assert len(ids) == len(set(ids)) == len(synth_lake.read("fingerprints"))
    np.testing.assert_allclose(np.linalg.norm(mat, axis=1), 1.0, atol=1e-5)
    q = ids[0]
    hits = embed.similar(synth_lake, q, k=5)
    sims = mat @ mat[0]
    ref = np.argsort(-sims, kind="stable")[1:6]
    # the same scores in the same order (ids may swap only between equal scores: exact copies)
    np.testing.assert_allclose([s for _, s in hits], sims[ref], atol=1e-4)
    pos = {x: n for n, x in enumerate(ids)}
    for h, s in hits:
        assert h != q and abs(sims[pos[h]] - s) < 1e-4
    r = CliRunner().invoke(main, ["similar", q, "-k", "3", "-w", str(synth_lake.ws.root)])
    assert r.exit_code == 0 and r.output.count("\n") == 3 and ids[ref[0]] in r.output
    r = CliRunner().invoke(main, ["similar", "nope:1", "-w", str(synth_lake.ws.root)])
    assert r.exit_code != 0 and "nope:1" in r.output


def test_open_clip_random_weights_and_missing_checkpoint(synth_lake, tmp_path):
    res = embed.run(synth_lake, model="ViT-B-32", pretrained=None, limit=4, batch_size=4, workers=0)
    assert res["model"] == "openclip:ViT-B-32:random" and res["embedded"] == 4
    ids, mat = VectorStore(synth_lake.ws.vectors_dir).load(res["model"])
    assert len(ids) == 4 and mat.shape == (4, 512)
    np.testing.assert_allclose(np.linalg.norm(mat, axis=1), 1.0, atol=1e-4)
    missing = tmp_path / "ViT-B-32-weights.pt"
    with pytest.raises(EmbedderError, match="ViT-B-32-weights.pt.*not available locally"):
        embed.run(synth_lake, model="ViT-B-32", pretrained=str(missing), limit=1)
    with pytest.raises(CatalogError, match="no model"):
        embed.run(synth_lake, model="no-such-net", limit=1)


def test_resume_after_kill(tmp_path):
    from medlake.demo.synthetic import generate

    root = (tmp_path / "ws").resolve()
    (root / ".dvc").mkdir(parents=True)
    generate(root / "syn", n_captures=24, seed=3, modalities=("derm",))
    cat = Catalog(Workspace(root))
    ingest.run(cat, "generic", root / "syn" / "derm.yaml")
    n = fingerprint.run(cat)["fingerprinted"]
    # one LanceDB commit per batch here (the default commits 4,096 vectors at a time)
    code = ("from pathlib import Path; from catalog import Catalog, Workspace; from pipelines import embed; "
            "embed.COMMIT_ROWS = 4; "
            f"embed.run(Catalog(Workspace(Path({str(root)!r}))), batch_size=4, workers=0, "
            "echo=lambda m: print(m, flush=True))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    first = proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.startswith("embedded 4 of"), first
    vs = VectorStore(cat.ws.vectors_dir)
    done = len(vs.db.open_table(table_name("descriptor-v1")).to_arrow())
    assert 4 <= done < n, (done, n)
    res = embed.run(cat, batch_size=4, workers=0)
    assert res["embedded"] == n - done
    ids = vs.db.open_table(table_name("descriptor-v1")).to_arrow()["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == n


def test_ivf_pq_index_batched_search_with_refine(tmp_path):
    """ensure_index builds IVF_PQ once; search_many (refined) agrees with exact search."""
    from medlake.catalog.vectors import near_pairs

    rng = np.random.default_rng(5)
    v = rng.standard_normal((1200, 32)).astype(np.float32)
    v[600:] = v[:600] + 0.15 * rng.standard_normal((600, 32)).astype(np.float32)  # near copies
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    vs = VectorStore(tmp_path)
    ids = [f"d:{i}" for i in range(len(v))]
    vs.add("m", ids, ids, v)
    assert not vs.ensure_index("m", min_rows=5000)
    assert vs.ensure_index("m", min_rows=1000) and not vs.ensure_index("m", min_rows=1000)
    at = vs.search_many("m", v[:600], k=2, refine_factor=10)
    assert at.num_rows == 1200 and set(at["query"].to_pylist()) == set(range(600))
    got = {(q, h) for q, h in zip(at["query"].to_pylist(), at["image_id"].to_pylist(), strict=True)}
    exact = near_pairs(v, threshold=0.9)
    want = {(int(i), f"d:{int(j)}") for i, j, _ in exact if i < 600 and j == i + 600}
    assert len(want) > 500 and len(want & got) / len(want) >= 0.99
    sims = dict(zip(zip(at["query"].to_pylist(), at["image_id"].to_pylist(), strict=True),
                    at["similarity"].to_pylist(), strict=True))
    i, j = next(iter(want))
    assert abs(sims[(i, j)] - float(v[i] @ v[int(j[2:])])) < 1e-4
    assert vs.search("m", v[0], k=1)[0][0] == "d:0"


def test_loader_workers_same_vectors_no_hang(synth_lake, tmp_path):
    """workers=2 (fork-server workers) finishes in time and stores the workers=0 vectors."""
    import shutil

    root = tmp_path / "ws"
    # without its vectors (LanceDB, the embeddings table it is restored from, and
    # fingerprint's descriptor cache): every image is decoded by the workers
    shutil.copytree(synth_lake.ws.root, root,
                    ignore=shutil.ignore_patterns("vectors", "embeddings", "cache"))
    code = ("from pathlib import Path; from catalog import Catalog, Workspace; from pipelines import embed; "
            f"print(embed.run(Catalog(Workspace(Path({str(root)!r}))), batch_size=16, workers=2))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fork()" not in out.stderr  # no fork of this (multi-threaded) process
    n = len(synth_lake.read("fingerprints"))
    assert f"'embedded': {n}," in out.stdout, out.stdout
    ref_ids, ref = VectorStore(synth_lake.ws.vectors_dir).load("descriptor-v1")
    ids, mat = VectorStore(Catalog(Workspace(root)).ws.vectors_dir).load("descriptor-v1")
    assert ids == ref_ids and len(ids) == len(synth_lake.read("fingerprints"))
    np.testing.assert_allclose(mat, ref, atol=1e-6)


def test_prefetch_keeps_order_raises_and_stops():
    """The in-process loader thread: items in order, its error raised here, stopped on exit."""
    import threading

    assert list(embed.prefetch(iter(range(50)), depth=2)) == list(range(50))

    def boom():
        yield 1
        yield 2
        raise OSError("disk gone at item 3")

    got = []
    with pytest.raises(OSError, match="item 3"):
        got.extend(embed.prefetch(boom()))
    assert got == [1, 2]

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    gen = embed.prefetch(endless(), depth=2)
    assert [next(gen) for _ in range(3)] == [0, 1, 2]
    gen.close()  # the consumer stops early: the thread is told to stop and joined
    assert not any(t.name == "medlake-embed-prefetch" for t in threading.enumerate())
    n = len(produced)
    assert n <= 3 + 2 + 2  # taken + queue depth + one in hand: it did not run on


def test_descriptor_of_a_grey_image_equals_that_of_its_rgb_form():
    """The loader keeps grey files grey (no full-size RGB copy): the descriptor reduces them as
    grey and gets the vector of their RGB form exactly, at sizes that divide and that do not."""
    from PIL import Image

    from medlake.catalog.embedders import DescriptorEmbedder

    rng = np.random.default_rng(4)
    emb = DescriptorEmbedder()
    for h, w in ((64, 64), (97, 131), (1024, 1024), (300, 41)):
        grey = Image.fromarray((rng.random((h, w)) ** 2 * 255).astype(np.uint8), "L")
        got, ref = emb.embed([grey]), emb.embed([grey.convert("RGB")])
        assert np.array_equal(got, ref), (h, w)
        assert np.isclose(np.linalg.norm(got), 1.0)
