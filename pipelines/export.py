"""Writing a version folder: image files (hardlinked), bicubic resizes, ``.npz``, Parquet.

Everything here is deterministic: files are listed in sorted order, PNGs and ``.npz`` zip
members carry no timestamps, and Parquet goes through ``catalog.write_parquet_atomic``.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import zipfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

import numpy as np
import polars as pl

from medlake.catalog import CatalogError, Transaction
from medlake.catalog.tables import clean_orphans, replace_dir, temp_dir_path

#: characters a file-name component keeps as they are; every other character (and ``.``,
#: ``_`` or ``-`` in first place, so no hidden files, ``..`` or option-like names) is written as
#: ``%XX`` per UTF-8 byte. ``%`` itself is encoded, so :func:`decode_name` reverses it.
_KEEP = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
#: the longest encoded component; a longer one is cut and ends in ``~`` + 16 hex digits of the
#: sha256 of the original text (``~`` never appears otherwise), so it stays unique
MAX_NAME = 200
#: the component for a missing value (a real ``_unknown`` is written ``%5Funknown``)
UNKNOWN = "_unknown"


def encode_name(part: object, default: str = UNKNOWN) -> str:
    """One reversible, collision-free path component from a native id, split or label.

    Letters, digits and ``. _ -`` stay (except in first place); everything else becomes
    ``%XX`` per UTF-8 byte, so ``a'b`` -> ``a%27b`` and ``a|b`` -> ``a%7Cb`` (distinct names,
    where the old mapping gave ``a_b`` twice). None or ``''`` gives ``default``.

    Example
    -------
    >>> encode_name("CheXpert/train/p1.jpg")
    'CheXpert%2Ftrain%2Fp1.jpg'
    >>> decode_name(encode_name("a|b"))
    'a|b'
    """
    if part is None or part == "":
        return default
    text = str(part)
    out = "".join(
        ch if ch in _KEEP and not (i == 0 and ch in "._-")
        else "".join(f"%{b:02X}" for b in ch.encode("utf-8"))
        for i, ch in enumerate(text)
    )
    if len(out) > MAX_NAME:
        out = f"{out[:MAX_NAME - 17]}~{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}"
    return out


def decode_name(name: str) -> str | None:
    """The text :func:`encode_name` encoded (None for :data:`UNKNOWN`).

    Raises
    ------
    ValueError
        For a shortened name (it holds ``~``): read the id from the manifest instead.
    """
    if name == UNKNOWN:
        return None
    if "~" in name:
        raise ValueError(f"'{name[:40]}...' is a shortened name; the manifest holds the full id")
    return unquote(name, errors="strict")


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

    Files are named ``images/<split>[/<label>]/<native id><ext>`` and
    ``images_<size>/.../<native id>.png``, every component through :func:`encode_name`.
    Each original is resolved inside the images root (``catalog.imageio.InsideResolver``:
    ``..``, absolute paths and symlinks that leave it are refused), hardlinked (or copied),
    and what was written is checked against the ``images`` table: its size against the
    source file's and its sha256 against ``images.sha256`` (the manifest's ``sha256``).
    Resizes are made from the checked file. An image without a recorded sha256 is counted
    as ``unverified`` and the manifest gets the sha256 of the bytes written.

    Returns
    -------
    (DataFrame, dict)
        The manifest with ``file`` and ``file_<size>`` (and ``sha256`` filled where it was
        null), and counts: link, copy, resized, verified, unverified.

    Raises
    ------
    CatalogError
        An image without a file, a path leaving the images root, two names that differ only
        in case, or a written file whose size or sha256 differs from the images table (the
        file changed after ingest). The caller builds the version in a temporary folder, so
        nothing is published then.
    """
    from medlake.catalog.imageio import ImageReadError, InsideResolver

    stats = {"link": 0, "copy": 0, "resized": 0, "verified": 0, "unverified": 0}
    if images_root is None:
        cols = [pl.lit(None, pl.String).alias("file")]
        cols += [pl.lit(None, pl.String).alias(f"file_{s}") for s in sizes]
        return manifest.with_columns(cols), stats
    files, resized = [], {s: [] for s in sizes}
    checks: list[tuple[str, str, Path, int, str | None]] = []
    jobs = []
    seen: dict[str, str] = {}
    resolve = InsideResolver(images_root)  # each folder resolved once for the whole manifest
    for r in manifest.iter_rows(named=True):
        try:  # the one resolver's rule: nothing outside the images root
            src = resolve(r["path"]) if r["path"] else None
        except ImageReadError as e:
            raise CatalogError(f"image file for {r['image_id']}: {e}; fix the path or re-ingest "
                               "the dataset") from e
        if src is None or not src.is_file():
            raise CatalogError(
                f"image file for {r['image_id']} not found ({r['path']!r} under the dataset's "
                "images root); attach images ('medlake attach-images') or fix the path"
            )
        sub = encode_name(r["split"]) if layout == "split" else \
            f"{encode_name(r['split'])}/{encode_name(r[label] if label else None)}"
        stem = encode_name(r["native_id"])
        ext = PurePosixPath(r["path"].strip().replace("\\", "/")).suffix.lower()
        ext = f".{encode_name(ext[1:])}" if ext else ""
        rel = f"images/{sub}/{stem}{ext}"
        other = seen.setdefault(rel.lower(), r["image_id"])
        if other != r["image_id"]:
            raise CatalogError(
                f"images {other} and {r['image_id']} would be exported as file names that differ "
                f"only in case ('{rel}'), which collide on case-insensitive file systems; give "
                "one of them another native id"
            )
        size = src.stat().st_size
        stats[link_or_copy(src, out / rel)] += 1
        files.append(rel)
        checks.append((r["image_id"], r["path"], out / rel, size, r["sha256"]))
        outs = []
        for s in sizes:
            rs = f"images_{s}/{sub}/{stem}.png"
            resized[s].append(rs)
            outs.append((s, str(out / rs)))
        if outs:
            jobs.append((str(out / rel), outs))
    digests = verify_files(checks)
    stats["verified"] = sum(want is not None for *_, want in checks)
    stats["unverified"] = len(checks) - stats["verified"]
    stats["resized"] = resize_all(jobs, processes)
    m = manifest.with_columns(pl.Series("file", files, pl.String),
                              pl.coalesce(pl.col("sha256"), pl.Series(digests, dtype=pl.String)).alias("sha256"))
    for s in sizes:
        m = m.with_columns(pl.Series(f"file_{s}", resized[s], pl.String))
    return m, stats


