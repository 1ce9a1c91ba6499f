"""Reading image files safely: size, mode and sha256, DICOM headers, 8-bit renderings.

Every stage that opens pixels goes through here, so a broken file is described the same way
everywhere. :func:`inspect` never raises for a bad file: it returns an :class:`ImageInfo`
whose ``reason`` says what is wrong (zero-byte, not an image, truncated, decompression bomb,
DICOM without decodable pixels, a malformed DICOM value), ready to become a quarantine row. :func:`inspect_many` does
the same for many files on a thread pool (Pillow and hashlib release the GIL while decoding
and hashing). :func:`load_rgb` and :func:`render_8bit` give pixels for thumbnails and models:
EXIF orientation applied, CMYK / 16-bit / palette / greyscale converted, DICOM windowed.
DICOM is decoded by :mod:`medlake.catalog.dicom` (transfer syntaxes, photometric
interpretation, rescale and window, multi-frame policy) and nowhere else.

``width`` and ``height`` are as displayed, i.e. after the EXIF orientation is applied.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medlake.catalog.errors import CatalogError

# Pillow's own warning threshold (~89.5 megapixels); larger declared sizes are refused
# before any pixel is decoded.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# DICOM attributes that identify a person or a place; their presence is recorded in
# images.phi_tags so a datasheet can warn before anything is pushed.
PHI_TAGS = (
    "PatientName", "OtherPatientNames", "PatientBirthDate", "PatientAddress",
    "PatientTelephoneNumbers", "InstitutionName", "InstitutionAddress",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
)
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_TURNED = {2, 3, 4, 5, 6, 7, 8}  # EXIF orientations ImageOps.exif_transpose applies
_EXIF_ORIENTATION = 0x0112
_FULL_SIZE = "medlake_full_size"  # Image.info key: (w, h) of a JPEG decoded reduced
_DICOM_SUFFIXES = (".dcm", ".dicom")
_NOT_DICOM = "named like DICOM, but no 'DICM' marker at byte 128 and no DICOM data element at byte 0"


class ImageReadError(CatalogError):
    """An image file cannot be read; ``reason`` is the short quarantine reason."""

    def __init__(self, path: Path | str, reason: str, detail: str | None = None) -> None:
        msg = f"{path}: {reason}" + (f" ({detail})" if detail else "")
        super().__init__(msg)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`inspect` learnt about one file. ``reason`` is None when the file is good.

    DICOM files also fill ``patient_id``, ``study_uid``, ``series_uid``, ``modality``,
    ``view``, ``phi_tags`` (comma-separated names of identifying tags present, '' when
    none) and ``dicom_meta`` (JSON: frames, frame used, frame policy, transfer syntax,
    photometric interpretation); for other files those are None.
    """

    path: Path
    size: int | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    format: str | None = None
    reason: str | None = None
    detail: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    modality: str | None = None
    view: str | None = None
    phi_tags: str | None = None
    dicom_meta: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


def is_dicom(data: bytes, path: Path | str = "") -> bool:
    """True when ``data`` is DICOM: 'DICM' at byte 128, or (no preamble) a DICOM data element at byte 0.

    Decided by content only (see :func:`medlake.catalog.dicom.is_dicom`); ``path`` is kept
    for callers and ignored: a PNG named ``.dcm`` is read as a PNG.
    """
    from medlake.catalog import dicom

    return dicom.is_dicom(data)


