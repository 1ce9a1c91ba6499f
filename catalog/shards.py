"""Packed image folders: a version's image files in a few tar shards plus a Parquet index.

DVC (like git) pays per file: pushing or pulling a version of 10,000 small images costs far
more than moving the same bytes in a handful of large files. A version built with the
recipe export option ``pack: shards`` therefore stores its image folders as::

    shards/images-00000.tar     plain (uncompressed) POSIX tar files, members sorted by path
    shards/images-00001.tar     ... each at most ``shard_mb`` MiB (a larger file gets its own)
    shards/index.parquet        one row per file: file, shard, offset, size, sha256

``file`` is the path the manifest's ``file`` / ``file_<size>`` columns name, so a pulled
version is used in one of two ways:

* directly: :func:`read_bytes` (and :class:`catalog.versions.VersionDataset`) seek to
  ``offset`` in the shard and read ``size`` bytes — no unpacking;
* unpacked: :func:`unpack` (``medlake unpack VERSION``) writes every file to its path under
  the version folder (or another folder), checking size and sha256.

Shards are deterministic: members in sorted order, modification time 0, owner 0/0, mode
0644, so the same files always give byte-identical shards (and DVC sees no change).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from medlake.catalog.errors import CatalogError
from medlake.catalog.tables import write_parquet_atomic

SHARD_DIR = "shards"
INDEX = "index.parquet"
DEFAULT_SHARD_MB = 256


@dataclass(frozen=True)
class PackResult:
    """What :func:`pack` wrote: files packed, shards, bytes of file content."""

    files: int
    shards: int
    bytes: int


def _members(root: Path, folders: list[str]) -> list[tuple[str, Path]]:
    """Every regular file under ``root/<folder>``; a symlink there is refused (export writes
    hardlinks or copies, so a link means the folder was changed by hand)."""
    out = []
    for name in folders:
        base = root / name
        if base.is_symlink():
            raise CatalogError(f"{root.name}/{name} is a symlink; refusing to pack what it points to")
        if base.is_dir():
            for p in base.rglob("*"):
                if p.is_symlink():
                    raise CatalogError(
                        f"{p.relative_to(root).as_posix()} in {root.name} is a symlink; refusing "
                        "to pack what it points to (replace it with the file itself)")
                if p.is_file():
                    out.append((p.relative_to(root).as_posix(), p))
    return sorted(out)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti


def pack(root: Path, folders: list[str], *, shard_mb: int = DEFAULT_SHARD_MB,
         remove: bool = True) -> PackResult:
    """Pack every file under ``root/<folder>`` into ``root/shards/`` and index it.

    Parameters
    ----------
    root
        The version folder being built.
    folders
        Sub-folders to pack (e.g. ``["images", "images_28"]``); absent ones are skipped.
    shard_mb
        Start a new shard when the current one would pass this many MiB.
    remove
        Delete the packed loose files (and their folders) afterwards.

    Returns
    -------
    PackResult

    Example
    -------
    >>> pack(Path("lake/versions/v"), ["images"])  # doctest: +SKIP
    PackResult(files=10000, shards=2, bytes=283000000)
    """
    if shard_mb < 1:
        raise CatalogError(f"shard size must be at least 1 MiB, not {shard_mb}")
    members = _members(root, folders)
    out = root / SHARD_DIR
    out.mkdir(parents=True, exist_ok=True)
    groups: list[list[tuple[str, Path]]] = []
    used = limit = shard_mb * 1024 * 1024
    for name, path in members:
        cost = 1024 + path.stat().st_size  # header block(s) + data; padding is below 512
        if used + cost > limit and (not groups or groups[-1]):
            groups.append([])
            used = 0
        groups[-1].append((name, path))
        used += cost
    rows: dict[str, list] = {"file": [], "shard": [], "offset": [], "size": [], "sha256": []}
    total = 0
    for no, group in enumerate(groups):
        shard = f"images-{no:05d}.tar"
        with open(out / shard, "wb") as fh, \
                tarfile.open(fileobj=fh, mode="w", format=tarfile.GNU_FORMAT) as tf:
            for name, path in group:
                data = path.read_bytes()
                # BytesIO shares ``data`` (no copy)
                tf.addfile(_tarinfo(name, len(data)), fileobj=io.BytesIO(data))
                # the data ends just before the padding to the next 512-byte block
                pad = (512 - len(data) % 512) % 512
                rows["file"].append(name)
                rows["shard"].append(shard)
                rows["offset"].append(fh.tell() - pad - len(data))
                rows["size"].append(len(data))
                rows["sha256"].append(hashlib.sha256(data).hexdigest())
                total += len(data)
    schema = pa.schema([("file", pa.string()), ("shard", pa.string()), ("offset", pa.int64()),
                        ("size", pa.int64()), ("sha256", pa.string())])
    write_parquet_atomic(pa.table(rows, schema=schema), out / INDEX)
    if remove:  # every file under the folders is a member: they go whole
        for name in folders:
            if (root / name).is_dir():
                shutil.rmtree(root / name)
    return PackResult(len(members), len(groups), total)


def is_packed(version: Path | str) -> bool:
    """Whether a version folder stores its images in shards."""
    return (Path(version) / SHARD_DIR / INDEX).is_file()


def index(version: Path | str) -> dict[str, tuple[str, int, int, str]]:
    """``{file: (shard, offset, size, sha256)}`` of a packed version.

    Raises
    ------
    CatalogError
        When the version has no shard index.
    """
    f = Path(version) / SHARD_DIR / INDEX
    if not f.is_file():
        raise CatalogError(f"{Path(version).name}: not a packed version (no {SHARD_DIR}/{INDEX}); "
                           "its images are plain files")
    t = pq.read_table(f).to_pydict()
    return {n: (s, o, z, h) for n, s, o, z, h in zip(t["file"], t["shard"], t["offset"], t["size"],
                                                      t["sha256"])}


def read_bytes(version: Path | str, file: str,
               idx: dict[str, tuple[str, int, int, str]] | None = None) -> bytes:
    """One image file's bytes from a packed version, read straight from its shard.

    Raises
    ------
    CatalogError
        When the file is not in the index, or the shard is missing or too short (an
        incomplete ``dvc pull``).
    """
    idx = index(version) if idx is None else idx
    if file not in idx:
        raise CatalogError(f"{Path(version).name}: '{file}' is not in the shard index")
    shard, offset, size, _ = idx[file]
    p = Path(version) / SHARD_DIR / shard
    try:
        with open(p, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
    except FileNotFoundError as e:
        raise CatalogError(f"{Path(version).name}: shard {shard} is missing; 'dvc pull' the "
                           "whole version folder") from e
    if len(data) != size:
        raise CatalogError(f"{Path(version).name}: shard {shard} is truncated at '{file}'; "
                           "pull it again")
    return data


def _safe_rel(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise CatalogError(f"shard index entry '{name}' leaves the version folder; refusing "
                           "to unpack it (the index is corrupt or was tampered with)")
    return rel


def unpack(version: Path | str, out: Path | str | None = None, *, overwrite: bool = False) -> int:
    """Write every packed file to ``out/<file>`` (default: the version folder itself).

    Each file is checked against the index (size and sha256) and written atomically
    (temporary name, then rename). Existing identical files are left alone.

    Parameters
    ----------
    version
        A packed version folder.
    out
        Destination folder; the manifest's relative paths then work under it.
    overwrite
        Replace existing files whose content differs (otherwise that is an error).

    Returns
    -------
    int
        Files written (identical existing files are not counted).

    Raises
    ------
    CatalogError
        Not packed, a shard missing or truncated, a checksum mismatch, an index entry
        leaving the folder (by ``..``, an absolute path or a symlinked folder under ``out``),
        or a differing existing file without ``overwrite``.

    Example
    -------
    >>> unpack("lake/versions/synth-derm-clean")  # doctest: +SKIP
    412
    """
    version = Path(version)
    dest = version if out is None else Path(out)
    idx = index(version)
    written = 0
    for name in sorted(idx):
        rel = _safe_rel(name)
        data = read_bytes(version, name, idx)
        if hashlib.sha256(data).hexdigest() != idx[name][3]:
            raise CatalogError(f"{version.name}: '{name}' in {idx[name][0]} does not match its "
                               "sha256 in the index; pull the version again")
        target = dest.joinpath(*rel.parts)
        base = dest.resolve()
        if base not in target.parent.resolve().parents and target.parent.resolve() != base \
                or target.is_symlink():
            raise CatalogError(f"'{name}' would be written through a symlink that leaves "
                               f"{dest.name}/; refusing to unpack it there (remove the link)")
        if target.is_file():
            if target.read_bytes() == data:
                continue
            if not overwrite:
                raise CatalogError(f"{target.name}: exists with other content under "
                                   f"{dest.name}/; use --overwrite to replace it")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        written += 1
    return written
