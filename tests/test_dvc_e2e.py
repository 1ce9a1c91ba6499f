"""End to end with real git and DVC: repro, push to a local remote (the demo's push), clone,
pull one version, ``dvc import`` it into a third repository and read its manifest with
``dvc.api.open``; a packed version (``pack: shards``) pulled into a fresh clone unpacks to
byte-identical images."""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl
import pytest
import yaml
from versions_helpers import BIN, sh, tree_digest

from medlake.catalog import Workspace
from medlake.catalog.versions import load_version

REPO = Path(__file__).resolve().parents[1]
VERSION = "lake/versions/synth-derm-clean"
PACKED = "lake/versions/synth-derm-packed"
TABLES = ["datasets", "images", "sources", "annotations", "coverage", "splits", "findings",
          "versions", "quarantine"]


def dvc(*args: str, cwd: Path) -> str:
    return sh(str(BIN / "dvc"), *args, cwd=cwd)


def git_user(cwd: Path) -> None:
    sh("git", "config", "user.email", "test@example.org", cwd=cwd)
    sh("git", "config", "user.name", "medlake test", cwd=cwd)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory) -> dict:
    from medlake.demo.synthetic import generate

    base = tmp_path_factory.mktemp("e2e")
    ws = Workspace.init(base / "ws")
    root = ws.root
    git_user(root)
    generate(root / "data/synthetic", n_captures=30, seed=1, modalities=("derm",))
    recipe = (REPO / "recipes/synth-derm-clean.yaml").read_text()
    (root / "recipes/synth-derm-clean.yaml").write_text(recipe)
    assert "npz: dx}" in recipe
    (root / "recipes/synth-derm-packed.yaml").write_text(
        recipe.replace("npz: dx}", "npz: dx, pack: shards, shard_mb: 1}"))
    (root / "params.yaml").write_text(yaml.safe_dump({
        "leakage": {"pairs": {}},
        "materialize": {"processes": 1, "recipes": ["synth-derm-clean", "synth-derm-packed"]}}))
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    stages["ingest"] = {"cmd": "medlake ingest generic data/synthetic/derm.yaml",
                        "deps": ["data/synthetic"],
                        "outs": [f"lake/tables/{t}/ingest" for t in TABLES]}
    for s in ("leakage", "materialize"):
        stages[s].pop("params", None)
        (stages[s].get("do") or stages[s])["deps"] = [
            d for d in (stages[s].get("do") or stages[s])["deps"] if not d.startswith("pipelines")]
        (stages[s].get("do") or stages[s]).pop("params", None)
    stages = {k: stages[k] for k in ("ingest", "leakage", "materialize")}
    made = {o for st in stages.values() for o in (st.get("do") or st).get("outs", [])}
    for st in stages.values():  # no duplicates/outliers/fingerprint stages in this workspace
        body = st.get("do") or st
        body["deps"] = [d for d in body["deps"] if not d.startswith("lake/") or d in made]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    dvc("repro", cwd=root)
    status = dvc("status", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "demo", cwd=root)
    from medlake.catalog import Catalog
    from medlake.demo.runner import push

    msg = push(Catalog(ws))
    assert msg.startswith("dvc push:") and "commit dvc.lock" in msg
    return {"base": base, "root": root, "status": status}


def test_repro_is_clean_and_version_built(pushed) -> None:
    assert "up to date" in pushed["status"]
    m = load_version(pushed["root"] / VERSION)
    assert m.height > 0 and m.group_by("group_id").agg(pl.col("split").n_unique())["split"].max() == 1


def test_clone_pull_one_version_is_byte_identical(pushed) -> None:
    clone = pushed["base"] / "clone"
    sh("git", "clone", "-q", str(pushed["root"]), str(clone), cwd=pushed["base"])
    dvc("pull", "materialize@synth-derm-clean", cwd=clone)
    assert tree_digest(clone / VERSION) == tree_digest(pushed["root"] / VERSION)
    assert not (clone / "lake/tables/images").exists()  # only the one version was pulled
    assert load_version(clone / VERSION).equals(load_version(pushed["root"] / VERSION))


def test_import_and_api_open(pushed) -> None:
    third = pushed["base"] / "third"
    third.mkdir()
    sh("git", "init", "-q", cwd=third)
    git_user(third)
    dvc("init", "-q", cwd=third)
    (third / "got").mkdir()
    dvc("import", str(pushed["root"]), f"{VERSION}/manifest.parquet", "-o",
        "got/manifest.parquet", cwd=third)
    src = (pushed["root"] / VERSION / "manifest.parquet").read_bytes()
    assert (third / "got/manifest.parquet").read_bytes() == src
    from dvc import api as dvc_api

    with dvc_api.open(f"{VERSION}/manifest.parquet", repo=str(pushed["root"]), mode="rb") as fh:
        data = fh.read()
    assert data == src
    assert pl.read_parquet(io.BytesIO(data)).height == load_version(pushed["root"] / VERSION).height


def test_packed_version_pull_unpack_is_byte_identical(pushed) -> None:
    from medlake.catalog.shards import is_packed, unpack
    from medlake.catalog.versions import VersionDataset

    root = pushed["root"]
    assert is_packed(root / PACKED) and not (root / PACKED / "images").exists()
    assert len(list((root / PACKED / "shards").glob("*.tar"))) >= 1
    clone = pushed["base"] / "clone_packed"
    sh("git", "clone", "-q", str(root), str(clone), cwd=pushed["base"])
    dvc("pull", "materialize@synth-derm-packed", cwd=clone)
    assert tree_digest(clone / PACKED) == tree_digest(root / PACKED)
    plain = load_version(root / VERSION)
    assert load_version(clone / PACKED).equals(plain)  # same rows and file paths
    n = unpack(clone / PACKED, pushed["base"] / "unpacked")
    want = {k: v for k, v in tree_digest(root / VERSION).items() if k.startswith("images")}
    assert n == len(want) and tree_digest(pushed["base"] / "unpacked") == want
    ds = VersionDataset(clone / PACKED, "train", size=28)
    ref = VersionDataset(root / VERSION, "train", size=28)
    assert len(ds) == len(ref) > 0 and (ds[0][0] == ref[0][0]).all() and ds[0][1] == ref[0][1]
