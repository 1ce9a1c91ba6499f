"""Writing a version folder: image files (hardlinked), bicubic resizes, ``.npz``, Parquet.

Everything here is deterministic: files are listed in sorted order, PNGs and ``.npz`` zip
members carry no timestamps, and Parquet goes through ``catalog.write_parquet_atomic``.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl

from medlake.catalog import CatalogError

_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def safe(part: str | None, default: str = "_unknown") -> str:
    """One path component from a label or native id (no slashes, no leading dots)."""
    if part is None or part == "":
        return default
    out = _UNSAFE.sub("_", str(part)).strip("._")
    return out or default


def link_or_copy(src: Path, dst: Path) -> str:
    """Hardlink ``src`` to ``dst`` (same bytes, no copy); fall back to a copy across devices."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return "link"
    except OSError:
        shutil.copyfile(src, dst)
        return "copy"


def _resize_one(job: tuple[str, list[tuple[int, str]]]) -> tuple[str, int, int]:
    """Resize one original to every size (bicubic, square, from the original every time)."""
    from PIL import Image, ImageOps

    src, outs = job
    with Image.open(src) as im:
        im = ImageOps.exif_transpose(im)
        w, h = im.size
        im = im.convert("L" if im.mode in ("L", "I", "I;16", "1", "F") else "RGB")
        for size, dst in outs:
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
            im.resize((size, size), Image.Resampling.BICUBIC).save(
                dst, format="PNG", optimize=False, compress_level=6)
    return src, w, h


def resize_all(jobs: list[tuple[str, list[tuple[int, str]]]], processes: int = 1) -> int:
    """Run :func:`_resize_one` over ``jobs`` with ``processes`` worker processes."""
    if processes <= 1 or len(jobs) < 64:
        for j in jobs:
            _resize_one(j)
        return len(jobs)
    with ProcessPoolExecutor(max_workers=processes) as ex:
        for _ in ex.map(_resize_one, jobs, chunksize=max(16, len(jobs) // (processes * 8))):
            pass
    return len(jobs)


def write_files(
    manifest: pl.DataFrame, *, out: Path, images_root: Path | None, label: str | None,
    sizes: tuple[int, ...], layout: str, processes: int = 1,
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Place originals and resizes under ``out``; return the manifest with file columns.

    Raises
    ------
    CatalogError
        When an image's file is missing under the dataset's images root.
    """
    stats = {"link": 0, "copy": 0, "resized": 0}
    if images_root is None:
        cols = [pl.lit(None, pl.String).alias("file")]
        cols += [pl.lit(None, pl.String).alias(f"file_{s}") for s in sizes]
        return manifest.with_columns(cols), stats
    files, resized = [], {s: [] for s in sizes}
    jobs = []
    for r in manifest.iter_rows(named=True):
        src = images_root / r["path"] if r["path"] else None
        if src is None or not src.is_file():
            raise CatalogError(
                f"image file for {r['image_id']} not found ({r['path']!r} under the dataset's "
                "images root); attach images ('medlake attach-images') or fix the path"
            )
        sub = safe(r["split"]) if layout == "split" else \
            f"{safe(r['split'])}/{safe(r[label] if label else None)}"
        name = safe(r["native_id"])
        rel = f"images/{sub}/{name}{src.suffix.lower() if not name.endswith(src.suffix) else ''}"
        stats[link_or_copy(src, out / rel)] += 1
        files.append(rel)
        outs = []
        for s in sizes:
            rs = f"images_{s}/{sub}/{name.rsplit('.', 1)[0]}.png"
            resized[s].append(rs)
            outs.append((s, str(out / rs)))
        if outs:
            jobs.append((str(src), outs))
    stats["resized"] = resize_all(jobs, processes)
    m = manifest.with_columns(pl.Series("file", files, pl.String))
    for s in sizes:
        m = m.with_columns(pl.Series(f"file_{s}", resized[s], pl.String))
    return m, stats


def write_npz(manifest: pl.DataFrame, *, out: Path, name: str, label: str,
              sizes: tuple[int, ...]) -> list[str]:
    """MedMNIST-style ``<name>_<size>.npz``: ``{split}_images`` (N,S,S[,3]) uint8 and
    ``{split}_labels`` (N,1) int64 indices into the sorted label values (``label_names``)."""
    from PIL import Image

    classes = sorted(manifest[label].drop_nulls().unique().to_list())
    index = {c: i for i, c in enumerate(classes)}
    written = []
    for s in sizes:
        arrays: dict[str, np.ndarray] = {"label_names": np.array(classes, dtype=str)}
        for (split,), g in sorted(manifest.group_by("split"), key=lambda x: str(x[0][0])):
            g = g.sort("image_id")
            imgs = [np.asarray(Image.open(out / f)) for f in g[f"file_{s}"].to_list()]
            arrays[f"{split}_images"] = np.stack(imgs) if imgs else np.zeros((0, s, s), np.uint8)
            arrays[f"{split}_labels"] = np.array(
                [[index.get(v, -1)] for v in g[label].to_list()], dtype=np.int64).reshape(-1, 1)
        fname = f"{name}_{s}.npz"
        _savez_deterministic(out / fname, arrays)
        written.append(fname)
    return written


def _savez_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps (byte-identical reruns)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling and swap it in on success.

    A crash or kill while building leaves ``final`` untouched; the swap itself is two
    renames, and a leftover ``.<name>.old-*`` from a crash between them is restored by the
    next call.
    """
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover(final: Path) -> None:
    """Undo a half-finished swap and remove stale temporary folders of ``final``."""
    parent = final.parent
    olds = sorted(parent.glob(f".{final.name}.old-*"))
    if olds and not final.exists():
        os.rename(olds[0], final)
        olds = olds[1:]
    for p in [*olds, *parent.glob(f".{final.name}.tmp-*")]:
        shutil.rmtree(p, ignore_errors=True)
