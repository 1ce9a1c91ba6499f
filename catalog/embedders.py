"""Image embedders: a weights-free descriptor and open_clip models.

Both turn 8-bit RGB Pillow images into L2-normalised float32 vectors. The descriptor needs no
weights, so duplicate search and outlier ranking work offline; it is built to survive the
changes near duplicates go through (mirror, rotation by a few degrees, crop, resize, JPEG,
brightness/contrast/gamma) while telling different pictures apart. open_clip models are
loaded only from a built-in config with ``pretrained=None`` (random weights, for tests) or a
local checkpoint file (``weights_only=True``); nothing is downloaded.

This module does not import the catalog's storage modules; :mod:`catalog.vectors` stores the
vectors and the pipelines join them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from medlake.catalog.errors import CatalogError

DESCRIPTOR = "descriptor-v1"


class EmbedderError(CatalogError):
    """A model cannot be built or its weights are not available locally."""


def _equalise(g: np.ndarray) -> np.ndarray:
    """Ranks of grey values mapped to [0, 1]: blind to brightness, contrast and gamma."""
    flat = g.ravel()
    ranks = np.empty(flat.size, dtype=np.float32)
    ranks[np.argsort(flat, kind="stable")] = np.linspace(0, 1, flat.size, dtype=np.float32)
    return ranks.reshape(g.shape)


@lru_cache(maxsize=8)
def _polar_geometry(h: int, w: int, rings: int, harmonics: int
                    ) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Ring index and pixel count per ring, and the angular Fourier basis (real, imaginary)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot((xx - (w - 1) / 2) / (w / 2), (yy - (h - 1) / 2) / (h / 2))
    th = np.arctan2(yy - (h - 1) / 2, xx - (w - 1) / 2)
    ring = np.minimum((r * rings / 1.05).astype(int), rings).ravel()
    n = np.maximum(np.bincount(ring, minlength=rings + 1), 1)
    basis = []
    for k in range(harmonics):
        b = np.exp(-1j * k * th)
        basis.append((np.ascontiguousarray(b.real), np.ascontiguousarray(b.imag)))
    for a in (ring, n, *(x for pair in basis for x in pair)):
        a.flags.writeable = False  # shared between calls and threads
    return ring, n, basis


def _polar_block(eq: np.ndarray, rings: int = 8, harmonics: int = 5) -> np.ndarray:
    """Per ring around the centre: |angular Fourier coefficients| (rotation/mirror invariant)."""
    ring, n, basis = _polar_geometry(*eq.shape, rings, harmonics)
    out = np.zeros((rings, harmonics), dtype=np.float32)
    flat = eq.ravel()
    for k, (re, im) in enumerate(basis):
        s = np.bincount(ring, weights=flat * re.ravel(), minlength=rings + 1)
        c = np.bincount(ring, weights=flat * im.ravel(), minlength=rings + 1)
        out[:, k] = (np.hypot(s, c) / n)[:rings]
    return out.ravel()


def _lbp_hist(eq: np.ndarray) -> np.ndarray:
    """Rotation-invariant uniform LBP histogram (radius 1, 8 neighbours, 10 bins)."""
    c = eq[1:-1, 1:-1]
    offs = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]
    bits = np.stack([(eq[1 + dy:eq.shape[0] - 1 + dy, 1 + dx:eq.shape[1] - 1 + dx] >= c)
                     for dy, dx in offs]).astype(np.int8)
    transitions = np.abs(np.diff(np.concatenate([bits, bits[:1]]), axis=0)).sum(axis=0)
    code = np.where(transitions <= 2, bits.sum(axis=0), 9)
    hist = np.bincount(code.ravel(), minlength=10).astype(np.float32)
    return hist / max(hist.sum(), 1.0)


def _colour_block(rgb: np.ndarray) -> np.ndarray:
    """Chromaticity means/stds and a saturation-weighted hue histogram (8 bins)."""
    f = rgb.astype(np.float32) + 1.0
    chrom = f[..., :2] / (f[..., 0] + f[..., 1] + f[..., 2])[..., None]  # r, g of r + g + b
    mean, std = cv2.meanStdDev(chrom)  # per channel (population std): ~4x numpy's axis-0 passes
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)
    sat = hsv[..., 1].astype(np.float32)
    hist = np.bincount((hsv[..., 0] >> 5).ravel(), weights=sat.ravel() / 255, minlength=8)[:8]
    hist = hist / max(hist.sum(), 1e-6) * min(1.0, float(sat.mean()) / 40)
    return np.concatenate([mean.ravel() * 4, std.ravel() * 8, hist]).astype(np.float32)


@dataclass(frozen=True)
class DescriptorEmbedder:
    """Weights-free global descriptor (``descriptor-v1``, 128 floats, unit length).

    Blocks (each unit length, then weighted): polar Fourier magnitudes of the rank-equalised
    grey image (rotation and mirror invariant), a 4-way symmetrised 8x8 thumbnail (mirror
    invariant, tolerant of small rotations and crops), a rotation-invariant LBP texture
    histogram and colour statistics.

    Example
    -------
    >>> emb = DescriptorEmbedder()
    >>> v = emb.embed([Image.new("RGB", (64, 48), (200, 150, 120))])
    >>> v.shape
    (1, 128)
    """

    name: str = DESCRIPTOR
    dim: int = 128
    side: int = 64
    decode_side: int = 2 * side  # the shorter side a reduced decode keeps (twice the square)

    def _one(self, im: Image.Image, pixels: np.ndarray | None = None) -> np.ndarray:
        """The vector of ``im``; ``pixels``: ``np.asarray(im)`` when the caller has it (an
        RGB image's costs a copy, ~1 ms at 1024 x 768)."""
        if im.mode not in ("L", "RGB"):  # converted to RGB below: the array is not of that
            pixels = None
        if im.mode == "L":  # reduced as grey, then RGB: the same pixels as reducing its RGB
            # form (each channel alike), without a full-size RGB copy
            grey = cv2.resize(np.asarray(im) if pixels is None else pixels,
                              (self.side, self.side), interpolation=cv2.INTER_AREA)
            small = cv2.merge([grey, grey, grey])
        else:
            rgb = (pixels if pixels is not None  # no RGB copy of RGB
                   else np.asarray(im if im.mode == "RGB" else im.convert("RGB")))
            small = cv2.resize(rgb, (self.side, self.side), interpolation=cv2.INTER_AREA)
            grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        eq = _equalise(grey)
        sym = (eq + eq[:, ::-1] + eq[::-1] + eq[::-1, ::-1]) / 4
        thumb = cv2.resize(sym, (8, 8), interpolation=cv2.INTER_AREA).ravel() - 0.5
        blocks = [(_polar_block(eq), 1.0), (thumb, 1.0), (_lbp_hist(eq), 0.6),
                  (_colour_block(small), 0.8)]
        vec = np.concatenate([b / max(np.linalg.norm(b), 1e-6) * wt for b, wt in blocks])
        out = np.zeros(self.dim, dtype=np.float32)
        out[: vec.size] = vec
        return out / max(float(np.linalg.norm(out)), 1e-6)

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """Vectors of ``images``: float32 array (n, 128), rows of unit length."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._one(im) for im in images])


class OpenClipEmbedder:
    """An open_clip image tower; ``pretrained`` is None (random weights) or a local file.

    Uses CUDA with autocast (float16) when available, the CPU (float32) otherwise.

    Raises
    ------
    EmbedderError
        Unknown model name, a pretrained *tag* (downloads are not possible here) or a missing
        checkpoint file; the message says how to provide a checkpoint.
    """

    def __init__(self, model: str, pretrained: str | None = None, *, device: str | None = None):
        import open_clip
        import torch

        if model not in open_clip.list_models():
            raise EmbedderError(f"open_clip has no model '{model}'; see open_clip.list_models()")
        ckpt = None
        if pretrained:
            ckpt = Path(pretrained)
            if not ckpt.is_file():
                raise EmbedderError(
                    f"embed: weights '{pretrained}' for model '{model}' are not available "
                    "locally and are never downloaded at run time. Download the checkpoint on "
                    "a machine with network access (e.g. open_clip's "
                    f"'{model}' weights as a .pt/.bin file), copy it here and set "
                    "embed.pretrained in params.yaml to its path; or use "
                    "embed.model: descriptor-v1 (no weights needed)."
                )
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=None)
        if ckpt is not None:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        self.net = net.eval().to(self.device)
        self.preprocess = preprocess
        self.name = f"openclip:{model}:{_weights_tag(ckpt)}"
        self.dim = int(net.visual.output_dim)
        size = net.visual.image_size  # the input side the transform produces
        self.input_side = int(max(size) if isinstance(size, (tuple, list)) else size)

    def tensors(self, images: list[Image.Image]) -> Any:
        import torch

        return torch.stack([self.preprocess(im.convert("RGB")) for im in images])

    def forward(self, batch: Any) -> np.ndarray:
        """Unit vectors of a preprocessed batch (n, 3, H, W)."""
        import torch

        with torch.inference_mode(), torch.autocast(
            device_type="cuda", dtype=torch.float16, enabled=self.device == "cuda"
        ):
            feats = self.net.encode_image(batch.to(self.device, non_blocking=True))
        feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy().astype(np.float32)

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.forward(self.tensors(images))


def _weights_tag(ckpt: Path | None) -> str:
    if ckpt is None:
        return "random"
    h = hashlib.sha256()
    with ckpt.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def make_embedder(model: str, pretrained: str | None = None, *, device: str | None = None):
    """``descriptor-v1`` or an open_clip model name (with ``pretrained``: None or a file)."""
    if model == DESCRIPTOR:
        return DescriptorEmbedder()
    return OpenClipEmbedder(model, pretrained, device=device)
