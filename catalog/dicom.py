"""DICOM as users have it: one decode path for every stage that opens DICOM pixels.

:func:`decode` turns the bytes of a DICOM file into one frame of stored pixel values plus
the header; :func:`render_8bit` turns that frame into the 8-bit picture every stage uses
(thumbnails, hashes, models). :mod:`medlake.catalog.imageio` calls these two and nothing
else, so ingest, fingerprint, embed, duplicates and the UI all see the same pixels.

What is handled
---------------
- **Transfer syntaxes**: native (implicit / explicit VR, little / big endian, deflated) by
  pydicom; JPEG baseline / extended / lossless, JPEG-LS, JPEG 2000 and RLE by the decoder
  plugins installed with medlake (GDCM, pylibjpeg + pylibjpeg-openjpeg + pylibjpeg-rle,
  pyjpegls: all permissively licensed). 12-bit JPEG Extended, which pydicom's GDCM plugin
  refuses, is decoded by GDCM's own reader. Video syntaxes (MPEG-2, H.264, HEVC) have no
  decoder: such files are quarantined as undecodable.
- **No preamble**: a file without the 128-byte preamble and 'DICM' marker is read when it
  starts with a plausible DICOM data element (group 0002-0028, a valid VR or length);
  anything else is not DICOM. A missing Transfer Syntax UID is taken from the encoding
  pydicom found.
- **Photometric interpretation**: YBR_* become RGB (pydicom's ``as_rgb``), PALETTE COLOR is
  mapped through its lookup table, MONOCHROME1 is inverted after windowing so air is black.
- **Modality and VOI**: Modality LUT or Rescale Slope / Intercept, then the first VOI LUT or
  Window Center / Width (VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID), scaled from the
  window's output range to 0..255; without any, the frame's own value range. For enhanced
  multi-frame files the shared and per-frame functional groups supply these values.
- **Multi-frame policy**: one frame is decoded and rendered, chosen by ``frame`` or the
  ``MEDLAKE_DICOM_FRAME`` environment variable: ``first`` (default), ``middle``, ``last``
  or a 0-based index (clamped to the last frame). :meth:`DicomImage.meta` records the frame
  count, the frame used and the policy; the generic adapter keeps them in ``images.meta``.
- **Malformed values**: a pixel-describing or catalogued header value that cannot be
  parsed (e.g. ``NumberOfFrames = '1A'``) raises :class:`~medlake.catalog.imageio.ImageReadError`
  with reason ``malformed DICOM value NumberOfFrames='1A'``; it never escapes as another
  exception, so one bad file never stops an ingest.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medlake.catalog.errors import CatalogError
from medlake.catalog.imageio import ImageReadError

FRAME_ENV = "MEDLAKE_DICOM_FRAME"
FRAME_POLICIES = ("first", "middle", "last")
DEFAULT_FRAME_POLICY = "first"
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# header values read as numbers: checked before decoding, so a malformed one is named
_INTS = ("Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated", "BitsStored",
         "HighBit", "PixelRepresentation", "PlanarConfiguration")
_FLOATS = ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth")
_TEXTS = ("PhotometricInterpretation", "VOILUTFunction")
# groups a DICOM stream without preamble starts with (file meta, identifying, ..., image)
_FIRST_GROUPS = frozenset({0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028})
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
    b"UR US UT UV".split()
)
_GDCM_DTYPES = {"UINT8": np.uint8, "INT8": np.int8, "UINT16": np.uint16, "INT16": np.int16,
                "UINT32": np.uint32, "INT32": np.int32, "FLOAT32": np.float32, "FLOAT64": np.float64}


@dataclass(frozen=True)
class DicomImage:
    """One decoded frame of a DICOM file and its header.

    Attributes
    ----------
    ds : pydicom.Dataset
        The header, with checked numeric values and, for enhanced multi-frame files, the
        chosen frame's rescale and window copied to the top level.
    pixels : numpy.ndarray
        Stored values of the chosen frame: ``(rows, columns)`` for greyscale,
        ``(rows, columns, 3)`` RGB for colour (YBR converted, palette applied).
    frames : int
        Number of frames in the file.
    frame : int
        0-based index of the decoded frame.
    policy : str
        The frame policy that chose it.
    transfer_syntax : str
        Transfer Syntax UID (for a file without one, the encoding pydicom read).
    photometric : str
        Photometric Interpretation as stored.
    syntax_guessed : bool
        True when the file named no Transfer Syntax UID.
    """

    ds: Any
    pixels: np.ndarray
    frames: int
    frame: int
    policy: str
    transfer_syntax: str
    photometric: str
    syntax_guessed: bool = False

    @property
    def colour(self) -> bool:
        """True for RGB pixels (RGB, YBR_* or PALETTE COLOR in the file)."""
        return self.pixels.ndim == 3

    @property
    def mode(self) -> str:
        """Pillow-style mode of the stored frame: 'RGB', 'F' (float), 'L' (<= 8 bits), 'I;16' or 'I' (> 16 bits)."""
        if self.colour:
            return "RGB"
        if self.pixels.dtype.kind == "f":
            return "F"
        bits = _int(self.ds, "BitsStored", 8)
        return "L" if bits <= 8 else "I;16" if bits <= 16 else "I"

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    def meta(self) -> dict[str, Any]:
        """What the decode chose, for ``images.meta``: frames, frame, policy, syntax, photometric."""
        out: dict[str, Any] = {"frames": self.frames, "frame": self.frame, "frame_policy": self.policy,
                               "transfer_syntax": self.transfer_syntax, "photometric": self.photometric}
        if self.syntax_guessed:
            out["transfer_syntax_guessed"] = True
        return out


# --- public ----------------------------------------------------------------------------------
def is_dicom(data: bytes) -> bool:
    """True when ``data`` is DICOM: 'DICM' at byte 128, or a plausible data element at byte 0.

    The second case accepts files written without the preamble (raw datasets, ACR-NEMA style
    streams): the first element's group is one of 0002, 0008, 0010, 0018, 0020, 0028 in
    little- or big-endian order, followed by a valid explicit VR or a plausible implicit
    length. Text, JSON, gzip, ICC profiles and ordinary images fail this test.
    """
    if data[128:132] == b"DICM":
        return True
    if len(data) < 8:
        return False
    for order in "<>":
        group, _elem = struct.unpack(order + "HH", data[:4])
        if group not in _FIRST_GROUPS:
            continue
        if data[4:6] in _VRS:
            return True
        (length,) = struct.unpack(order + "I", data[4:8])
        if length == 0xFFFFFFFF or (length % 2 == 0 and length <= len(data) - 8):
            return True
    return False


def frame_policy(frame: int | str | None = None) -> str:
    """The multi-frame policy in force: ``frame`` if given, else ``$MEDLAKE_DICOM_FRAME``, else 'first'.

    Raises
    ------
    CatalogError
        The value is neither 'first', 'middle', 'last' nor a non-negative integer (a
        configuration error: it stops the run rather than quarantining every file).
    """
    raw = frame if frame is not None else os.environ.get(FRAME_ENV, "") or DEFAULT_FRAME_POLICY
    text = str(raw).strip().lower()
    if text in FRAME_POLICIES or (text.isdigit() and not isinstance(raw, bool)):
        return text
    raise CatalogError(f"DICOM frame policy {raw!r}: use first, middle, last or a 0-based frame "
                       f"number (argument frame= or ${FRAME_ENV})")


def frame_index(policy: str, frames: int) -> int:
    """0-based frame chosen by ``policy`` among ``frames`` (an index is clamped to the last)."""
    last = max(frames, 1) - 1
    if policy == "first":
        return 0
    if policy == "middle":
        return last // 2
    if policy == "last":
        return last
    return min(int(policy), last)


def read_dataset(data: bytes, path: Path | str = "") -> Any:
    """Parse a DICOM file's bytes (with or without preamble) into a pydicom Dataset.

    A missing Transfer Syntax UID is filled in from the encoding pydicom read.

    Raises
    ------
    ImageReadError
        'unreadable DICOM' when pydicom cannot parse the stream.
    """
    return _read(data, path)[0]


def _read(data: bytes, path: Path | str) -> tuple[Any, bool]:
    """:func:`read_dataset` plus whether the transfer syntax was guessed."""
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    except Exception as e:  # pydicom raises many types for a broken stream
        raise ImageReadError(path, "unreadable DICOM", _first_line(e)) from e
    if not len(ds):
        raise ImageReadError(path, "unreadable DICOM", "no data elements")
    meta, guessed = getattr(ds, "file_meta", None), False
    if meta is None or not meta.get("TransferSyntaxUID"):
        # no file meta (or a meta group without the syntax): use the encoding pydicom read
        from pydicom.dataset import FileMetaDataset

        implicit, little = ds.original_encoding
        if implicit is not None and little is not None:
            if meta is None:
                ds.file_meta = meta = FileMetaDataset()
            meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
            guessed = True
    return ds, guessed


def decode(data: bytes, path: Path | str = "", *, max_pixels: int, frame: int | str | None = None) -> DicomImage:
    """Decode one frame of a DICOM file (the one the frame policy picks).

    Parameters
    ----------
    data
        The whole file.
    path
        For messages only.
    max_pixels
        Refuse frames whose declared rows x columns exceeds this (decompression bombs).
    frame
        Frame policy: 'first', 'middle', 'last' or a 0-based index; default
        ``$MEDLAKE_DICOM_FRAME`` or 'first'.

    Returns
    -------
    DicomImage

    Raises
    ------
    ImageReadError
        'unreadable DICOM', 'DICOM without pixel data', 'malformed DICOM value KW=...',
        'decompression bomb' or 'undecodable DICOM pixel data' (truncated, corrupt, a
        required element missing, or a transfer syntax without a decoder).
    """
    policy = frame_policy(frame)
    try:
        return _decode(data, path, max_pixels, policy)
    except (ImageReadError, CatalogError):
        raise
    except Exception as e:  # anything unforeseen in a file is that file's problem, not the run's
        raise ImageReadError(path, "undecodable DICOM pixel data", f"{type(e).__name__}: {_first_line(e)}") from e


def _decode(data: bytes, path: Path | str, max_pixels: int, policy: str) -> DicomImage:
    ds, guessed = _read(data, path)
    _check_values(ds, path)
    if not any(k in ds for k in PIXEL_KEYWORDS):
        raise ImageReadError(path, "DICOM without pixel data")
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    if rows * cols > max_pixels:
        raise ImageReadError(path, "decompression bomb", f"declared {cols}x{rows} pixels per frame > {max_pixels:,}")
    frames = max(_int(ds, "NumberOfFrames", 1), 1)
    index = frame_index(policy, frames)
    ts = str(ds.file_meta.get("TransferSyntaxUID", "") or "") if hasattr(ds, "file_meta") else ""
    photometric = str(_text(ds, "PhotometricInterpretation") or "")
    arr = _decode_frame(ds, data, path, index, frames, ts)
    if _use_frame_groups(ds, index):
        _check_values(ds, path)
    if photometric == "PALETTE COLOR" and arr.ndim == 2:
        arr = _palette(ds, arr, path)
    if arr.ndim == 3 and arr.shape[-1] != 3:
        raise ImageReadError(path, "undecodable DICOM pixel data", f"unexpected pixel array shape {arr.shape}")
    return DicomImage(ds=ds, pixels=arr, frames=frames, frame=index, policy=policy,
                      transfer_syntax=ts, photometric=photometric, syntax_guessed=guessed)


def render_8bit(img: DicomImage, path: Path | str = "") -> np.ndarray:
    """The 8-bit picture of a decoded frame: ``(rows, cols)`` greyscale or ``(rows, cols, 3)`` RGB.

    Greyscale: Modality LUT / rescale, then the first VOI LUT or window (scaled from its
    output range to 0..255), else the value range; MONOCHROME1 inverted afterwards.
    Colour: values scaled from ``BitsStored`` (or the palette's 16 bits) to 8 bits.

    Raises
    ------
    ImageReadError
        'undecodable DICOM pixel data' when a lookup table or value breaks the rendering.
    """
    try:
        return _render(img)
    except Exception as e:  # a broken Modality LUT and the like: that file's problem
        raise ImageReadError(path, "undecodable DICOM pixel data", f"rendering: {_first_line(e)}") from e


def _render(img: DicomImage) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    ds, arr = img.ds, img.pixels
    if img.colour:
        if arr.dtype == np.uint8:
            return np.ascontiguousarray(arr)
        top = 65535 if img.photometric == "PALETTE COLOR" else 2 ** min(_int(ds, "BitsStored", 16), 32) - 1
        return np.clip(np.rint(arr.astype(np.float64) / max(top, 1) * 255), 0, 255).astype(np.uint8)
    if arr.dtype.kind == "f":
        return _scale(arr)
    values = apply_modality_lut(arr, ds) if _has_modality(ds) else arr.astype(np.float64)
    out: np.ndarray | None = None
    voi = ds.get("VOILUTSequence")
    if voi:
        try:
            # the LUT's output range: every entry, read the way apply_voi reads them (US or OW)
            n, first = int(voi[0].LUTDescriptor[0]) or 65536, int(voi[0].LUTDescriptor[1])
            entries = apply_voi(np.arange(first, first + n, dtype=np.float64), ds, 0)
            out = _span(apply_voi(values, ds, 0), float(np.min(entries)), float(np.max(entries)))
        except Exception:  # noqa: BLE001 - a broken VOI LUT: fall back to the window or the value range
            out = None
    if out is None and _window_ok(ds):
        lo, hi = _window_range(ds)
        out = _span(apply_windowing(values, ds, 0), lo, hi)
    if out is None:
        out = _scale(values)
    if img.photometric == "MONOCHROME1":
        out = 255 - out
    return out


def header_text(ds: Any, keyword: str, path: Path | str = "") -> str | None:
    """A header value as stripped text (None when absent or empty); malformed -> ImageReadError."""
    try:
        return _text(ds, keyword)
    except Exception as e:
        raise ImageReadError(path, f"malformed DICOM value {keyword}={_raw(ds, keyword)!r}", _first_line(e)) from e


# --- internals -------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


def _raw(ds: Any, keyword: str) -> str:
    """The stored text of an element, for messages (at most 64 characters)."""
    try:
        v = ds.get_item(keyword).value
    except Exception:  # noqa: BLE001 - only for a message
        return "?"
    if isinstance(v, bytes):
        v = v.decode("latin-1", "replace")
    text = "\\".join(str(x) for x in v) if isinstance(v, list | tuple) else str(v)
    text = text.strip().strip("\0")
    return text if len(text) <= 64 else text[:61] + "..."


def _values(ds: Any, keyword: str) -> list[Any]:
    if keyword not in ds:
        return []
    v = ds[keyword].value
    if v is None or v == "" or v == b"":
        return []
    return list(v) if not isinstance(v, str | bytes) and hasattr(v, "__iter__") else [v]


def _check_values(ds: Any, path: Path | str) -> None:
    """Raise 'malformed DICOM value KW=...' for the first numeric/text value that does not parse."""
    for kw in (*_INTS, *_FLOATS, *_TEXTS):
        try:
            vals = _values(ds, kw)
            for v in vals:
                if kw in _INTS:
                    if isinstance(v, str | bytes) or int(v) != float(v):
                        raise ValueError(f"not an integer: {v!r}")
                elif kw in _FLOATS:
                    if isinstance(v, str | bytes) or not np.isfinite(float(v)):
                        raise ValueError(f"not a number: {v!r}")
                elif not isinstance(v, str):
                    raise ValueError(f"not text: {v!r}")
        except Exception as e:
            raise ImageReadError(path, f"malformed DICOM value {kw}={_raw(ds, kw)!r}", _first_line(e)) from e


def _int(ds: Any, keyword: str, default: int) -> int:
    vals = _values(ds, keyword)
    return int(vals[0]) if vals else default


def _float(ds: Any, keyword: str) -> float | None:
    vals = _values(ds, keyword)
    return float(vals[0]) if vals else None


def _text(ds: Any, keyword: str) -> str | None:
    v = ds.get(keyword)
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _decode_frame(ds: Any, data: bytes, path: Path | str, index: int, frames: int, ts: str) -> np.ndarray:
    from pydicom.uid import JPEGExtended12Bit

    try:
        ds.pixel_array_options(index=index if frames > 1 else None, as_rgb=True)
        arr = np.asarray(ds.pixel_array)
    except Exception as e:  # pydicom raises many types for short or undecodable pixel data
        if ts == JPEGExtended12Bit and _int(ds, "BitsStored", 8) > 8:
            arr = _gdcm_frame(data, path, index, e)
        else:
            raise ImageReadError(path, "undecodable DICOM pixel data", _decode_detail(e, ts)) from e
    if arr.ndim >= 3 and arr.shape[0] == frames and frames > 1 and arr.shape[-1] != 3:
        arr = arr[index]  # a plugin ignored the index option
    if arr.ndim == 4:
        arr = arr[index]
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ImageReadError(path, "undecodable DICOM pixel data", f"unexpected pixel array shape {arr.shape}")
    return arr


def _decode_detail(e: BaseException, ts: str) -> str:
    from pydicom.uid import UID

    text = _first_line(e)
    if "No pixel data decoders have been implemented" in str(e):
        return f"no decoder for transfer syntax {UID(ts).name} ({ts})" if ts else text
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Unable to decode as exceptions were raised"):
        return "; ".join(lines[1:4])[:300]
    return text


def _gdcm_frame(data: bytes, path: Path | str, index: int, cause: BaseException) -> np.ndarray:
    """12-bit JPEG Extended through GDCM's own reader (pydicom's GDCM plugin refuses it)."""
    try:
        import gdcm
    except ImportError:
        raise ImageReadError(path, "undecodable DICOM pixel data", _first_line(cause)) from cause
    gdcm.Trace.WarningOff()
    gdcm.Trace.ErrorOff()
    with tempfile.NamedTemporaryFile(suffix=".dcm") as fh:
        fh.write(data)
        fh.flush()
        reader = gdcm.ImageReader()
        reader.SetFileName(fh.name)
        ok = reader.Read()
        img = reader.GetImage() if ok else None
        buf = img.GetBuffer() if img is not None else None
    if not buf:
        raise ImageReadError(path, "undecodable DICOM pixel data", _first_line(cause))
    dtype = _GDCM_DTYPES.get(img.GetPixelFormat().GetScalarTypeAsString())
    dims = [img.GetDimension(i) for i in range(img.GetNumberOfDimensions())]
    spp = img.GetPixelFormat().GetSamplesPerPixel()
    raw = buf.encode("utf-8", "surrogateescape")
    cols, rows = dims[0], dims[1]
    nframes = dims[2] if len(dims) > 2 else 1
    if dtype is None or len(raw) != rows * cols * nframes * spp * np.dtype(dtype).itemsize:
        raise ImageReadError(path, "undecodable DICOM pixel data", _first_line(cause))
    arr = np.frombuffer(raw, dtype=dtype).reshape((nframes, rows, cols, spp))[min(index, nframes - 1)]
    return arr[..., 0].copy() if spp == 1 else arr.copy()


def _palette(ds: Any, arr: np.ndarray, path: Path | str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    try:
        return np.asarray(apply_color_lut(arr, ds))
    except Exception as e:
        raise ImageReadError(path, "undecodable DICOM pixel data", f"PALETTE COLOR lookup table: {_first_line(e)}") from e


def _use_frame_groups(ds: Any, index: int) -> bool:
    """Copy the frame's rescale and window from enhanced functional groups to the top level.

    Returns True when anything was copied (the caller checks the copied values).
    """
    copied = False
    groups = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per and index < len(per):
        groups.append(per[index])
    for g in groups:
        for seq, kws in (("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
                         ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction"))):
            items = g.get(seq)
            if not items:
                continue
            item = items[0]
            for kw in kws:
                if kw in item and item[kw].value not in (None, ""):
                    ds[kw] = item[kw]
                    copied = True
    return copied


def _has_modality(ds: Any) -> bool:
    return bool(ds.get("ModalityLUTSequence")) or ("RescaleSlope" in ds and "RescaleIntercept" in ds
                                                   and _float(ds, "RescaleSlope") is not None
                                                   and _float(ds, "RescaleIntercept") is not None)


def _window_ok(ds: Any) -> bool:
    """A usable window: center and width present, width valid for the VOI LUT function."""
    c, w = _float(ds, "WindowCenter"), _float(ds, "WindowWidth")
    if c is None or w is None:
        return False
    func = str(_text(ds, "VOILUTFunction") or "LINEAR").upper()
    if func == "LINEAR":
        return w >= 1
    return func in ("LINEAR_EXACT", "SIGMOID") and w > 0


def _window_range(ds: Any) -> tuple[float, float]:
    """Output range of pydicom's apply_windowing for ``ds`` (PS3.3 C.11.2.1.2)."""
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    bits = _int(ds, "BitsStored", 16)
    if _int(ds, "PixelRepresentation", 0) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = _float(ds, "RescaleSlope"), _float(ds, "RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * slope + intercept, hi * slope + intercept
    return lo, hi


def _span(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``lo..hi`` (either order) linearly to 0..255 uint8."""
    if hi == lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.clip(np.rint((np.asarray(arr, dtype=np.float64) - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)


def _scale(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float64)
    finite = a[np.isfinite(a)]
    if not finite.size:
        return np.zeros(a.shape, dtype=np.uint8)
    return _span(np.nan_to_num(a, nan=float(finite.min())), float(finite.min()), float(finite.max()))
