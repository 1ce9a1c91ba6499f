"""descriptor-v1 vectors computed by ``fingerprint`` from its own decode, for ``embed``.

``fingerprint`` decodes every image in full already; the weights-free descriptor
(:class:`catalog.embedders.DescriptorEmbedder`) needs that decode plus ~1 ms, while ``embed``
decoding the file again costs ~4 ms for a 900-px PNG (a PNG has no reduced decode). So
``fingerprint`` computes each image's descriptor from the very pixels ``embed`` would decode
(:func:`descriptor_input`: the same decode, a large JPEG at the same reduced DCT scale) and
leaves it here; ``embed`` takes the vectors it finds and decodes only the rest. The vectors
are identical either way (tests/test_embed.py), so this is a cache, not a table: not tracked
by DVC, never read by anything else, and safe to delete (``lake/cache/``).

A cache folder is named after everything the vector depends on besides the file's bytes
(:func:`code_tag`: the source of the descriptor and decoding modules and the versions of the
decoding libraries), so vectors of other code are never read; fingerprint removes the
folders of other tags when it writes. Entries are keyed by (image_id, sha256): a changed file
is a miss. One Parquet file per dataset, replaced whole (atomically) by each fingerprint run
of that dataset; ``embed`` streams them in record batches (memory: one batch, not the cache).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from functools import cache
from importlib import metadata
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from medlake.catalog import dicom, embedders, imageio
from medlake.catalog.embedders import DESCRIPTOR, DescriptorEmbedder
from medlake.catalog.tables import safe_name, write_parquet_atomic

# the decoders whose output the vector depends on (with the modules hashed in code_tag)
_LIBRARIES = ("pillow", "opencv-python-headless", "numpy", "pydicom", "python-gdcm",
              "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "pyjpegls")
_BATCH = 8192  # rows per record batch read back


@cache
def code_tag(name: str = DESCRIPTOR, modules: tuple[ModuleType, ...] | None = None) -> str:
    """12 hex digits naming a cache's code: ``name``, the sources of ``modules`` (default:
    the descriptor's and the decoders' modules) and the installed versions of the decoding
    libraries (``pipelines.features`` names its own module and the decoders')."""
    h = hashlib.sha256(name.encode())
    for mod in modules or (embedders, imageio, dicom):
        h.update(Path(mod.__file__).read_bytes())
    for dist in _LIBRARIES:
        try:
            h.update(f"{dist}={metadata.version(dist)};".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=-;".encode())
    return h.hexdigest()[:12]


def remove_other_tags(folder: Path, name: str) -> None:
    """Remove the sibling folders ``<name>-<tag>`` of ``folder`` (a cache of other code)."""
    for old in folder.parent.glob(f"{name}-*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)


def descriptor_input(data: bytes, path: Path, im: Image.Image, px: Image.Image) -> Image.Image:
    """The pixels ``embed`` gives the descriptor for this file (:func:`imageio.load_8bit` with
    the descriptor's ``decode_side``), from ``fingerprint``'s full decode ``im`` (and its 8-bit
    form ``px``) when they are the same: every file but a JPEG large enough to be decoded at a
    reduced DCT scale (:func:`imageio.reduces`), which is decoded again that way from ``data``
    (cheap: 1/2-1/8 scale)."""
    side = DescriptorEmbedder.decode_side  # embed's min_side (pipelines/embed.py, _DescriptorPrep)
    if imageio.reduces(im, side):
        return imageio.to_8bit(imageio.decode(data, path, min_side=side))
    return px


def descriptor(data: bytes, path: Path, im: Image.Image, px: Image.Image,
               arr: np.ndarray | None = None) -> np.ndarray:
    """descriptor-v1 of the file, as ``embed`` computes it (128 float32); ``arr``:
    ``np.asarray(px)`` when the caller has it."""
    src = descriptor_input(data, path, im, px)
    return DescriptorEmbedder()._one(src, arr if src is px else None)


class DescriptorCache:
    """The cache of one workspace's lake: ``lake/cache/descriptor-v1-<code_tag>/<dataset>.parquet``."""

    def __init__(self, lake: Path) -> None:
        self.root = Path(lake) / "cache"
        self.folder = self.root / f"{DESCRIPTOR}-{code_tag()}"

    def write(self, dataset_id: str, ids: list[str], shas: list[str],
              vecs: np.ndarray | list[np.ndarray]) -> None:
        """Replace the dataset's file with these vectors (rows of ``vecs``; none: the file is
        removed); remove the folders of other code tags."""
        remove_other_tags(self.folder, DESCRIPTOR)
        dest = self.folder / f"{safe_name(dataset_id)}.parquet"
        if not ids:
            dest.unlink(missing_ok=True)
            return
        vecs = np.ascontiguousarray(np.asarray(vecs, dtype=np.float32)).reshape(len(ids), -1)
        at = pa.table({"image_id": pa.array(ids, pa.string()), "sha256": pa.array(shas, pa.string()),
                       "vector": pa.FixedSizeListArray.from_arrays(
                           pa.array(vecs.ravel(), pa.float32()), vecs.shape[1] or 1)})
        write_parquet_atomic(at, dest)

    def find(self, wanted: dict[tuple[str, str], int]) -> Iterator[tuple[list[int], np.ndarray]]:
        """(positions, vectors) of the wanted (image_id, sha256) -> position found here, a
        record batch at a time; each position at most once. An unreadable file is skipped
        (its images are decoded by the caller)."""
        seen: set[int] = set()
        for f in sorted(self.folder.glob("*.parquet")):
            try:
                batches = pq.ParquetFile(f).iter_batches(batch_size=_BATCH)
                for b in batches:
                    keys = zip(b.column("image_id").to_pylist(), b.column("sha256").to_pylist(),
                               strict=True)
                    rows, pos = [], []
                    for r, k in enumerate(keys):
                        n = wanted.get(k)
                        if n is not None and n not in seen:
                            seen.add(n)
                            rows.append(r)
                            pos.append(n)
                    if rows:
                        col = b.column("vector").take(pa.array(rows))
                        dim = col.type.list_size
                        yield pos, col.flatten().to_numpy(zero_copy_only=False).reshape(len(rows), dim)
            except (OSError, pa.ArrowException):
                continue
