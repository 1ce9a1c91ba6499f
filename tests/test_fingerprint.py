"""Stage fingerprint: hashes against imagehash, quality flags, bad inputs, CLI."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import imagehash
import numpy as np
import scipy.fft
import polars as pl
import pytest
from click.testing import CliRunner
from images_helpers import _synth_lake  # noqa: F401  (session fixture synth_lake)
from PIL import Image

from medlake.catalog import Catalog, Workspace
from medlake.cli.main import main
from medlake.pipelines import fingerprint

RNG = np.random.default_rng(0)


def _noise(h: int = 128, w: int = 128) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _bomb_png() -> bytes:
    """A valid 8x8 PNG whose IHDR declares 20000 x 20000 pixels (CRC fixed)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])  # 'IHDR' + 13 bytes
    ihdr[4:12] = struct.pack(">II", 20000, 20000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def _make_files(d: Path) -> dict[str, str]:
    """Purpose-made images; returns name -> expected outcome ('ok' or a quarantine reason)."""
    d.mkdir(parents=True)
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(d / "black.png")
    Image.fromarray(np.full((128, 128, 3), 255, np.uint8)).save(d / "white.png")
    Image.fromarray(np.full((128, 128, 3), 128, np.uint8)).save(d / "flat.png")
    import cv2
    blur = cv2.GaussianBlur(_noise(), (0, 0), 8)
    Image.fromarray(blur).save(d / "blurry.png")
    Image.fromarray(_noise(32, 32)).save(d / "tiny.png")
    Image.fromarray(_noise()).save(d / "sharp.png")
    Image.fromarray(_noise(40, 200)).save(d / "wide.png")
    g = RNG.integers(0, 256, (128, 128), dtype=np.uint8)
    Image.fromarray(np.stack([g] * 3, -1)).save(d / "greyrgb.png")
    Image.fromarray(g).save(d / "grey.png")
    Image.fromarray(_noise()).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    Image.fromarray(g.astype(np.uint16) * 257).save(d / "sixteen.png")
    Image.fromarray(_noise()).convert("P").save(d / "palette.png")
    ex = Image.fromarray(_noise(60, 100))
    exif = ex.getexif()
    exif[0x0112] = 6  # rotate 90: stored 100 wide x 60 high, shown 60 x 100
    ex.save(d / "exif.jpg", exif=exif, quality=95)
    good = (d / "sharp.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + RNG.bytes(500))
    (d / "zero.png").write_bytes(b"")
    (d / "text.jpg").write_bytes(b"this is not an image\n" * 20)
    (d / "bomb.png").write_bytes(_bomb_png())
    bad = {"truncated.png", "corrupt.png", "zero.png", "text.jpg", "bomb.png"}
    return {p.name: ("bad" if p.name in bad else "ok") for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def bad_lake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Catalog, dict[str, str]]:
    root = (tmp_path_factory.mktemp("fp") / "ws").resolve()
    (root / ".dvc").mkdir(parents=True)
    files = _make_files(root / "imgs")
    cat = Catalog(Workspace(root))
    images = [{"image_id": f"t:{n}", "dataset_id": "t", "native_id": n, "path": n} for n in files]
    with cat.transaction() as tx:
        tx.write("datasets", [{"dataset_id": "t", "name": "t", "modality": "derm",
                               "images_root": "imgs"}], stage="ingest", partition="t")
        tx.write("images", images, stage="ingest", partition="t")
    return cat, files


def test_bad_inputs_processed_or_quarantined(bad_lake):
    cat, files = bad_lake
    res = fingerprint.run(cat)
    fp = cat.read("fingerprints")
    q = cat.read("quarantine").filter(pl.col("stage") == "fingerprint")
    assert res == {"images": len(files), "fingerprinted": len(fp), "quarantined": len(q)}
    assert len(fp) + len(q) == len(files)
    assert set(fp["image_id"]) | set(q["item"]) == {f"t:{n}" for n in files}
    bad = {f"t:{n}" for n, v in files.items() if v == "bad"}
    assert set(q["item"]) == bad
    reasons = dict(zip(q["item"], q["reason"], strict=True))
    assert reasons["t:zero.png"] == "zero-byte file"
    assert reasons["t:bomb.png"] == "decompression bomb"
    assert reasons["t:text.jpg"] == "not an image"
    assert all(r for r in reasons.values())
    rows = {r["image_id"]: r for r in fp.to_dicts()}
    assert rows["t:cmyk.jpg"]["mode"] == "CMYK"
    assert rows["t:sixteen.png"]["mode"].startswith("I")
    assert rows["t:palette.png"]["mode"] == "P"
    assert rows["t:grey.png"]["mode"] == "L"
    assert (rows["t:exif.jpg"]["width"], rows["t:exif.jpg"]["height"]) == (60, 100)


def test_quality_flags(bad_lake):
    cat, _ = bad_lake
    fingerprint.run(cat)
    flags = {r["image_id"][2:]: set(filter(None, r["flags"].split(",")))
             for r in cat.read("fingerprints").to_dicts()}
    assert {"dark", "low_contrast", "low_information"} <= flags["black.png"]
    assert "bright" in flags["white.png"]
    assert {"low_contrast", "blurry"} <= flags["flat.png"]
    assert "blurry" in flags["blurry.png"]
    assert "tiny" in flags["tiny.png"]
    assert "extreme_aspect" in flags["wide.png"]
    assert "grey_as_colour" in flags["greyrgb.png"]
    assert "grey_as_colour" not in flags["grey.png"]  # stored as greyscale: nothing to flag
    assert flags["sharp.png"] == set()


def test_hashes_match_imagehash(synth_lake):
    cat = synth_lake
    fp = cat.read("fingerprints").sort("image_id")
    files = dict(zip(*fingerprint.image_files(cat).select("image_id", "file").get_columns(), strict=True))
    for r in fp.head(25).to_dicts():
        raw = Path(files[r["image_id"]]).read_bytes()
        im = Image.open(io.BytesIO(raw)).convert("RGB")
        assert r["phash"] == str(imagehash.phash(im))
        assert r["dhash"] == str(imagehash.dhash(im))
        assert r["ahash"] == str(imagehash.average_hash(im))
        assert r["whash"] == str(imagehash.whash(im))
        import hashlib
        assert r["sha256"] == hashlib.sha256(raw).hexdigest()
        assert (r["width"], r["height"]) == im.size
        # phash_sym: pHash of imagehash's 32 x 32 reduction averaged with its mirror (scipy.fft
        # here, fftpack there), the odd x-frequencies exactly 0; the same for the mirror image
        small = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.LANCZOS), np.float64)
        low = scipy.fft.dctn((small + small[:, ::-1]) / 2, type=2)[:8, :8]
        low[:, 1::2] = 0
        assert r["phash_sym"] == str(imagehash.ImageHash(low > np.median(low)))
        mirror = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert fingerprint.small_hashes(mirror.convert("L"))["phash_sym"] == r["phash_sym"]
        # and it is the pHash of the image averaged with its mirror, but for rounding
        sym = Image.fromarray(((np.asarray(mirror, np.uint16) + np.asarray(im)) // 2).astype(np.uint8))
        assert imagehash.hex_to_hash(r["phash_sym"]) - imagehash.phash(sym) <= 3


def _shapes() -> list[tuple[int, int]]:
    """(h, w): square, wide, tall (either side of Pillow 13's vertical-first rule at 32 x 32,
    h - 32 > 2 (w - 32), with w = 300: h 568 / 569), thin, at a hash size on one axis, smaller
    than a hash (Pillow enlarges), and over one block of rows (fingerprint._ROWS)."""
    return [(256, 256), (224, 300), (568, 300), (569, 300), (1100, 320), (40, 900), (8, 500),
            (700, 9), (32, 32), (20, 50), (5, 5), (1300, 1024), (613, 487)]


def test_lanczos_reductions_are_pillows():
    """The hash reductions by matrix products are Pillow's LANCZOS resize, byte for byte, and
    the hashes imagehash's, whichever pass Pillow runs first."""
    rng = np.random.default_rng(7)
    extra = ((17, 5), (3, 40), (64, 48))
    for h, w in _shapes():
        yy, xx = np.mgrid[:h, :w]
        smooth = 128 + 100 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
        for px in (rng.integers(0, 256, (h, w)), smooth + rng.normal(0, 20, (h, w))):
            grey = Image.fromarray(np.clip(px, 0, 255).astype(np.uint8))
            fingerprint._seen((w, h))  # a size met before: the matrix path even when small
            sizes = fingerprint.HASH_SIZES + extra
            got = fingerprint.lanczos_reductions(grey, sizes)
            for size, arr in zip(sizes, got, strict=True):
                want = np.asarray(grey.resize(size, Image.Resampling.LANCZOS))
                assert arr.dtype == np.uint8 and np.array_equal(arr, want), ((h, w), size)
            hashes = fingerprint.small_hashes(grey)
            assert hashes["phash"] == str(imagehash.phash(grey)), (h, w)
            assert hashes["dhash"] == str(imagehash.dhash(grey)), (h, w)
            assert hashes["ahash"] == str(imagehash.average_hash(grey)), (h, w)


def test_images_in_equal_out_on_synthetic(synth_lake):
    cat = synth_lake
    n = len(fingerprint.image_files(cat))
    q = cat.read("quarantine").filter(pl.col("stage") == "fingerprint")
    assert len(cat.read("fingerprints")) + len(q) == n > 100


def test_format_is_the_decoders(synth_lake, tmp_path):
    """``format`` names the file's format (it was '' for every image while EXIF orientation
    was applied to a copy of each), also for an image turned by its EXIF orientation."""
    fp = synth_lake.read("fingerprints", columns=["image_id", "format"])
    files = fingerprint.image_files(synth_lake).select("image_id", "file")
    both = fp.join(files, on="image_id")
    assert both.height == fp.height
    want = []
    for f in both["file"]:
        with Image.open(f) as im:
            want.append(im.format)
    assert both["format"].to_list() == want and set(want) == {"JPEG", "PNG"}
    im = Image.new("RGB", (40, 30), (200, 100, 50))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "turned.jpg", exif=exif)
    from medlake.catalog.imageio import open_image

    turned = open_image(tmp_path / "turned.jpg")
    assert turned.size == (30, 40) and turned.format == "JPEG"


def test_cli(bad_lake):
    cat, files = bad_lake
    r = CliRunner().invoke(main, ["fingerprint", "-w", str(cat.ws.root)])
    assert r.exit_code == 0, r.output
    assert f"{len(files)} images, {len(files) - 5} fingerprinted, 5 quarantined" in r.output
    r = CliRunner().invoke(main, ["fingerprint", "-w", str(cat.ws.root), "--dataset", "nope"])
    assert r.exit_code != 0 and "nope" in r.output


def _tie_prone_images() -> list[Image.Image]:
    """Random, three-level, half-black and tiny greyscale images (median ties are common)."""
    rng = np.random.default_rng(11)
    out = []
    for t in range(300):
        h, w = (int(x) for x in rng.integers(3, 200, 2))
        a = [rng.integers(0, 256, (h, w)), rng.integers(0, 3, (h, w)) * 100,
             np.zeros((h, w)) + (np.arange(w) > w // 2) * 200][t % 3]
        out.append(Image.fromarray(a.astype(np.uint8)))
    return out


def test_whash_equals_imagehash():
    """The integer block-sum whash equals imagehash's wavelet passes, ties included."""
    ims = _tie_prone_images()
    got = [fingerprint.whash(im) for im in ims]
    assert got == [str(imagehash.whash(im)) for im in ims]
    assert len(set(got)) > 100  # not a constant


def test_median_from_histogram_equals_numpy_percentile():
    rng = np.random.default_rng(12)
    for t in range(2000):
        h, w = (int(x) for x in rng.integers(1, 40, 2))
        grey = (rng.random((h, w)) ** (1 + t % 4) * 255).astype(np.uint8)
        if t % 5 == 0:
            grey[:] = grey.flat[0]
        counts = np.bincount(grey.ravel(), minlength=256)
        assert fingerprint._median(counts) == float(np.percentile(grey / 255, 50))


def test_hexstr_equals_imagehash_str():
    """Packed-bit hex == imagehash's own string, for whole bytes and (by fallback) others."""
    rng = np.random.default_rng(5)
    for shape in [(8, 8)] * 200 + [(16, 16), (4, 6), (5, 5), (3, 3), (1, 8)]:
        h = imagehash.ImageHash(rng.random(shape) < rng.random())
        assert fingerprint.hexstr(h) == str(h), shape
    assert fingerprint.hexstr(imagehash.ImageHash(np.zeros((8, 8), bool))) == "0" * 16


def test_grey_file_fingerprints_like_its_rgb_form(tmp_path):
    """A grey ('L') file is hashed and measured without an RGB copy: every hash and metric
    equals the one of the same pixels stored as RGB (three equal channels), as CXR and
    derm X-ray datasets mix both; and to_8bit keeps grey while load_rgb gives RGB."""
    from medlake.catalog.imageio import load_8bit, load_rgb

    grey = (np.linspace(0, 255, 97 * 131).reshape(97, 131) + RNG.integers(0, 40, (97, 131))).clip(0, 255)
    grey = grey.astype(np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    Image.fromarray(np.dstack([grey] * 3), "RGB").save(tmp_path / "c.png")
    assert load_8bit(tmp_path / "g.png").mode == "L"
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "g.png")), np.dstack([grey] * 3))
    rows = [fingerprint._one({"image_id": n, "dataset_id": "d", "file": str(tmp_path / f"{n}.png"),
                              "path": f"{n}.png", "modality": "cxr"}, fingerprint.DEFAULTS, tmp_path)
            for n in ("g", "c")]
    assert rows[0]["mode"] == "L" and rows[1]["mode"] == "RGB"
    differ = {k for k in rows[0] if rows[0][k] != rows[1][k]}
    assert differ <= {"image_id", "mode", "sha256", "bytes", "flags"}, differ  # file, not pixels
    assert "grey_as_colour" in rows[1]["flags"].split(",")  # the RGB copy holds only grey
    flags = [set(filter(None, r["flags"].split(","))) for r in rows]
    assert flags[0] == flags[1] - {"grey_as_colour"}


def test_image_pool_settings_are_restored():
    """image_pool: OpenCV's own threads off and Pillow's freed-block cache on inside; both
    restored after, also when the block raises."""
    import cv2
    from PIL import Image

    from medlake.catalog.imageio import IMAGE_BLOCKS, image_pool

    threads, blocks = cv2.getNumThreads(), Image.core.get_blocks_max()
    with pytest.raises(KeyError), image_pool():
        assert cv2.getNumThreads() == 1
        assert Image.core.get_blocks_max() == max(blocks, IMAGE_BLOCKS)
        raise KeyError("inside")
    assert (cv2.getNumThreads(), Image.core.get_blocks_max()) == (threads, blocks)
