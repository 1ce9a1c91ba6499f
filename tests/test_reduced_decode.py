"""Reduced-size JPEG decoding (issue #14 part 3): large JPEGs are decoded at a DCT scale
that keeps at least ``min_side`` pixels on the shorter side; callers get the full size and
results that agree with a full decode."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from medlake.catalog import imageio
from medlake.catalog.embedders import DescriptorEmbedder
from medlake.pipelines import embed, verify


def _picture(w: int, h: int, seed: int = 0) -> Image.Image:
    """A textured RGB picture (blobs at several scales), like a photo, not flat noise."""
    rng = np.random.default_rng(seed)
    base = np.zeros((h, w, 3), np.float32)
    for s in (64, 16, 4):
        small = rng.random((h // s + 1, w // s + 1, 3)).astype(np.float32)
        base += cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) / 3
    return Image.fromarray(np.clip(base * 255, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reduced")
    im = _picture(2400, 1800)
    path = folder / "big.jpg"
    im.save(path, quality=92)
    return path, im


def test_large_jpeg_is_decoded_reduced_with_its_full_size(big_jpeg, tmp_path):
    path, _ = big_jpeg
    im = imageio.open_image(path, min_side=512)
    assert im.size == (1200, 900)  # 1/2: at 1/4 the shorter side (450) would be under 512
    assert imageio.full_size(im) == (2400, 1800)
    full = imageio.open_image(path)
    assert full.size == (2400, 1800) and imageio.full_size(full) == (2400, 1800)


def test_reduced_decode_keeps_the_shorter_side_at_least_min_side(big_jpeg):
    path, _ = big_jpeg
    for min_side, want in ((128, (300, 225)), (300, (600, 450)), (450, (600, 450)),
                           (451, (1200, 900)), (900, (1200, 900)),
                           (901, (2400, 1800))):
        im = imageio.open_image(path, min_side=min_side)
        assert im.size == want, (min_side, im.size)
        assert min(im.size) >= min(min_side, 1800)
        assert imageio.full_size(im) == (2400, 1800)


def test_png_and_small_jpeg_decode_in_full(big_jpeg, tmp_path):
    _, pic = big_jpeg
    pic.save(tmp_path / "big.png")
    pic.resize((600, 450)).save(tmp_path / "small.jpg")
    for name, size in (("big.png", (2400, 1800)), ("small.jpg", (600, 450))):
        im = imageio.open_image(tmp_path / name, min_side=512)
        assert im.size == size and imageio.full_size(im) == size


def test_exif_rotation_turns_the_full_size(tmp_path):
    pic = _picture(2400, 1800, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    pic.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    im = imageio.load_8bit(tmp_path / "rot.jpg", min_side=256)
    assert im.size[1] > im.size[0]  # portrait after the rotation
    assert imageio.full_size(im) == (1800, 2400)
    assert imageio.full_size(imageio.load_rgb(tmp_path / "rot.jpg", min_side=256)) == (1800, 2400)


def test_features_of_a_reduced_decode_agree_with_the_full_decode(big_jpeg, tmp_path):
    path, pic = big_jpeg
    reduced = verify.features(str(path))
    full = verify.features(str(path), reduced=False)
    assert reduced["side"] == full["side"] == 2400 and reduced["up"] == full["up"] == 1.0
    assert reduced["g"].shape == full["g"].shape == (192, 256)
    diff = np.abs(reduced["g"].astype(int) - full["g"].astype(int))
    assert diff.mean() < 1.5, diff.mean()
    # and a crop of the picture, saved large too, verifies against it
    crop = pic.crop((300, 200, 2100, 1600)).resize((2400, 1867))
    crop.save(tmp_path / "crop.jpg", quality=85)
    got = verify.verify(str(path), str(tmp_path / "crop.jpg"), cache={}, keys=("a", "b"),
                        p={"min_inliers": 12, "ncc": 0.78, "ncc_coarse": 0.9})
    assert got["verified"], got


def test_descriptor_of_a_reduced_decode_matches_the_full_decode(big_jpeg):
    path, _ = big_jpeg
    prep = embed.preparer(DescriptorEmbedder())
    assert prep.min_side == 2 * DescriptorEmbedder.side
    reduced = prep(imageio.load_rgb(path, min_side=prep.min_side))
    full = prep(imageio.load_rgb(path))
    assert imageio.load_rgb(path, min_side=prep.min_side).size == (300, 225)
    assert float(reduced @ full) > 0.999


def test_ui_thumbnail_of_a_large_jpeg_matches_the_full_decode(big_jpeg):
    from medlake.ui import data

    path, _ = big_jpeg
    small = data.open_rgb(path, "x", max_side=256)
    full = imageio.load_rgb(path)
    full.thumbnail((256, 256))
    assert small.size == full.size == (256, 192)
    diff = np.abs(np.asarray(small, dtype=int) - np.asarray(full, dtype=int))
    assert diff.mean() < 2.0, diff.mean()
    assert data.open_rgb(path, "x").size == (2400, 1800)  # unshrunk: every pixel


def test_inspect_reads_a_large_jpeg_at_its_smallest_scale_with_the_same_verdicts(big_jpeg, tmp_path):
    """Ingest's check decodes JPEGs at 1/8 scale: the full size is recorded, and a broken
    file gets the verdict a full decode gives."""
    path, _ = big_jpeg
    info = imageio.inspect(path)
    assert info.ok and (info.width, info.height, info.mode, info.format) == (2400, 1800, "RGB", "JPEG")
    data = path.read_bytes()
    rng = np.random.default_rng(7)
    broken = {"truncated": data[: len(data) * 6 // 10],
              "eoi_inside": data[: len(data) // 2] + b"\xff\xd9" + data[len(data) // 2 + 2:],
              "garbage_tail": data[: len(data) // 3] + rng.integers(0, 256, len(data) // 3, dtype=np.uint8).tobytes()}
    verdicts = {}
    for name, blob in broken.items():
        f = tmp_path / f"{name}.jpg"
        f.write_bytes(blob)
        got = imageio.inspect(f)
        try:
            imageio.open_image(f)  # every pixel
            want = None
        except imageio.ImageReadError as e:
            want = e.reason
        assert got.reason == want, (name, got.reason, want)
        verdicts[name] = got.reason
    assert verdicts["truncated"] == "truncated or corrupt image"