def inspect(path: Path | str, *, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Read one file fully: sha256, size, mode; DICOM header fields; or why it is bad.

    Every byte is read and every pixel block decoded (a JPEG at its smallest DCT scale:
    the same checks, a fraction of the work; width and height are the full image's).

    Parameters
    ----------
    path
        The file.
    max_pixels
        Refuse images whose declared width x height exceeds this (decompression bombs).

    Returns
    -------
    ImageInfo
        ``reason`` is None for a good file; otherwise one of: 'missing file', 'not a file',
        'unreadable file', 'zero-byte file', 'not an image', 'decompression bomb',
        'truncated or corrupt image', 'unreadable DICOM' (also: a ``.dcm`` file that is
        neither DICOM nor an image), 'DICOM without pixel data', 'malformed DICOM value
        KEYWORD=\'value\'', 'undecodable DICOM pixel data' (truncated, corrupt, or a transfer
        syntax without a decoder).

    Example
    -------
    >>> info = inspect("scan.png")  # doctest: +SKIP
    >>> info.ok, info.width, info.height, info.mode  # doctest: +SKIP
    (True, 512, 512, 'L')
    """
    p = Path(path)
    try:
        if not p.is_file():
            return ImageInfo(p, reason="missing file" if not p.exists() else "not a file")
        data = p.read_bytes()
    except OSError as e:
        return ImageInfo(p, reason="unreadable file", detail=str(e))
    if not data:
        return ImageInfo(p, size=0, reason="zero-byte file")
    digest = hashlib.sha256(data).hexdigest()
    base = {"path": p, "size": len(data), "sha256": digest}
    if is_dicom(data, p):
        return _inspect_dicom(data, base, max_pixels)
    try:
        # a JPEG is decoded at its smallest DCT scale: every entropy-coded block is still
        # read (truncation and corrupt data show the same), the size is the header's
        im = _open(data, p, max_pixels, min_side=1)
        w, h = full_size(im)
        if _orientation(im) in _ROTATED:
            w, h = h, w
        return ImageInfo(**base, width=w, height=h, mode=im.mode, format=im.format)
    except ImageReadError as e:
        if e.reason == "not an image" and p.suffix.lower() in _DICOM_SUFFIXES:
            return ImageInfo(**base, format="DICOM", reason="unreadable DICOM", detail=_NOT_DICOM)
        return ImageInfo(**base, reason=e.reason, detail=e.detail)


def inspect_many(
    paths: Iterable[Path | str], *, max_pixels: int = MAX_PIXELS, workers: int | None = None
) -> list[ImageInfo]:
    """:func:`inspect` for many files on a thread pool; results in the order of ``paths``."""
    items = list(paths)
    n = workers or min(8, (os.cpu_count() or 2) + 2)
    if len(items) < 4 or n <= 1:
        return [inspect(p, max_pixels=max_pixels) for p in items]
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda p: inspect(p, max_pixels=max_pixels), items, chunksize=16))


def open_image(path: Path | str, *, max_pixels: int = MAX_PIXELS,
               min_side: int | None = None) -> Image.Image:
    """Open and fully decode an image, EXIF orientation applied.

    A DICOM file gives its 8-bit rendering (:func:`render_8bit`: mode 'L' or 'RGB',
    ``format`` 'DICOM').

    ``min_side``: the caller shrinks the image to about this many pixels a side, so a JPEG
    may be decoded at 1/2, 1/4 or 1/8 of its size in the DCT (Pillow's ``draft``; several
    times faster for large files) as long as its shorter side stays at least ``min_side``;
    :func:`full_size` gives the size of the whole image either way. Other formats decode
    in full.

    Raises
    ------
    ImageReadError
        Zero-byte, not an image, truncated or corrupt, or larger than ``max_pixels``; for
        DICOM the reasons of :func:`inspect`.
    """
    p = Path(path)
    return decode(_read(p), p, max_pixels=max_pixels, min_side=min_side)


def decode(data: bytes, path: Path | str, *, max_pixels: int = MAX_PIXELS,
           min_side: int | None = None) -> Image.Image:
    """:func:`open_image` of a file's bytes ``data`` already read (``path``: its name, for
    DICOM detection and messages)."""
    p = Path(path)
    if not data:
        raise ImageReadError(p, "zero-byte file")
    if is_dicom(data, p):
        return _dicom_image(data, p, max_pixels)
    im = _not_dicom(lambda: _open(data, p, max_pixels, min_side), p)
    return _transposed(im)


def reduces(im: Image.Image, min_side: int | None) -> bool:
    """Whether :func:`open_image` with ``min_side`` decodes this image (opened, or decoded in
    full) at a reduced DCT scale: a JPEG whose shorter side is at least twice ``min_side``."""
    return bool(min_side) and im.format == "JPEG" and min(im.size) >= 2 * min_side


def full_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of the whole image, also when :func:`open_image` decoded it reduced."""
    return tuple(im.info.get(_FULL_SIZE, im.size))  # type: ignore[return-value]


def _keep_full_size(out: Image.Image, src: Image.Image) -> Image.Image:
    """``out`` (a conversion of ``src``) with ``src``'s :func:`full_size` when it was reduced."""
    if _FULL_SIZE in src.info:
        out.info[_FULL_SIZE] = src.info[_FULL_SIZE]
    return out


def _transposed(im: Image.Image) -> Image.Image:
    """EXIF orientation applied; a reduced decode's full size turned with it. ``im`` itself
    (not a copy, its ``format`` kept) when there is nothing to apply."""
    if _orientation(im) not in _TURNED:
        return im
    full = im.info.get(_FULL_SIZE)
    before = im.size
    out = ImageOps.exif_transpose(im)
    out.format = im.format
    if full is not None:
        out.info[_FULL_SIZE] = full if out.size == before else (full[1], full[0])
    return out


def load_rgb(path: Path | str, *, max_pixels: int = MAX_PIXELS,
             min_side: int | None = None) -> Image.Image:
    """Any supported file as an 8-bit RGB image (for thumbnails, hashes and models).

    CMYK and palette images are converted, 16-bit greyscale is scaled to 8 bits by its own
    range, transparency is flattened onto white and DICOM is windowed (:func:`render_8bit`).
    ``min_side``: as :func:`open_image` (a large JPEG may be decoded reduced).
    """
    im = open_image(path, max_pixels=max_pixels, min_side=min_side)
    return _keep_full_size(to_rgb(im), im)


def to_8bit(im: Image.Image) -> Image.Image:
    """:func:`to_rgb`, except that an 8-bit greyscale image ('L') stays greyscale.

    Its RGB form repeats the grey value in each channel, and both Pillow's and OpenCV's
    RGB-to-grey conversions give that value back exactly (their weights sum to one in fixed
    point), so callers that need grey skip two copies of the pixels and get the same values.
    """
    return im if im.mode == "L" else to_rgb(im)


def load_8bit(path: Path | str, *, max_pixels: int = MAX_PIXELS,
              min_side: int | None = None) -> Image.Image:
    """:func:`load_rgb`, except that an 8-bit greyscale file stays greyscale (:func:`to_8bit`).

    ``min_side``: as :func:`open_image` (a JPEG may be decoded reduced); the result keeps
    :func:`full_size`.
    """
    im = open_image(path, max_pixels=max_pixels, min_side=min_side)
    return _keep_full_size(to_8bit(im), im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a decoded Pillow image of any mode to 8-bit RGB."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        return Image.fromarray(_scale(arr)).convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def render_8bit(path: Path | str, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An 8-bit greyscale (DICOM: windowed) or RGB rendering of ``path`` for thumbnails.

    DICOM (:func:`medlake.catalog.dicom.render_8bit`): one frame by the multi-frame policy;
    Modality LUT or rescale, then the first VOI LUT or WindowCenter/WindowWidth, else the
    pixel range; MONOCHROME1 inverted so that air is black; YBR and PALETTE COLOR as RGB.
    """
    p = Path(path)
    data = _read(p)
    if is_dicom(data, p):
        return _dicom_image(data, p, max_pixels)
    return load_rgb(p, max_pixels=max_pixels)


def window(arr: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI window (PS3.3 C.11.2.1.2) of ``arr`` to uint8 0..255."""
    width = max(float(width), 1.0)
    lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    out = np.where(arr <= lo, 0.0, np.where(arr > hi, 255.0, ((arr - (center - 0.5)) / (width - 1) + 0.5) * 255))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


IMAGE_BLOCKS = 16  # freed Pillow image blocks kept for reuse inside image_pool (each <= 16 MiB)


@contextmanager
def image_pool() -> Iterator[None]:
    """Settings for a thread pool that decodes and processes images, restored after.

    * OpenCV's own thread pool off: our pool already runs one image (or pair) per core, and
      OpenCV's parallel loops on small images only add threads that spin (measured: ~5% more
      CPU per verified pair on 5k images; fingerprint ~1 s of ~18 s CPU on 4,833 images).
    * Pillow keeps up to :data:`IMAGE_BLOCKS` freed image blocks for reuse instead of handing
      each back to the allocator: every decode and conversion otherwise maps fresh pages
      (measured, fingerprint of 4,833 images: ~400-550k page faults -> ~30k, ~0.7-1.2 s
      less kernel CPU). The cache holds at most that many blocks of at most Pillow's block size.
    * numpy's BLAS on one thread per call, for the same reason: fingerprint's hash reductions
      are matrix products (measured, 1,000 images of 640-1024 px, 2 workers: 27-29 ms per
      image with BLAS's own threads, 13.9 ms with one).
    """
    import cv2  # here: every medlake command imports this module
    from threadpoolctl import threadpool_limits

    threads, blocks = cv2.getNumThreads(), Image.core.get_blocks_max()
    cv2.setNumThreads(1)
    Image.core.set_blocks_max(max(blocks, IMAGE_BLOCKS))
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        cv2.setNumThreads(threads)
        Image.core.set_blocks_max(blocks)  # (frees the blocks cached above the old limit)


def resolve_inside(root: Path, rel: str) -> Path:
    """``root / rel`` with symlinks resolved, refusing anything that escapes ``root``.

    Raises
    ------
    ImageReadError
        ``rel`` is empty or absolute, or it (through ``..`` or a symlink) resolves to a
        place outside ``root``.
    """
    return InsideResolver(root)(rel)


class InsideResolver:
    """:func:`resolve_inside` of many paths under one ``root``: the root and each folder
    resolved once, then one ``lstat`` per file (is it a symlink?) instead of one per path
    component (a 100k-image dataset: ~1.5M ``lstat`` calls, ~1 s per stage here).

    The same result as resolving the whole path: resolution goes left to right, so
    ``realpath(folder / name)`` is ``realpath(folder) / name`` unless ``name`` is itself a
    symlink (then resolved in full), ``.``, ``..`` or empty (resolved in full).
    """

    def __init__(self, root: Path) -> None:
        self.base = Path(root).resolve()
        self._folders: dict[str, Path] = {"": self.base}

    def __call__(self, rel: str) -> Path:
        text = rel.strip().replace("\\", "/")
        if not text:
            raise ImageReadError(rel, "empty path")
        if text.startswith("/") or Path(text).is_absolute() or (len(text) > 1 and text[1] == ":"):
            raise ImageReadError(rel, "absolute path (paths must be relative to the images root)")
        head, _, name = text.rpartition("/")
        try:
            if name in ("", ".", ".."):
                target = (self.base / text).resolve()
            else:
                folder = self._folders.get(head)
                if folder is None:
                    folder = self._folders[head] = (self.base / head).resolve()
                target = folder / name
                if target.is_symlink():
                    target = target.resolve()
        except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError in Python 3.11)
            raise ImageReadError(rel, "unresolvable path", f"{e} (a symlink loop?)") from None
        if target != self.base and self.base not in target.parents:
            raise ImageReadError(rel, "path resolves outside the images root", "via '..' or a symlink")
        return target


# --- internals --------------------------------------------------------------------------------
def _read(p: Path) -> bytes:
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(p, "missing file") from None
    except OSError as e:
        raise ImageReadError(p, "unreadable file", str(e)) from e
    if not data:
        raise ImageReadError(p, "zero-byte file")
    return data


def _open(data: bytes, p: Path, max_pixels: int, min_side: int | None = None) -> Image.Image:
    """Decode all pixels (so truncation shows), refusing bombs before decoding; a JPEG at a
    reduced scale whose shorter side stays >= ``min_side`` (:func:`open_image`)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise ImageReadError(
                    p, "decompression bomb", f"declared {w}x{h} = {w * h:,} pixels > {max_pixels:,}"
                )
            if reduces(im, min_side):
                k = min(w, h) / min_side  # draft picks the largest 1/2^n with both sides >= the request
                im.draft(im.mode, (int(np.ceil(w / k)), int(np.ceil(h / k))))
                if im.size != (w, h):
                    im.info[_FULL_SIZE] = (w, h)
            im.load()
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageReadError(p, "decompression bomb", str(e)) from e
    except UnidentifiedImageError as e:
        raise ImageReadError(p, "not an image", "no image format recognised") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        raise ImageReadError(p, "truncated or corrupt image", str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    return im


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except (AttributeError, KeyError, OSError, SyntaxError, TypeError, ValueError):
        # a broken EXIF block must not reject a decodable image
        return 1


def _scale(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.clip(np.rint((arr - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)


def _not_dicom(open_fn: Any, p: Path) -> Image.Image:
    """Run ``open_fn``; a ``.dcm`` file that is no image is reported as unreadable DICOM."""
    try:
        return open_fn()
    except ImageReadError as e:
        if e.reason == "not an image" and p.suffix.lower() in _DICOM_SUFFIXES:
            raise ImageReadError(p, "unreadable DICOM", _NOT_DICOM) from e
        raise


def _inspect_dicom(data: bytes, base: dict[str, Any], max_pixels: int) -> ImageInfo:
    from medlake.catalog import dicom

    p = base["path"]
    try:
        img = dicom.decode(data, p, max_pixels=max_pixels)
        dicom.render_8bit(img, p)  # what every later stage will need: refuse it here if it fails
        ds = img.ds
        phi = [t for t in PHI_TAGS if dicom.header_text(ds, t, p)]
        fields = {k: dicom.header_text(ds, t, p) for k, t in (
            ("patient_id", "PatientID"), ("study_uid", "StudyInstanceUID"),
            ("series_uid", "SeriesInstanceUID"), ("modality", "Modality"), ("view", "ViewPosition"))}
    except ImageReadError as e:
        return ImageInfo(**base, format="DICOM", reason=e.reason, detail=e.detail)
    return ImageInfo(
        **base, width=img.width, height=img.height, mode=img.mode, format="DICOM", **fields,
        phi_tags=",".join(phi), dicom_meta=json.dumps(img.meta(), separators=(",", ":")),
    )


def _dicom_image(data: bytes, p: Path, max_pixels: int) -> Image.Image:
    """The 8-bit rendering of a DICOM file as a Pillow image (format 'DICOM')."""
    from medlake.catalog import dicom

    im = Image.fromarray(dicom.render_8bit(dicom.decode(data, p, max_pixels=max_pixels), p))
    im.format = "DICOM"
    return im
