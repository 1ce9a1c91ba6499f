"""Issue 13 (security/robustness audit): dataset ids, export file names and verification,
and bad ingest input. Real Parquet, real image files, in tmp workspaces."""

from __future__ import annotations

import codecs
import hashlib
import os
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from medlake.catalog import Catalog, CatalogError, IngestError, SchemaError, shards
from medlake.catalog.ingestkit import DATASET_ID_PATTERN, MAX_ID_LENGTH, check_dataset_id
from medlake.catalog.versions import load_version
from medlake.pipelines import ingest, materialize
from medlake.pipelines.export import MAX_NAME, UNKNOWN, decode_name, encode_name

RNG = np.random.default_rng(13)
HEAD = "image_id,file,split,age,dx,note"


def png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def dataset(cat: Catalog, rows: list[str], *, name: str = "hard", head: str = HEAD,
            raw: bytes | None = None, images: bool = True, **extra: object) -> Path:
    """A generic-adapter dataset under ``<ws>/data/<name>/``: YAML, manifest, one PNG per row
    whose file column is set. ``raw`` replaces the manifest's bytes (encodings)."""
    root = cat.ws.root / "data" / name
    (root / "img").mkdir(parents=True, exist_ok=True)
    text = "\n".join([head, *rows]) + "\n"
    (root / "m.csv").write_bytes(raw if raw is not None else text.encode("utf-8"))
    if images:
        cols = head.split(",")
        for i, line in enumerate(rows):
            cells = line.split(",")
            if "file" in cols and len(cells) > cols.index("file") and cells[cols.index("file")]:
                f = root / "img" / cells[cols.index("file")]
                if not f.exists():
                    png(f, seed=i)
    cfg = {"dataset": name, "images_root": "img", "manifest": "m.csv",
           "columns": {"id": "image_id", "path": "file", "split": "split", "age": "age"},
           "labels": [{"column": "dx", "source": "clinic", "finding": "diagnosis",
                       "value_type": "category"}], **extra}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root / "cfg.yaml"


def quarantine(cat: Catalog) -> dict[int, str]:
    q = cat.read("quarantine").sort("row")
    return dict(zip(q["row"].to_list(), q["reason"].to_list()))


def balanced(res) -> None:
    for f in res.files:
        assert f.rows_read == f.rows_ingested + f.rows_quarantined


# --- 1. dataset ids --------------------------------------------------------------------------
@pytest.mark.parametrize("ds", ["nih-cxr14", "synth-derm", "padchest", "fitzpatrick17k",
                                "rsna-pneumonia", "siim-acr-pneumothorax", "ham10000", "vindr-cxr",
                                "chexpert", "toy", "p", "a.b_c-9"])
def test_existing_dataset_ids_are_valid(ds):
    assert check_dataset_id(ds) == ds


@pytest.mark.parametrize("bad", ["a b:c", "A_B", "a/b", "-a", "a.", "a--b", "", "é", "x" * 65,
                                 "a\x00b", "../x"])
def test_bad_dataset_ids_are_refused_naming_id_and_charset(catalog, bad):
    with pytest.raises(SchemaError) as e:
        check_dataset_id(bad)
    assert repr(bad[:80]) in str(e.value) and DATASET_ID_PATTERN in str(e.value)


def test_generic_yaml_and_dataset_option_are_validated(catalog):
    cfg = dataset(catalog, ["a1,a1.png,train,40,nv,"], name="ok")
    cfg.write_text(cfg.read_text().replace("dataset: ok", "dataset: a b:c"))
    with pytest.raises(SchemaError, match=r"cfg.yaml: dataset 'a b:c' is not a valid dataset id"):
        ingest.run(catalog, "generic", cfg)
    with pytest.raises(SchemaError, match=r"--dataset 'A_B' is not a valid dataset id.*e.g. 'a_b'"):
        ingest.run(catalog, "generic", cfg, dataset_id="A_B")
    # a public format with --dataset: refused too, nothing written
    ham = catalog.ws.root / "data" / "ham.csv"
    ham.write_text("lesion_id,image_id,dx,dx_type,age,sex,localization\nH1,I1,nv,histo,40,male,back\n")
    with pytest.raises(SchemaError, match="not a valid dataset id"):
        ingest.run(catalog, "ham10000", ham, dataset_id="ham 10000")
    assert not catalog.tables.files("images")


