"""Drawing for the synthetic generator: dermoscopy-like, chest-X-ray-like and outlier images.

Everything here is vectorised numpy driven by a seeded :class:`numpy.random.Generator`, so
the same parameters give the same pixels. An *anatomy* (a lesion, a patient's chest) is a
dict of parameters drawn once; a *capture* renders it with its own pose, lighting and noise,
so two captures of one anatomy look alike without being copies of each other.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

# skin tones (RGB, 0..1), light to dark, roughly Fitzpatrick I..VI
SKIN = np.array([
    [0.96, 0.84, 0.76], [0.91, 0.76, 0.64], [0.82, 0.64, 0.50],
    [0.69, 0.50, 0.36], [0.52, 0.36, 0.25], [0.36, 0.25, 0.18],
])
# lesion pigment per diagnosis (RGB, 0..1)
DX_COLOUR = {
    "nevus": (0.45, 0.30, 0.20), "melanoma": (0.22, 0.13, 0.10),
    "seborrheic_keratosis": (0.55, 0.42, 0.30), "basal_cell_carcinoma": (0.75, 0.55, 0.55),
    "actinic_keratosis": (0.78, 0.45, 0.40), "dermatofibroma": (0.60, 0.42, 0.35),
    "vascular": (0.70, 0.20, 0.25),
}


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1] of shape (h, w), from a ``cells`` x ``cells`` grid."""
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1))
    out = ndimage.zoom(grid, (h / (cells + 1), w / (cells + 1)), order=1, mode="nearest")
    return out[:h, :w]


