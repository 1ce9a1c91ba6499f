"""Recipe rules that read reviews and fingerprints, and packed (sharded) versions."""

from __future__ import annotations

import hashlib
import json
import tarfile

import polars as pl
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from versions_helpers import TOY_RECIPE, build_toy, tree_digest, write_recipe

from medlake.catalog import Catalog, CatalogError, shards
from medlake.catalog import reviews as rv
from medlake.catalog.recipes import RecipeError, parse_recipe
from medlake.catalog.versions import VersionDataset, load_version
from medlake.cli.main import main as cli
from medlake.pipelines import materialize

BASE = """
dataset: toy
parent: toy@orig
labels:
  dx: "toy:dx/dx"
"""


def lineage(cat: Catalog, name: str) -> pl.DataFrame:
    return pl.read_parquet(cat.ws.versions_dir / name / "lineage.parquet")


def test_exclude_verdict_different_keeps_both_images_of_the_pair(catalog: Catalog) -> None:
    build_toy(catalog)
    c1 = sorted(catalog.read("clusters").filter(pl.col("cluster_id") == "c1")["image_id"])
    rules = "rules:\n  - duplicates: {mode: keep_one}\n"
    write_recipe(catalog, "plain", BASE + rules)
    write_recipe(catalog, "reviewed", BASE + "duplicates: {exclude_verdict: different}\n" + rules)
    # an older 'duplicate' verdict is overridden by a newer 'different' one (latest counts)
    rv.record(catalog, rv.pair_verdict(c1[0], c1[1], "duplicate", "ana"))
    rv.record(catalog, rv.pair_verdict(c1[1], c1[0], "different", "bo"))
    m_plain = load_version(materialize.run(catalog, "plain").path)
    m_rev = load_version(materialize.run(catalog, "reviewed").path)
    assert len(set(c1) & set(m_plain["image_id"])) == 1  # merged without the verdict
    assert set(c1) <= set(m_rev["image_id"])  # both kept with it
    lin = lineage(catalog, "reviewed").filter(pl.col("image_id").is_in(c1))
    rows = lin.filter(pl.col("rule") == "reviews")
    assert rows.height == 2 and set(rows["action"]) == {"kept"}
    assert all("judged 'different' by bo" in r for r in rows["reason"])
    assert json.loads(rows["evidence"][0])["pairs"][0]["verdict"] == "different"
    assert lin.filter(pl.col("action") == "merged").height == 0
    # the conflicting cluster c2 (no verdict) is still dropped whole
    c2 = catalog.read("clusters").filter(pl.col("cluster_id") == "c2")["image_id"].to_list()
    assert not set(c2) & set(m_rev["image_id"])
    # a later 'duplicate' verdict restores the merge
    rv.record(catalog, rv.pair_verdict(c1[0], c1[1], "duplicate", "ana"))
    assert len(set(c1) & set(load_version(materialize.run(catalog, "reviewed").path)["image_id"])) == 1


def test_exclude_verdict_recomputes_clusters_from_pairs(catalog: Catalog) -> None:
    """Cluster a-b-c from pairs a~b, b~c; 'different' on a~b splits off a (b, c merge)."""
    build_toy(catalog, clusters=False)
    nev = (catalog.read("annotations").filter((pl.col("source_id") == "toy:dx")
                                              & (pl.col("category") == "nevus"))["image_id"])
    a, b, c = sorted(nev)[:3]
    catalog.write("pairs", [{"image_a": a, "image_b": b, "method": "phash", "verified": True},
                            {"image_a": b, "image_b": c, "method": "phash", "verified": True}],
                  stage="duplicates")
    catalog.write("clusters", [{"image_id": x, "cluster_id": f"dup:{a}"} for x in (a, b, c)],
                  stage="duplicates")
    rv.record(catalog, rv.pair_verdict(a, b, "different", "ana"))
    write_recipe(catalog, "r", BASE + "duplicates: {exclude_verdict: [different]}\n"
                 "rules: [{duplicates: {mode: keep_one}}]\n")
    m = load_version(materialize.run(catalog, "r").path)
    kept = {a, b, c} & set(m["image_id"])
    assert a in kept and len(kept) == 2  # b and c still merge into one
    lin = lineage(catalog, "r")
    assert set(lin.filter(pl.col("rule") == "reviews")["image_id"]) == {a, b}