def test_colliding_storage_name_is_refused(catalog):
    """A lake written before ids were checked holds 'a b:c' in partition a_b_c; a new
    dataset 'a_b_c' must not erase it (before issue 13 the second ingest replaced it)."""
    catalog.write("datasets", [{"dataset_id": "a b:c", "name": "old"}], stage="ingest", partition="a b:c")
    catalog.write("images", [{"image_id": "a b:c:1", "dataset_id": "a b:c", "native_id": "1"}],
                  stage="ingest", partition="a b:c")
    before = {p: p.read_bytes() for t in ("datasets", "images") for p in catalog.tables.files(t)}
    cfg = dataset(catalog, ["a1,a1.png,train,40,nv,"], name="a_b_c")
    with pytest.raises(SchemaError) as e:
        ingest.run(catalog, "generic", cfg)
    assert "same name as the existing dataset 'a b:c'" in str(e.value) and "--dataset" in str(e.value)
    assert {p: p.read_bytes() for p in before} == before
    assert catalog.read("images")["dataset_id"].to_list() == ["a b:c"]
    # an unrelated id still ingests, and re-ingesting the same id is fine
    cfg2 = dataset(catalog, ["a1,a1.png,train,40,nv,"], name="other")
    ingest.run(catalog, "generic", cfg2)
    ingest.run(catalog, "generic", cfg2)
    assert sorted(catalog.read("datasets")["dataset_id"].to_list()) == ["a b:c", "other"]


# --- 2. export: names, verification, symlinks -----------------------------------------------
WEIRD = ["a'b", "a|b", "a_b", ".hidden", "%41", "sub/dir", "Ünï cødé", "é" * 120, "_unknown"]


def weird_version(cat: Catalog, *, pack: bool = False) -> Path:
    rows = [f"{nid},f{i}.png,train,40,{'a/b' if i % 2 else 'a_b'},"
            for i, nid in enumerate(WEIRD)]
    cfg = dataset(cat, rows, name="weird")
    res = ingest.run(cat, "generic", cfg)
    assert res.rows_quarantined == 0, res.summary()
    (cat.ws.recipes_dir).mkdir(parents=True, exist_ok=True)
    export = "{images: true, sizes: [8]" + (", pack: shards" if pack else "") + "}"
    (cat.ws.recipes_dir / "weird-v.yaml").write_text(
        "dataset: weird\nparent: weird@original\nlabels:\n  dx: \"weird:clinic/diagnosis\"\n"
        f"export: {export}\n")
    return cat.ws.versions_dir / "weird-v"


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=80))
def test_encode_name_is_reversible_and_safe(text):
    name = encode_name(text)
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert not name.startswith((".", "-")) and name not in (".", "..")
    assert len(name) <= MAX_NAME
    if "~" not in name:
        assert decode_name(name) == text
    assert name != UNKNOWN or text is None


def test_export_names_are_collision_free_and_verified(catalog):
    folder = weird_version(catalog)
    res = materialize.run(catalog, "weird-v")
    m = load_version(folder)
    assert m.height == len(WEIRD) and m["file"].n_unique() == len(WEIRD)
    assert m["file_8"].n_unique() == len(WEIRD)
    assert res.files["verified"] == len(WEIRD) and res.files["unverified"] == 0
    img = catalog.read("images").select("image_id", "sha256")
    m = m.join(img, on="image_id", suffix="_images")
    labels = set()
    for r in m.iter_rows(named=True):
        f = folder / r["file"]
        assert f.is_file() and not f.is_symlink()
        assert hashlib.sha256(f.read_bytes()).hexdigest() == r["sha256"] == r["sha256_images"]
        stem = f.name[: -len(".png")]
        if "~" not in stem:
            assert decode_name(stem) == r["native_id"]  # the name gives the id back
        labels.add(decode_name(f.parent.name))
    assert labels == {"a/b", "a_b"}  # two labels, two folders (the old names merged them)
    assert any("~" in Path(f).name for f in m["file"])  # the 240-byte id got a short name