def _coords(h: int, w: int, cx: float, cy: float, angle: float, scale: float):
    """Pixel coordinates relative to (cx, cy), rotated by -angle and divided by scale."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(angle), np.sin(angle)
    return (c * dx + s * dy) / scale, (-s * dx + c * dy) / scale


# --- dermoscopy ---------------------------------------------------------------------------
def lesion_anatomy(rng: np.random.Generator, dx: str, skin_type: int) -> dict[str, Any]:
    """Parameters of one lesion: shape harmonics, pigment, texture seed, skin tone."""
    irregular = 0.22 if dx == "melanoma" else 0.10
    return {
        "dx": dx, "skin": SKIN[skin_type - 1],
        "radius": rng.uniform(0.17, 0.32),  # fraction of the image's short side
        "harm": rng.uniform(0, irregular, size=5), "phase": rng.uniform(0, 2 * np.pi, size=5),
        "colour": np.clip(np.array(DX_COLOUR[dx]) + rng.normal(0, 0.04, 3), 0.02, 0.98),
        "texture_seed": int(rng.integers(0, 2**31)), "dots": int(rng.integers(0, 25)),
        "aspect": rng.uniform(0.75, 1.0),
    }


def draw_derm(rng: np.random.Generator, an: dict[str, Any], h: int, w: int) -> np.ndarray:
    """One dermoscopy-like capture of lesion ``an``: uint8 RGB array (h, w, 3)."""
    short = min(h, w)
    cx = w / 2 + rng.uniform(-0.12, 0.12) * w
    cy = h / 2 + rng.uniform(-0.12, 0.12) * h
    angle = rng.uniform(0, 2 * np.pi)
    scale = short * an["radius"] * rng.uniform(0.85, 1.15)
    lx, ly = _coords(h, w, cx, cy, angle, scale)
    ly = ly / an["aspect"]
    r, th = np.hypot(lx, ly), np.arctan2(ly, lx)
    # the border: harmonics of the lesion, jittered per capture (skin stretches, pose changes)
    harm = an["harm"] * rng.uniform(0.7, 1.3, size=5)
    border = 1.0 + sum(harm[k] * np.cos((k + 2) * th + an["phase"][k]) for k in range(5))
    border += 0.05 * smooth_noise(rng, h, w, 6)
    inside = np.clip((border - r) / 0.12, 0.0, 1.0)  # soft edge
    # lesion texture: a fixed pattern of the lesion in its own frame plus per-capture detail
    trng = np.random.default_rng(an["texture_seed"])
    tex_grid = trng.uniform(-1, 1, size=(24, 24))
    gx = np.clip((lx + 1.6) / 3.2 * 23, 0, 23)
    gy = np.clip((ly + 1.6) / 3.2 * 23, 0, 23)
    tex = ndimage.map_coordinates(tex_grid, [gy, gx], order=1)
    tex = 0.7 * tex + 0.3 * smooth_noise(rng, h, w, max(8, short // 10))
    dots = np.zeros((h, w))
    for _ in range(an["dots"]):
        a, rr = trng.uniform(0, 2 * np.pi), trng.uniform(0, 0.8)
        dots += np.exp(-((lx - rr * np.cos(a)) ** 2 + (ly - rr * np.sin(a)) ** 2) / 0.004)
    pig = an["colour"] * (1.0 + 0.25 * tex[..., None]) * (1.0 - 0.35 * np.clip(dots, 0, 1)[..., None])
    # skin: tone, slow shading, pores
    shade = 1.0 + 0.08 * smooth_noise(rng, h, w, 4)[..., None]
    skin = an["skin"] * shade * (1.0 + 0.03 * rng.standard_normal((h, w, 1)))
    img = skin * (1 - inside[..., None]) + pig * inside[..., None]
    # hairs: dark thin lines, a different set in every capture
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    for _ in range(int(rng.integers(0, 6))):
        a = rng.uniform(0, np.pi)
        px, py = rng.uniform(0, w), rng.uniform(0, h)
        curve = rng.uniform(-0.004, 0.004)
        along = (xx - px) * np.cos(a) + (yy - py) * np.sin(a)
        d = np.abs(-(xx - px) * np.sin(a) + (yy - py) * np.cos(a) - curve * along**2)
        img *= 1.0 - 0.6 * np.exp(-(d**2) / rng.uniform(0.3, 1.2))[..., None]
    # dermoscope: light level and the dark circular field of view
    vign = np.hypot((xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2))
    img *= rng.uniform(0.85, 1.1) * np.clip(1.25 - 0.9 * np.clip(vign - 0.6, 0, 1) * 2.2, 0.05, 1)[..., None]
    img += rng.normal(0, 0.012, size=img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# --- chest X-ray --------------------------------------------------------------------------
def chest_anatomy(rng: np.random.Generator) -> dict[str, Any]:
    """Parameters of one patient's chest: lung shape, heart size, rib spacing."""
    return {
        "lung_w": rng.uniform(0.17, 0.22), "lung_h": rng.uniform(0.30, 0.38),
        "heart": rng.uniform(0.12, 0.16), "rib_gap": rng.uniform(0.065, 0.085),
        "rib_phase": rng.uniform(0, 1), "body": rng.uniform(0.36, 0.44),
        "mark_seed": int(rng.integers(0, 2**31)),
    }