@pytest.mark.parametrize("action", ["drop", "set"])
def test_relabel_from_reviews(catalog: Catalog, action: str) -> None:
    build_toy(catalog, clusters=False)
    ann = catalog.read("annotations").filter((pl.col("source_id") == "toy:dx")
                                             & pl.col("category").is_not_null()).sort("image_id")
    x, y, z = ann["image_id"][:3].to_list()
    rv.record(catalog, [rv.label_verdict(x, "toy:dx", "dx", "wrong", "ana", label="nevus"),
                        rv.label_verdict(y, "toy:dx", "dx", "wrong", "ana"),
                        rv.label_verdict(z, "toy:dx", "dx", "wrong", "ana")])
    rv.record(catalog, rv.label_verdict(y, "toy:dx", "dx", "correct", "bo"))  # newer: counts
    extra = ", value: bcc" if action == "set" else ""
    write_recipe(catalog, "r", BASE + f"rules: [{{relabel_from_reviews: {{action: {action}{extra}}}}}]\n")
    res = materialize.run(catalog, "r")
    m = load_version(res.path)
    lin = lineage(catalog, "r").filter(pl.col("rule") == "relabel_from_reviews")
    hit = set(lin["image_id"])
    assert y not in hit and y in set(m["image_id"])
    if action == "drop":
        assert hit == {x, z} and not hit & set(m["image_id"])
        assert set(lin["action"]) == {"removed"}
        assert res.n_kept + 2 == res.n_parent
    else:
        changed = {i for i in (x, z) if ann.filter(pl.col("image_id") == i)["category"][0] != "bcc"}
        assert hit == changed and set(lin["action"]) <= {"relabelled"}
        assert m.filter(pl.col("image_id").is_in([x, z]))["dx"].to_list() == ["bcc", "bcc"]
        assert set(lin["new_value"]) <= {"bcc"}
    assert all("judged 'wrong' by ana (latest verdict)" in r for r in lin["reason"])


def test_flip_needs_binary_labels(catalog: Catalog) -> None:
    build_toy(catalog, clusters=False)
    iid = catalog.read("images")["image_id"][0]
    rv.record(catalog, rv.label_verdict(iid, "toy:dx", "dx", "wrong", "ana"))
    write_recipe(catalog, "r", BASE + "rules: [{relabel_from_reviews: {action: flip}}]\n")
    with pytest.raises(RecipeError, match="binary label"):
        materialize.run(catalog, "r")


def test_drop_quality(catalog: Catalog) -> None:
    build_toy(catalog, clusters=False)
    ids = catalog.read("images").sort("image_id")["image_id"].to_list()
    flags = {ids[0]: "dark", ids[1]: "blurry,dark", ids[2]: "tiny", ids[3]: ""}
    catalog.write("fingerprints", [{"image_id": i, "dataset_id": "toy", "flags": f}
                                   for i, f in flags.items()], stage="fingerprint")
    write_recipe(catalog, "q", BASE + "rules: [{drop_quality: [blurry, dark]}]\n")
    res = materialize.run(catalog, "q")
    lin = lineage(catalog, "q").filter(pl.col("rule") == "drop_quality").sort("image_id")
    assert lin["image_id"].to_list() == ids[:2]
    assert lin["reason"].to_list() == ["dark", "blurry"]  # the recipe's order decides
    assert res.n_kept + 2 == res.n_parent
    assert "table:fingerprints" in json.loads((res.path / "version.json").read_text())["inputs"]


def test_new_rule_errors_are_clear() -> None:
    with pytest.raises(RecipeError, match="unknown: \\['too_dark'\\]"):
        parse_recipe({"dataset": "d", "parent": "p", "rules": [{"drop_quality": ["too_dark"]}]})
    with pytest.raises(RecipeError, match="needs 'value'"):
        parse_recipe({"dataset": "d", "parent": "p", "labels": {"dx": "d:dx"},
                      "rules": [{"relabel_from_reviews": {"action": "set"}}]})
    with pytest.raises(RecipeError, match="exclude_verdict"):
        parse_recipe({"dataset": "d", "parent": "p", "duplicates": {"exclude_verdict": "duplicate"}})
    with pytest.raises(RecipeError, match="export.pack"):
        parse_recipe({"dataset": "d", "parent": "p", "export": {"pack": "zip"}})