def test_export_refuses_file_changed_after_ingest(catalog):
    folder = weird_version(catalog)
    src = catalog.ws.root / "data" / "weird" / "img" / "f0.png"
    png(src, seed=99)  # new bytes under the same name
    with pytest.raises(CatalogError) as e:
        materialize.run(catalog, "weird-v")
    msg = str(e.value)
    assert "weird:a'b" in msg and "f0.png" in msg and "changed after ingest" in msg
    assert "Re-ingest" in msg and not folder.exists()
    assert not list(folder.parent.glob(".weird-v.tmp-*"))


def test_export_refuses_symlink_replacing_image(catalog, tmp_path):
    folder = weird_version(catalog)
    src = catalog.ws.root / "data" / "weird" / "img" / "f1.png"
    # a symlink to another image inside the root: resolves, but its bytes are not the ones ingested
    src.unlink()
    src.symlink_to(catalog.ws.root / "data" / "weird" / "img" / "f2.png")
    with pytest.raises(CatalogError, match="weird:a|b.*changed after ingest"):
        materialize.run(catalog, "weird-v")
    # a symlink leaving the images root (to the same bytes, even): refused before reading
    outside = tmp_path / "outside.png"
    outside.write_bytes((catalog.ws.root / "data" / "weird" / "img" / "f2.png").read_bytes())
    src.unlink()
    src.symlink_to(outside)
    with pytest.raises(CatalogError, match="outside the images root"):
        materialize.run(catalog, "weird-v")
    assert not folder.exists()


def test_packed_export_and_symlinks_in_shards(catalog, tmp_path):
    folder = weird_version(catalog, pack=True)
    materialize.run(catalog, "weird-v")
    m = load_version(folder)
    idx = shards.index(folder)
    assert set(idx) == set(m["file"]) | set(m["file_8"])
    with tarfile.open(folder / "shards" / "images-00000.tar") as tf:
        assert len(set(tf.getnames())) == len(idx)
    # unpack refuses to write through a symlinked folder that leaves the destination
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", out / "images" / "train")
    with pytest.raises(CatalogError, match="symlink"):
        shards.unpack(folder, out)
    assert not any((tmp_path / "elsewhere").iterdir())
    # pack refuses a symlink among the files it would pack
    v = tmp_path / "v"
    (v / "images").mkdir(parents=True)
    (v / "images" / "x.png").symlink_to(tmp_path / "outside.bin")
    (tmp_path / "outside.bin").write_bytes(b"secret")
    with pytest.raises(CatalogError, match="symlink"):
        shards.pack(v, ["images"])


# --- 3. bad ingest input ---------------------------------------------------------------------
@pytest.mark.parametrize("row,reason", [
    ("a2,a2.png,train,-5,nv,", "age (age) out of range (0 to 200): -5"),
    ("a2,a2.png,train,1e400,nv,", "age (age) out of range (0 to 200): 1e400"),
    ("a2,a2.png,train", "short row: 3 of 6 fields"),
    ("a2,a2.png,train,40,n\x00v,", "control character (0x00) in dx"),
    ("a2,a2.png,train,40,nv,x,extra", "long row: 7 fields, the header has 6"),
    ("x" * 100_000 + ",a2.png,train,40,nv,", "image_id longer than 512 characters (100000 characters)"),
])
def test_each_bad_row_is_quarantined_with_a_reason(catalog, row, reason):
    """One defect per case, between two good rows (each was ingested, or crashed, before)."""
    res = ingest.run(catalog, "generic", dataset(catalog, ["a1,a1.png,train,40,nv,", row,
                                                           "a3,a3.png,train,40,nv,"]))
    balanced(res)
    assert (res.rows_read, res.rows_quarantined) == (3, 1)
    assert quarantine(catalog) == {2: reason}
    assert sorted(catalog.read("images")["native_id"]) == ["a1", "a3"]


