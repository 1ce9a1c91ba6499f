"""End to end with real git and DVC, as a new user works: ``medlake init``, ingest, a recipe,
``dvc repro`` of the generated pipeline, ``medlake publish`` (commit, push to a local remote,
tag); then a fresh clone pulls every output byte-identically, one version is pulled without
medlake on PATH, ``dvc import --rev TAG`` from a bare clone, ``dvc update`` to a second
published version, ``dvc.api.open`` / ``DVCFileSystem`` at a tag, a packed version unpacks to
byte-identical images, and the privacy gate refuses identifying DICOM tags."""

from __future__ import annotations

import io
import os
from pathlib import Path

import polars as pl
import pytest
import yaml
from versions_helpers import BIN, sh, tree_digest

from medlake.catalog.versions import load_version

REPO = Path(__file__).resolve().parents[1]
VERSION = "lake/versions/synth-derm-clean"
PACKED = "lake/versions/synth-derm-packed"


def dvc(*args: str, cwd: Path) -> str:
    return sh(str(BIN / "dvc"), *args, cwd=cwd)


def medlake(*args: str, cwd: Path) -> str:
    return sh(str(BIN / "medlake"), *args, cwd=cwd)


def bare_dvc(*args: str, cwd: Path) -> str:
    """DVC as a consumer runs it: no medlake on PATH (only the system's folders)."""
    import subprocess

    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    r = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, capture_output=True, text=True,
                       env=env, check=False)
    assert r.returncode == 0, f"dvc {' '.join(args)}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout + r.stderr


def git_user(cwd: Path) -> None:
    sh("git", "config", "user.email", "test@example.org", cwd=cwd)
    sh("git", "config", "user.name", "medlake test", cwd=cwd)