def test_summary_wording(catalog: Catalog) -> None:
    write_recipe(catalog, "absent", "dataset: nope\nparent: nope@x\n")
    text = materialize.run(catalog, "absent").summary()
    assert text.startswith("version 'absent' skipped: dataset 'nope' has no images")
    assert text.endswith("(also in the quarantine table)") and "list entries" not in text
    build_toy(catalog, clusters=False)
    (catalog.ws.root / "drop.txt").write_text("T001\nZZZ\nYYY\n")
    write_recipe(catalog, "d", BASE + "export: {images: false}\n"
                 "rules: [{drop_outliers: {list: drop.txt}}]\n")
    text = materialize.run(catalog, "d").summary()
    assert text.endswith("; 2 rows quarantined (see the quarantine table)")


def test_no_reviews_table_is_fine(catalog: Catalog) -> None:
    build_toy(catalog)
    write_recipe(catalog, "r", BASE + "duplicates: {exclude_verdict: different}\n"
                 "rules: [{relabel_from_reviews: {}}]\n")
    res = materialize.run(catalog, "r")
    assert res.n_kept == res.n_parent


PACKED = TOY_RECIPE.replace("export: {images: true, sizes: [8, 16], npz: dx}",
                            "export: {images: true, sizes: [8, 16], npz: dx, pack: shards, "
                            "shard_mb: 1}")