def test_bad_cells_short_rows_control_bytes_long_ids(catalog):
    long_id = "x" * 100_000
    rows = [
        "a1,a1.png,train,40,nv,",                   # 1 fine
        "a2,a2.png,train,-5,nv,",                   # 2 negative age
        "a3,a3.png,train,1e400,nv,",                # 3 infinite age
        "a4,a4.png,train,nan,nv,",                  # 4 NaN age
        "a5,a5.png,train",                          # 5 short row: dx and note missing
        "a6,a6.png,train,40,n\x00v,",               # 6 NUL in a label
        "a7,a7.png,train,40,nv,bell\x07",           # 7 control byte in another column
        f"{long_id},a8.png,train,40,nv,",           # 8 a 100 kB id
        "a9,a9.png,train,40,nv,x,extra",            # 9 long row
        "",                                         # 10 blank line
        'a11,a11.png,train,40,nv,"quoted, with\nline break"',  # 11 fine (quoted)
        "a12,a12.png,train,,mel,\ttab ok",          # 12 fine (blank age, tab allowed)
    ]
    res = ingest.run(catalog, "generic", dataset(catalog, rows))
    balanced(res)
    assert (res.rows_read, res.files[0].rows_ingested, res.rows_quarantined) == (12, 3, 9)
    q = quarantine(catalog)
    assert q[2] == "age (age) out of range (0 to 200): -5"
    assert q[3] == "age (age) out of range (0 to 200): 1e400"
    assert q[4] == "age (age) out of range (0 to 200): nan"
    assert q[5] == "short row: 3 of 6 fields"
    assert q[6] == "control character (0x00) in dx"
    assert q[7] == "control character (0x07) in note"
    assert q[8] == f"image_id longer than {MAX_ID_LENGTH} characters (100000 characters)"
    assert q[9] == "long row: 7 fields, the header has 6"
    assert q[10] == "blank line"
    item = catalog.read("quarantine").filter(pl.col("row") == 8)["item"][0]
    assert len(item) < 100 and item.endswith("...")
    im = catalog.read("images").sort("native_id")
    assert im["native_id"].to_list() == ["a1", "a11", "a12"]
    assert catalog.read("annotations").filter(pl.col("image_id") == "hard:a11")["category"][0] == "nv"
    with pytest.raises(IngestError, match=r"m.csv: row 2 of 12: age \(age\) out of range"):
        ingest.run(catalog, "generic", dataset(catalog, rows), strict=True)


def test_duplicate_header_column_is_an_error(catalog):
    cfg = dataset(catalog, ["a1,a1.png,train,40,nv,mel"], head="image_id,file,split,age,dx,dx")
    with pytest.raises(SchemaError) as e:
        ingest.run(catalog, "generic", cfg)
    assert "m.csv" in str(e.value) and "'dx' twice (fields 5 and 6)" in str(e.value)
    assert not catalog.tables.files("images")


def test_public_adapter_uses_the_same_reader(catalog):
    """HAM10000 through the shared reader: age -5 and 1e400, a short row, a NUL, a repeated
    header name (each a quarantine row or an error, as for the generic adapter)."""
    p = catalog.ws.root / "data" / "ham.csv"
    p.parent.mkdir(parents=True)
    head = "lesion_id,image_id,dx,dx_type,age,sex,localization"
    lines = [head, "H1,I1,nv,histo,40,male,back", "H2,I2,nv,histo,-5,male,back",
             "H3,I3,nv,histo,1e400,male,back", "H4,I4,nv,histo,40", "H5,I5,n\x00v,histo,40,male,back"]
    p.write_text("".join(f"{line}\n" for line in lines))
    res = ingest.run(catalog, "ham10000", p)
    balanced(res)
    q = quarantine(catalog)
    assert q == {2: "age out of range (0 to 200): -5", 3: "age out of range (0 to 200): 1e400",
                 4: "short row: 5 of 7 fields", 5: "control character (0x00) in dx"}
    p.write_text(head + ",age\nH1,I1,nv,histo,40,male,back,41\n")
    with pytest.raises(SchemaError, match="ham.csv: the header names column 'age' twice"):
        ingest.run(catalog, "ham10000", p)