def _sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def verify_files(checks: list[tuple[str, str, Path, int, str | None]], threads: int = 4) -> list[str]:
    """Hash each written file; raise when its size or sha256 is not what the catalog says.

    ``checks`` holds ``(image_id, images.path, written file, source size, images.sha256)``;
    returns the written files' sha256 in the same order.

    Raises
    ------
    CatalogError
        The first mismatch, naming the image, its path and both values.
    """
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(checks)))) as ex:
        got = list(ex.map(lambda c: _sha256(c[2]), checks))
    for (image_id, path, _dst, size, want), (n, digest) in zip(checks, got):
        if n != size or (want is not None and digest != want):
            raise CatalogError(
                f"image {image_id} ('{path}' under the images root): the exported file has "
                f"{n:,} bytes and sha256 {digest[:16]}..., but "
                + (f"the source has {size:,} bytes" if n != size else
                   f"the images table records sha256 {want[:16]}...")
                + "; the file changed after ingest. Re-ingest the dataset (or run 'medlake "
                "attach-images') to record the new file, or restore the original; the version "
                "was not written"
            )
    return [d for _, d in got]


def write_npz(manifest: pl.DataFrame, *, out: Path, name: str, label: str,
              sizes: tuple[int, ...]) -> list[str]:
    """MedMNIST-style arrays: ``{split}_images`` (N,S,S[,3]) uint8 and ``{split}_labels``
    (N,1) indices into the sorted label values (``label_names``, an extra key MedMNIST's own
    files lack). As MedMNIST names and types them: ``<name>.npz`` at size 28,
    ``<name>_<size>.npz`` otherwise; labels uint8 (int64, with -1 for an unknown label, only
    when a label is unknown or there are more than 256 classes)."""
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
        labs = [a for k, a in arrays.items() if k.endswith("_labels")]
        if len(classes) <= 256 and all((a >= 0).all() for a in labs):
            for k in [k for k in arrays if k.endswith("_labels")]:
                arrays[k] = arrays[k].astype(np.uint8)
        fname = f"{name}.npz" if s == 28 else f"{name}_{s}.npz"
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
def atomic_dir(final: Path, tx: Transaction | None = None) -> Iterator[Path]:
    """Build a folder in a temporary sibling and swap it in on success.

    With ``tx`` the swap is one operation of that transaction (the folder and the table
    rows describing it become visible together when ``tx`` commits; a failed ``tx`` removes
    the folder built). Without, the folder is swapped in at once (two renames,
    ``catalog.tables.replace_dir``). A crash or kill while building leaves ``final``
    untouched; leftovers of a killed build (``.<name>.tmp-<pid>-*``, ``.<name>.old-<pid>-*``)
    are removed, or restored, by the next call and whenever a lake is opened
    (``catalog.tables.recover``).
    """
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = temp_dir_path(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if tx is not None:
        tx.publish_dir(tmp, final)
    else:
        replace_dir(tmp, final)


def recover(final: Path) -> None:
    """Undo a half-finished swap and remove stale temporary folders of ``final``.

    Only leftovers of processes that no longer run are touched (their names carry the
    process id), so a concurrent build of the same folder is left alone.
    """
    clean_orphans(final.parent, name=final.name)
