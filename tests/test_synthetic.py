"""The demo's synthetic generator: deterministic bytes, consistent ground truth, CLI."""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from medlake.catalog import CatalogError
from medlake.cli.main import main
from medlake.demo.synth_build import INTERPOLATIONS
from medlake.demo.synthetic import CROP_KINDS, KINDS, generate


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).astype(np.int16)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "s"
    generate(out, n_captures=120, seed=3, dup_rate=1.0)
    return out


def test_same_arguments_give_byte_identical_files(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", n_captures=30, seed=5)
    generate(tmp_path / "b", n_captures=30, seed=5)
    da, db = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert len(da) == a.n_images + 6  # 2 manifests, 2 YAMLs, 2 truth files
    assert da == db
    other = _digests(generate(tmp_path / "c", n_captures=30, seed=6).out_dir)
    assert other["images/derm/D00001.jpg"] != da["images/derm/D00001.jpg"]
    assert not list(tmp_path.glob(".*synth-tmp"))  # the temporary folder is gone


def test_truth_lists_every_file_once_and_manifests_match(synth: Path) -> None:
    truth = _read(synth / "truth_files.csv")
    on_disk = sorted(str(p.relative_to(synth)) for p in (synth / "images").rglob("*") if p.is_file())
    assert sorted(t["file"] for t in truth) == on_disk
    for m in ("derm", "cxr"):
        rows = _read(synth / f"{m}_manifest.csv")
        files = {t["file"] for t in truth if t["modality"] == m}
        assert {f"images/{m}/{r['path']}" for r in rows} == files
        assert len({r["image_id"] for r in rows}) == len(rows)
    roles = defaultdict(int)
    for t in truth:
        roles[t["role"]] += 1
    assert roles["corrupt"] == 2 and roles["outlier"] >= 6
    assert {t["transform"] for t in truth if t["role"] == "derived"} == set(KINDS)
    assert {t["crop"] for t in truth if t["role"] == "derived"} - {""} == set(CROP_KINDS)
    pairs = _read(synth / "truth_pairs.csv")
    by_file = {t["file"]: t for t in truth}
    for p in pairs:  # a pair's crop kind is its derived file's
        if p["kind"] not in ("sibling",):
            d = by_file[p["file_b"]] if by_file[p["file_b"]]["role"] == "derived" else by_file[p["file_a"]]
            assert p["crop"] == d["crop"]


def test_pairs_join_files_of_one_capture_only(synth: Path) -> None:
    truth = {t["file"]: t for t in _read(synth / "truth_files.csv")}
    pairs = _read(synth / "truth_pairs.csv")
    assert pairs
    for p in pairs:
        a, b = truth[p["file_a"]], truth[p["file_b"]]
        assert a["capture_id"] == b["capture_id"] == p["capture_id"] != ""
        assert p["file_a"] < p["file_b"]
    by_cap = defaultdict(int)
    for t in truth.values():
        if t["role"] in ("original", "derived"):
            by_cap[t["capture_id"]] += 1
    assert len(pairs) == sum(n * (n - 1) // 2 for n in by_cap.values())


def test_derived_files_are_the_transform_they_claim(synth: Path) -> None:
    truth = _read(synth / "truth_files.csv")
    orig = {t["capture_id"]: synth / t["file"] for t in truth if t["role"] == "original"}
    seen = set()
    for t in truth:
        if t["role"] != "derived":
            continue
        o, d = orig[t["capture_id"]], synth / t["file"]
        po, pd = _pixels(o), _pixels(d)
        kind = t["transform"]
        seen.add(kind)
        if kind == "exact":
            assert o.read_bytes() == d.read_bytes()
        elif kind == "resized":
            s = pd.shape[1] / po.shape[1]
            assert (0.29 <= s <= 0.91 or 1.09 <= s <= 1.61) and pd.shape[0] != po.shape[0]
            assert any(f"-{i}" in t["detail"] for i in INTERPOLATIONS)
        elif kind == "cropped":
            area = pd.shape[0] * pd.shape[1] / (po.shape[0] * po.shape[1])
            assert 0.38 <= area <= 0.92 and t["crop"] == "kept"
        elif kind == "crop_resized":
            how = t["crop"]
            assert how in CROP_KINDS and how != "kept" and "resize=" in t["detail"]
            if how == "to_original":
                assert pd.shape[:2] == po.shape[:2]
            elif how == "to_224":
                assert pd.shape[:2] == (224, 224)
            elif how == "to_small":
                assert pd.shape[0] == pd.shape[1] and 28 <= pd.shape[0] <= 64
        elif kind == "crop_combined":
            assert t["crop"] in CROP_KINDS and t["detail"].startswith("cropped(")
        elif kind == "mirrored":
            flipped = po[::-1] if "vertical" in t["detail"] else po[:, ::-1]
            assert np.abs(flipped - pd).mean() < 3.0
        elif kind in ("relit", "rotated", "reencoded"):
            assert pd.shape == po.shape and np.abs(po - pd).mean() > 0.2
            if kind == "reencoded":
                q = int(t["detail"].split("=")[1])
                assert d.suffix == ".jpg" and 30 <= q <= 95 and np.abs(po - pd).mean() < 10.0
    assert seen == set(KINDS)


def test_repeat_captures_look_alike_but_are_not_copies(synth: Path) -> None:
    truth = _read(synth / "truth_files.csv")
    groups = defaultdict(list)
    for t in truth:
        if t["role"] == "original":
            groups[(t["modality"], t["group_id"])].append(t)
    multi = [g for g in groups.values() if len(g) >= 2]
    assert multi, "no group with repeat captures"
    for g in multi[:10]:
        a, b = synth / g[0]["file"], synth / g[1]["file"]
        assert g[0]["capture_id"] != g[1]["capture_id"]
        assert a.read_bytes() != b.read_bytes()


def test_groups_leak_across_splits_and_sources_disagree(synth: Path) -> None:
    derm = _read(synth / "derm_manifest.csv")
    splits = defaultdict(set)
    for r in derm:
        if r["lesion_id"]:
            splits[r["lesion_id"]].add(r["split"])
    assert any(len(s) > 1 for s in splits.values())
    both = [r for r in derm if r["dx_histo"] and r["dx_clinic"] not in ("", "unknown")]
    disagree = sum(r["dx_histo"] != r["dx_clinic"] for r in both) / len(both)
    assert 0.05 < disagree < 0.5
    cxr = [r for r in _read(synth / "cxr_manifest.csv") if r["expert_effusion"]]
    cells = [(r[f"nlp_{f}"], r[f"expert_{f}"]) for r in cxr
             for f in ("effusion", "cardiomegaly", "nodule")]
    rate = sum(a != b for a, b in cells) / len(cells)
    assert 0.0 < rate < 0.3


def test_corrupt_file_does_not_decode_and_outliers_do(synth: Path) -> None:
    truth = _read(synth / "truth_files.csv")
    for t in truth:
        if t["role"] == "corrupt":
            with pytest.raises(OSError), Image.open(synth / t["file"]) as im:
                im.load()
        elif t["role"] == "outlier":
            assert _pixels(synth / t["file"]).size > 0


def test_adapter_yaml_names_manifest_columns(synth: Path) -> None:
    for m in ("derm", "cxr"):
        cfg = yaml.safe_load((synth / f"{m}.yaml").read_text())
        header = set(_read(synth / cfg["manifest"])[0])
        assert set(cfg["columns"].values()) <= header
        assert {lab["column"] for lab in cfg["labels"]} <= header
        assert set(cfg["meta_columns"]) <= header
        assert (synth / cfg["images_root"]).is_dir()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="too small"):
        generate(tmp_path / "x", n_captures=1)
    with pytest.raises(CatalogError, match="unknown modalities"):
        generate(tmp_path / "x", n_captures=10, modalities=("mri",))
    assert not (tmp_path / "x").exists()


def test_cli_writes_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = CliRunner().invoke(main, ["synth", str(out), "--captures", "8", "--modality", "cxr"])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and (out / "cxr.yaml").is_file() and not (out / "derm.yaml").exists()
    before = _digests(out)
    r = CliRunner().invoke(main, ["synth", str(out), "--captures", "8"])
    assert r.exit_code == 1 and "already exists" in r.output
    assert _digests(out) == before
    r = CliRunner().invoke(main, ["synth", str(out), "--captures", "8", "--overwrite"])
    assert r.exit_code == 0 and (out / "derm.yaml").is_file()


def test_generic_adapter_ingests_the_output(synth: Path, catalog) -> None:
    from medlake.pipelines import adapters, ingest

    if "generic" not in adapters.registry():
        pytest.skip("the generic adapter is not in this checkout yet")
    ingest.run(catalog, "generic", synth / "derm.yaml")
    rows = _read(synth / "derm_manifest.csv")
    ingested = set(catalog.read("images")["native_id"].to_list())
    q = catalog.read("quarantine")
    bad_rows = {int(r) for r in q["row"].drop_nulls().to_list()} if len(q) else set()
    # rows in = rows ingested + rows quarantined: no manifest row is lost
    assert ingested | {rows[i - 1]["image_id"] for i in bad_rows} == {r["image_id"] for r in rows}