def test_latin1_and_utf16_without_bom_name_the_problem(catalog):
    rows = ["a1,a1.png,train,40,nv,", "a2,a2.png,train,40,naevus pigmenté,"]
    latin = ("\n".join([HEAD, *rows]) + "\n").encode("latin-1")
    with pytest.raises(IngestError) as e:
        ingest.run(catalog, "generic", dataset(catalog, rows, raw=latin))
    msg = str(e.value)
    assert "m.csv: not UTF-8" in msg and "line 3 (data row 2)" in msg and "Latin-1" in msg
    assert "0xE9" in msg and "iconv" in msg
    utf16 = ("\n".join([HEAD, *rows]) + "\n").encode("utf-16-le")
    with pytest.raises(IngestError, match="UTF-16 without a byte-order mark"):
        ingest.run(catalog, "generic", dataset(catalog, rows, raw=utf16))
    assert not catalog.tables.files("images")


@pytest.mark.parametrize("codec,bom", [("utf-16-le", codecs.BOM_UTF16_LE),
                                       ("utf-16-be", codecs.BOM_UTF16_BE),
                                       ("utf-8", codecs.BOM_UTF8)])
def test_utf16_and_utf8_with_bom_are_decoded(catalog, codec, bom):
    rows = ["a1,a1.png,train,40,nv,", "a2,a2.png,train,40,naevus pigmenté,ünï"]
    raw = bom + ("\r\n".join([HEAD, *rows]) + "\r\n").encode(codec)
    res = ingest.run(catalog, "generic", dataset(catalog, rows, raw=raw))
    balanced(res)
    assert res.rows_quarantined == 0
    ann = catalog.read("annotations").sort("image_id")
    assert ann["category"].to_list() == ["nv", "naevus pigmenté"]


def test_ids_at_the_limit_and_materialize_after_quarantine(catalog):
    """512 characters pass, 513 go to the quarantine; materialize then works on the rest."""
    ok, bad = "k" * MAX_ID_LENGTH, "k" * (MAX_ID_LENGTH + 1)
    cfg = dataset(catalog, [f"{ok},a.png,train,40,nv,", f"{bad},b.png,train,40,nv,",
                            "c,c.png,train,40,mel,"], name="limits")
    res = ingest.run(catalog, "generic", cfg)
    assert res.rows_quarantined == 1 and quarantine(catalog)[2].startswith("image_id longer than 512")
    (catalog.ws.recipes_dir).mkdir(parents=True, exist_ok=True)
    (catalog.ws.recipes_dir / "lim.yaml").write_text(
        "dataset: limits\nparent: limits@original\nlabels:\n  dx: \"limits:clinic/diagnosis\"\n"
        "export: {images: true, sizes: [8]}\n")
    materialize.run(catalog, "lim")
    m = load_version(catalog.ws.versions_dir / "lim")
    assert sorted(len(n) for n in m["native_id"]) == [1, MAX_ID_LENGTH]
    assert all(len(Path(f).name) <= MAX_NAME + 4 for f in m["file"])


def test_parquet_manifest_gets_the_same_row_checks(catalog):
    cfg = dataset(catalog, ["a1,a1.png,train,40,nv,", "a2,a2.png,train,40,nv,", "a3,a3.png,train,40,nv,"],
                  name="pq")
    root = cfg.parent
    pl.DataFrame({"image_id": ["a1", "a2", "z" * 600], "file": ["a1.png", "a2.png", "a3.png"],
                  "split": ["train"] * 3, "age": [40.0, float("inf"), 40.0],
                  "dx": ["nv", "nv", "n\x1bv"], "note": [None] * 3}).write_parquet(root / "m.parquet")
    cfg.write_text(cfg.read_text().replace("manifest: m.csv", "manifest: m.parquet"))
    res = ingest.run(catalog, "generic", cfg)
    balanced(res)
    assert quarantine(catalog) == {2: "age (age) out of range (0 to 200): inf",
                                   3: "control character (0x1B) in dx"}
    assert catalog.read("images")["native_id"].to_list() == ["a1"]