def outs(root: Path) -> list[str]:
    """Every output path of the workspace's pipeline (from dvc.lock)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return sorted({o["path"] for st in lock.values() for o in st.get("outs", [])})


@pytest.fixture(scope="module")
def pushed(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("e2e")
    medlake("init", "ws", cwd=base)
    root = base / "ws"
    git_user(root)
    medlake("synth", "data/synthetic", "--captures", "30", "--seed", "1", "--modality", "derm",
            cwd=root)
    medlake("ingest", "generic", "data/synthetic/derm.yaml", cwd=root)
    recipe = (REPO / "recipes/synth-derm-clean.yaml").read_text()
    (root / "recipes/synth-derm-clean.yaml").write_text(recipe)
    assert "npz: dx}" in recipe
    (root / "recipes/synth-derm-packed.yaml").write_text(
        recipe.replace("npz: dx}", "npz: dx, pack: shards, shard_mb: 1}"))
    for name in ("synth-derm-clean", "synth-derm-packed"):
        medlake("materialize", name, cwd=root)  # adds it to the pipeline
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["materialize"]["recipes"] == ["synth-derm-clean", "synth-derm-packed"]
    assert params["ingest"] == [{"format": "generic", "path": "data/synthetic/derm.yaml"}]
    dvc("add", "data", cwd=root)  # the raw inputs are versioned too (data.dvc), as in a registry
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "workspace", cwd=root)
    dvc("repro", cwd=root)
    status = dvc("status", cwd=root)
    out1 = medlake("publish", "synth-derm-clean", cwd=root)
    out2 = medlake("publish", "synth-derm-packed", cwd=root)
    dvc("push", cwd=root)  # every output, for the full clone below
    return {"base": base, "root": root, "status": status, "publish": out1 + out2}


def test_repro_is_clean_and_version_built(pushed) -> None:
    assert "up to date" in pushed["status"]
    m = load_version(pushed["root"] / VERSION)
    assert m.height > 0 and m.group_by("group_id").agg(pl.col("split").n_unique())["split"].max() == 1
    assert "synth-derm-clean@v1" in pushed["publish"] and "synth-derm-packed@v1" in pushed["publish"]
    tags = sh("git", "tag", cwd=pushed["root"]).split()
    assert {"synth-derm-clean@v1", "synth-derm-packed@v1"} <= set(tags)
    assert "up to date" in dvc("status", cwd=pushed["root"])  # publishing changed nothing


def test_fresh_clone_pulls_every_output_byte_identically(pushed) -> None:
    root = pushed["root"]
    clone = pushed["base"] / "full"
    sh("git", "clone", "-q", str(root), str(clone), cwd=pushed["base"])
    bare_dvc("pull", cwd=clone)
    assert tree_digest(clone / "data") == tree_digest(root / "data")
    paths = outs(root)
    assert len(paths) > 20
    for o in paths:
        a, b = root / o, clone / o
        if a.is_dir():
            assert tree_digest(b) == tree_digest(a), o
        else:
            assert b.read_bytes() == a.read_bytes(), o
    assert "up to date" in dvc("status", cwd=clone)


def test_clone_pull_one_version_is_byte_identical(pushed) -> None:
    clone = pushed["base"] / "clone"
    sh("git", "clone", "-q", str(pushed["root"]), str(clone), cwd=pushed["base"])
    bare_dvc("pull", VERSION, cwd=clone)  # by path, without medlake
    assert tree_digest(clone / VERSION) == tree_digest(pushed["root"] / VERSION)
    assert not (clone / "lake/tables/images").exists()  # only the one version was pulled
    assert load_version(clone / VERSION).equals(load_version(pushed["root"] / VERSION))


def test_api_open_and_dvcfilesystem_at_a_tag(pushed) -> None:
    root = pushed["root"]
    from dvc import api as dvc_api
    from dvc.api import DVCFileSystem

    src = (root / VERSION / "manifest.parquet").read_bytes()
    with dvc_api.open(f"{VERSION}/manifest.parquet", repo=str(root), mode="rb") as fh:
        data = fh.read()
    assert data == src
    assert pl.read_parquet(io.BytesIO(data)).height == load_version(root / VERSION).height
    fs = DVCFileSystem(str(root), rev="synth-derm-packed@v1")
    assert "manifest.parquet" in {Path(p).name for p in fs.ls(PACKED, detail=False)}
    with fs.open(f"{PACKED}/manifest.parquet", "rb") as fh:
        assert fh.read() == (root / PACKED / "manifest.parquet").read_bytes()


def test_packed_version_pull_unpack_is_byte_identical(pushed) -> None:
    from medlake.catalog.shards import is_packed, unpack
    from medlake.catalog.versions import VersionDataset

    root = pushed["root"]
    assert is_packed(root / PACKED) and not (root / PACKED / "images").exists()
    assert len(list((root / PACKED / "shards").glob("*.tar"))) >= 1
    clone = pushed["base"] / "clone_packed"
    sh("git", "clone", "-q", str(root), str(clone), cwd=pushed["base"])
    bare_dvc("pull", "materialize@synth-derm-packed", cwd=clone)
    assert tree_digest(clone / PACKED) == tree_digest(root / PACKED)
    plain = load_version(root / VERSION)
    assert load_version(clone / PACKED).equals(plain)  # same rows and file paths
    n = unpack(clone / PACKED, pushed["base"] / "unpacked")
    want = {k: v for k, v in tree_digest(root / VERSION).items() if k.startswith("images")}
    assert n == len(want) and tree_digest(pushed["base"] / "unpacked") == want
    ds = VersionDataset(clone / PACKED, "train", size=28)
    ref = VersionDataset(root / VERSION, "train", size=28)
    assert len(ds) == len(ref) > 0 and (ds[0][0] == ref[0][0]).all() and ds[0][1] == ref[0][1]


def test_import_by_tag_from_a_bare_clone_then_update(pushed) -> None:
    """Last in this module: it publishes a second version of synth-derm-clean."""
    root, base = pushed["root"], pushed["base"]
    bare = base / "hosted.git"
    sh("git", "clone", "-q", "--bare", str(root), str(bare), cwd=base)
    third = base / "third"
    third.mkdir()
    sh("git", "init", "-q", cwd=third)
    git_user(third)
    bare_dvc("init", "-q", cwd=third)
    (third / "lake/versions").mkdir(parents=True)  # dvc import needs the parent folder
    bare_dvc("import", str(bare), VERSION, "-o", VERSION, "--rev", "synth-derm-clean@v1",
             cwd=third)
    v1 = tree_digest(root / VERSION)
    assert tree_digest(third / VERSION) == v1
    # a second published version (changed recipe), brought in by 'dvc update'
    rec = root / "recipes/synth-derm-clean.yaml"
    rec.write_text(rec.read_text().replace("seed: 0", "seed: 1"))
    assert "seed: 1" in rec.read_text()
    out = medlake("publish", "synth-derm-clean", cwd=root)
    assert "synth-derm-clean@v2" in out
    v2 = tree_digest(root / VERSION)
    assert v2 != v1
    sh("git", "push", "-q", str(bare), "--all", cwd=root)
    sh("git", "push", "-q", str(bare), "--tags", cwd=root)
    bare_dvc("update", "--rev", "synth-derm-clean@v2", f"{VERSION}.dvc", cwd=third)
    assert tree_digest(third / VERSION) == v2