def draw_cxr(rng: np.random.Generator, an: dict[str, Any], size: int,
             findings: dict[str, bool]) -> np.ndarray:
    """One frontal chest-X-ray-like capture: uint8 greyscale array (size, size)."""
    h = w = size
    angle = np.deg2rad(rng.uniform(-4, 4))
    cx, cy = w * (0.5 + rng.uniform(-0.04, 0.04)), h * (0.5 + rng.uniform(-0.04, 0.04))
    x, y = _coords(h, w, cx, cy, angle, size)  # units of the image size, centred
    breath = rng.uniform(0.92, 1.08)  # inspiration changes lung height, not the ribs
    body = np.clip(1.0 - (np.abs(x) / an["body"]) ** 4, 0, 1)
    img = 0.05 + 0.6 * body * np.clip(1.2 - 0.4 * (y + 0.5), 0.5, 1)  # air, soft tissue
    lung = np.zeros((h, w))
    for side in (-1.0, 1.0):
        lx = (x - side * 0.15) / an["lung_w"]
        ly = (y + 0.02) / (an["lung_h"] * breath)
        ly = np.where(ly < 0, ly * 1.25, ly)  # apices are narrower than the bases
        lung += np.clip(1.0 - (lx**2 + ly**2) ** 1.5, 0, 1)
    lung = np.clip(lung * 1.6, 0, 1)
    if findings.get("effusion"):  # fluid fills the lower lung: the angle goes white
        lung *= np.clip(1.0 - (y - an["lung_h"] * 0.45 * breath) * 12, 0, 1)
    img -= 0.42 * lung * (1.0 + 0.2 * smooth_noise(rng, h, w, 12))
    img += 0.28 * np.clip(1.0 - (x / 0.05) ** 2, 0, 1) * (y < 0.3)  # mediastinum and spine
    heart_r = an["heart"] * (1.35 if findings.get("cardiomegaly") else 1.0)
    heart = np.clip(1.0 - ((x - 0.04) / (heart_r * 1.15)) ** 2 - ((y - 0.13) / heart_r) ** 2, 0, 1)
    img += 0.30 * np.sqrt(heart)
    ribs = np.cos(2 * np.pi * ((y - 1.2 * x**2) / an["rib_gap"] + an["rib_phase"]))
    img += 0.12 * np.clip(ribs, 0, 1) ** 3 * np.clip(lung * 2 + 0.2 * body, 0, 1)
    if findings.get("nodule"):
        nx, ny = rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.1)
        img += 0.25 * np.exp(-((x - nx) ** 2 + (y - ny) ** 2) / 0.0006)
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)  # exposure
    img += rng.normal(0, 0.02, size=img.shape)  # quantum noise
    out = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), "L")
    draw = ImageDraw.Draw(out)
    mx, my = int(rng.uniform(0.05, 0.2) * w), int(rng.uniform(0.05, 0.15) * h)
    draw.rectangle([mx, my, mx + size // 14, my + size // 12], fill=235)  # side marker
    draw.text((mx + 2, my + 1), "L" if rng.random() < 0.5 else "R", fill=20)
    if rng.random() < 0.4:  # ECG lead wire
        pts = [(int(rng.uniform(0, w)), int(rng.uniform(0, h))) for _ in range(3)]
        draw.line(pts, fill=int(rng.uniform(180, 250)), width=2)
    return np.asarray(out)


# --- outliers: not medical images at all --------------------------------------------------
def draw_outlier(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """A non-medical RGB image: ``text`` (a scanned page), ``pattern`` or ``landscape``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if kind == "text":
        page = Image.new("RGB", (w, h), (250, 250, 245))
        draw = ImageDraw.Draw(page)
        words = ["patient", "report", "consent", "the", "form", "date", "signed", "page"]
        for line in range(2, h // 12):
            txt = " ".join(words[int(i)] for i in rng.integers(0, len(words), size=4))
            draw.text((6, line * 11), txt, fill=(20, 20, 30))
        return np.asarray(page)
    if kind == "pattern":
        f = rng.uniform(6, 14)
        chk = ((np.floor(xx / f) + np.floor(yy / f)) % 2)[..., None]
        col = rng.uniform(0, 1, size=(2, 3))
        img = chk * col[0] + (1 - chk) * col[1]
    elif kind == "landscape":
        horizon = h * rng.uniform(0.35, 0.6) + 8 * smooth_noise(rng, 1, w, 5)[0]
        sky = np.array([0.45, 0.65, 0.95]) * (0.8 + 0.2 * (yy / h))[..., None]
        ground = np.array([0.25, 0.55, 0.2]) * (1 + 0.2 * smooth_noise(rng, h, w, 12))[..., None]
        img = np.where((yy > horizon[None, :])[..., None], ground, sky)
        sun = np.exp(-((xx - w * 0.75) ** 2 + (yy - h * 0.2) ** 2) / (w * 0.004 * w))
        img = img + sun[..., None] * np.array([1.0, 0.9, 0.4])
    else:
        raise ValueError(f"unknown outlier kind '{kind}'; use text, pattern or landscape")
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
