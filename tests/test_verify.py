"""pipelines.verify: mirrored ORB features equal detecting on the mirrored image."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from medlake.pipelines import verify


def _picture(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)
    return cv2.GaussianBlur(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), (0, 0), 1.2)


def test_reflected_keypoints_match_detection_on_the_mirror(tmp_path):
    """features() detects once and reflects; ORB run on the mirror finds the same keypoints
    and (all but a handful of bits) the same descriptors, for portrait and landscape sizes."""
    orb = cv2.ORB_create(nfeatures=verify.NFEATURES, edgeThreshold=15, patchSize=15, fastThreshold=8)
    total = same_bits = n_bits = 0
    for seed, (h, w) in enumerate([(200, 256), (256, 171), (256, 256), (97, 256)]):
        path = tmp_path / f"{seed}.png"
        Image.fromarray(_picture(seed, h, w)).save(path)
        f = verify.features(str(path))
        mirrored = np.ascontiguousarray(f["g"][:, ::-1])
        kp, des = orb.detectAndCompute(mirrored, None)
        ref = {(round(k.pt[0], 2), round(k.pt[1], 2)): d for k, d in zip(kp, des, strict=True)}
        pts, got = f["m"]
        assert len(pts) == len(f["n"][0]) > 50
        for (x, y), d in zip(pts, got, strict=True):
            r = ref.get((round(float(x), 2), round(float(y), 2)))
            total += 1
            if r is not None:
                n_bits += 256
                same_bits += 256 - int(np.unpackbits(r ^ d).sum())
    assert n_bits / 256 >= 0.98 * total  # the reflected keypoints are the mirror's keypoints
    assert same_bits >= 0.999 * n_bits  # with the same descriptors


def test_unreadable_file_gives_none(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    assert verify.features(str(bad)) is None