def test_packed_version_reads_like_plain(catalog: Catalog, tmp_path) -> None:
    build_toy(catalog, n_groups=40)
    write_recipe(catalog, "plain", TOY_RECIPE)
    write_recipe(catalog, "packed", PACKED)
    plain = materialize.run(catalog, "plain").path
    res = materialize.run(catalog, "packed")
    packed = res.path
    assert not (packed / "images").exists() and shards.is_packed(packed)
    assert load_version(packed).equals(load_version(plain))  # same paths, now in shards
    idx = shards.index(packed)
    m = load_version(packed)
    assert set(idx) == set(m["file"]) | set(m["file_8"]) | set(m["file_16"])
    assert res.files["packed"] == len(idx)
    # each indexed file equals the plain version's file, byte for byte, read from the shard
    for f in sorted(idx):
        assert shards.read_bytes(packed, f, idx) == (plain / f).read_bytes()
    # the shards are ordinary tar files (tar -x works too)
    with tarfile.open(packed / "shards" / "images-00000.tar") as tf:
        assert tf.getnames() == sorted(tf.getnames())
    # torch dataset reads straight from the shards
    a, b = VersionDataset(plain, "train", size=16), VersionDataset(packed, "train", size=16)
    assert len(a) == len(b) and all((a[i][0] == b[i][0]).all() for i in range(len(a)))
    # the .npz is the same as the plain version's
    assert (packed / "packed_8.npz").read_bytes() == (plain / "plain_8.npz").read_bytes()
    # re-run: byte-identical shards and index
    before = tree_digest(packed)
    materialize.run(catalog, "packed")
    assert tree_digest(packed) == before
    # unpack (CLI) elsewhere gives the plain version's image tree
    out = tmp_path / "unpacked"
    r = CliRunner().invoke(cli, ["unpack", str(packed), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert f"{len(idx):,} files written" in r.output
    assert tree_digest(out) == {k: v for k, v in tree_digest(plain).items()
                               if k.startswith("images")}
    # by name in the workspace (--workspace), and a clear error for an unknown name
    ws = ["--workspace", str(catalog.ws.root)]
    r = CliRunner().invoke(cli, ["unpack", "packed", "--out", str(tmp_path / "by_name"), *ws])
    assert r.exit_code == 0, r.output
    assert tree_digest(tmp_path / "by_name") == tree_digest(out)
    r = CliRunner().invoke(cli, ["unpack", "no-such-version", *ws])
    assert r.exit_code != 0 and "no version folder 'no-such-version'" in r.output


def test_unpack_detects_corruption(catalog: Catalog, tmp_path) -> None:
    build_toy(catalog)
    write_recipe(catalog, "packed", PACKED)
    packed = materialize.run(catalog, "packed").path
    shard = packed / "shards" / "images-00000.tar"
    name, (_, off, _, digest) = min(shards.index(packed).items())
    data = bytearray(shard.read_bytes())
    data[off] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert hashlib.sha256(shards.read_bytes(packed, name)).hexdigest() != digest
    with pytest.raises(CatalogError, match="does not match its sha256"):
        shards.unpack(packed, tmp_path / "out")
    r = CliRunner().invoke(cli, ["unpack", str(packed), "--out", str(tmp_path / "o2")])
    assert r.exit_code == 1 and "does not match its sha256" in r.output
    shard.unlink()
    with pytest.raises(CatalogError, match="missing"):
        shards.read_bytes(packed, name)


def test_pack_splits_shards_and_indexes_offsets(tmp_path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    root = tmp_path / "v"
    blobs = {f"images/a/{i}.bin": rng.bytes(400_000 + i) for i in range(5)}
    for rel, data in blobs.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    res = shards.pack(root, ["images", "images_28"], shard_mb=1)
    assert res.files == 5 and res.shards == 3 and res.bytes == sum(map(len, blobs.values()))
    assert not (root / "images").exists()
    idx = shards.index(root)
    assert {k: shards.read_bytes(root, k, idx) for k in idx} == blobs
    for s in sorted((root / "shards").glob("*.tar")):
        assert s.stat().st_size <= 1024 * 1024 + 10240  # soft limit plus tar's end record
        with tarfile.open(s) as tf:
            for ti in tf.getmembers():
                assert (ti.mtime, ti.uid, ti.gid, ti.mode) == (0, 0, 0, 0o644)
                assert tf.extractfile(ti).read() == blobs[ti.name]
    with pytest.raises(CatalogError, match="not a packed version"):
        shards.index(tmp_path)


@st.composite
def judged_graphs(draw):
    n = draw(st.integers(3, 12))
    edges = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)),
                          min_size=1, max_size=2 * n))
    edges = sorted({(min(a, b), max(a, b)) for a, b in edges if a != b}) or [(0, 1)]
    judged = draw(st.lists(st.sampled_from(edges), unique=True))
    return n, edges, judged


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
@given(g=judged_graphs())
def test_pairs_judged_different_are_never_merged_property(tmp_path_factory, g) -> None:
    """No image is lost, and a pair judged different is never merged one into the other
    unless undisputed pairs still connect the two images."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from medlake.catalog import Workspace

    n, edges, judged = g
    root = tmp_path_factory.mktemp("prop") / "ws"
    (root / ".dvc").mkdir(parents=True)
    cat = Catalog(Workspace(root.resolve()))
    ids = [f"p:{i:02d}" for i in range(n)]
    with cat.transaction() as tx:
        tx.write("images", [{"image_id": x, "dataset_id": "p", "native_id": x[2:], "width": 10,
                             "height": 10 + i} for i, x in enumerate(ids)], stage="ingest")
        tx.write("splits", [{"image_id": x, "dataset_id": "p", "scheme": "s", "split": "train"}
                            for x in ids], stage="ingest")
        tx.write("annotations", [{"image_id": x, "source_id": "p:l", "annotator": "",
                                  "finding": "l", "category": "a"} for x in ids], stage="ingest")
        tx.write("versions", [{"name": "p@s", "dataset_id": "p", "kind": "root", "scheme": "s"}],
                 stage="ingest")
    cat.write("pairs", [{"image_a": ids[a], "image_b": ids[b], "method": "phash",
                         "verified": True} for a, b in edges], stage="duplicates")
    comp = connected_components(coo_matrix(([1] * len(edges), ([a for a, _ in edges],
                                                              [b for _, b in edges])),
                                           shape=(n, n)), directed=False)[1]
    cat.write("clusters", [{"image_id": ids[i], "cluster_id": f"c{comp[i]}"} for i in range(n)],
              stage="duplicates")
    if judged:
        rv.record(cat, [rv.pair_verdict(ids[a], ids[b], "different", "r") for a, b in judged])
    write_recipe(cat, "v", "dataset: p\nparent: p@s\nlabels: {l: 'p:l'}\n"
                 "duplicates: {exclude_verdict: different}\nexport: {images: false}\n"
                 "rules: [{duplicates: {mode: keep_one}}]\n")
    res = materialize.run(cat, "v")
    lin = lineage(cat, "v")
    merged = lin.filter(pl.col("action") == "merged")
    assert res.n_kept + merged.height == n  # nothing lost: kept + merged = parent
    rest = [e for e in edges if e not in set(judged)]
    comp2 = connected_components(coo_matrix(([1] * len(rest), ([a for a, _ in rest],
                                                              [b for _, b in rest])),
                                            shape=(n, n)), directed=False)[1]
    into = dict(zip(merged["image_id"], merged["into"]))
    for a, b in judged:
        if comp2[a] != comp2[b]:
            assert into.get(ids[a]) != ids[b] and into.get(ids[b]) != ids[a]
    # merges happen exactly within the components of the undisputed pairs
    for x, rep in into.items():
        assert comp2[ids.index(x)] == comp2[ids.index(rep)]
    assert res.n_kept == len(set(comp2))
