"""What makes pages open fast on a big lake: one DuckDB connection, cached results, thumbnails.

* :func:`signature` is the state of the lake's tables: the modification times of every table
  and stage folder and the inode, size and modification time of every table file (a stage
  publishes a partition by renaming a new file into its stage folder). It is cheap (one
  ``stat`` per folder and file) and is part of every cache key below, so new stage output is
  seen on the next rerun.
* :func:`connection` is one DuckDB connection with the table views per signature, shared by
  every session (``st.cache_resource``); each query runs on its own cursor, so sessions in
  different threads never share a cursor.
* :func:`query` caches query results per (signature, SQL, parameters) (``st.cache_data``):
  aggregates over 50k pairs or 600k labels run once per lake state, not once per rerun.
  When the signature changed while a query ran (a stage replaced or removed a file) the
  query runs again on the new state (the last time uncached, through ``Catalog.query``,
  which ends on pinned files), so readers never fail because of a concurrent write; a
  broken table file gives :class:`~medlake.catalog.SQLError` with one line naming it.
* :func:`cached_file` writes rendered images (thumbnails, converted full-size images,
  blends) once under ``lake/cache/ui/`` with an atomic rename, keyed by their inputs' paths,
  sizes and mtimes, so a thumbnail is decoded once per file version, across restarts.

The reviews table is not part of the signature (a verdict click must not invalidate every
cache); verdicts are read fresh through :mod:`catalog.reviews`, and the cached connection
has no ``reviews`` view, so a page cannot read stale verdicts by mistake.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import streamlit as st
from PIL import Image

from medlake.catalog import Catalog, SQLError
from medlake.catalog.sql import broken_file_message
from medlake.catalog.tables import READ_ATTEMPTS

UNCACHED_TABLES = ("reviews",)  # read fresh through catalog.reviews


def signature(tables_dir: Path) -> tuple[tuple[Any, ...], ...]:
    """The state of the lake's table files (reviews left out), as a hashable key.

    ``(folder, mtime_ns)`` of every table and stage folder and ``(file, inode, size,
    mtime_ns)`` of every Parquet file in them. Folder times alone miss a file replaced twice
    within one tick of the file-system clock; a replacing rename always gives a new inode.

    Parameters
    ----------
    tables_dir
        The lake's ``lake/tables`` folder (may not exist yet: the signature is then empty).

    Returns
    -------
    tuple
        Sorted entries; equal signatures mean no partition was added, replaced or removed.
    """
    out: list[tuple[Any, ...]] = []
    try:
        tables = sorted(os.scandir(tables_dir), key=lambda e: e.name)
    except FileNotFoundError:
        return ()
    for t in tables:
        if not t.is_dir() or t.name in UNCACHED_TABLES:
            continue
        try:
            out.append((t.name, t.stat().st_mtime_ns))
            _add_folder(out, t.name, t.path)
        except FileNotFoundError:  # removed meanwhile: the signature differs anyway
            out.append((t.name, -1))
    return tuple(out)


def _add_folder(out: list[tuple[Any, ...]], name: str, path: str) -> None:
    for e in sorted(os.scandir(path), key=lambda e: e.name):
        if e.name.startswith("."):  # temporary files of writers in progress
            continue
        if e.is_dir():
            out.append((f"{name}/{e.name}", e.stat().st_mtime_ns))
            _add_folder(out, f"{name}/{e.name}", e.path)
        elif e.name.endswith(".parquet"):
            try:
                st_ = e.stat()
                out.append((f"{name}/{e.name}", st_.st_ino, st_.st_size, st_.st_mtime_ns))
            except FileNotFoundError:
                out.append((f"{name}/{e.name}", -1))


@st.cache_resource(max_entries=2, show_spinner=False)
def connection(root: str, sig: tuple) -> duckdb.DuckDBPyConnection:
    """The shared DuckDB connection of workspace ``root`` in lake state ``sig``."""
    con = Catalog.open(root).connect()
    for name in UNCACHED_TABLES:
        con.execute(f'DROP VIEW IF EXISTS "{name}"')
    return con


@st.cache_data(max_entries=1024, show_spinner=False)
def _query(root: str, sig: tuple, sql: str, params: tuple) -> pl.DataFrame:
    cur = connection(root, sig).cursor()
    try:
        at = cur.sql(sql, params=list(params) or None).to_arrow_table()
    finally:
        cur.close()
    df = pl.from_arrow(at)
    assert isinstance(df, pl.DataFrame)
    return df


def query(cat: Catalog, sql: str, params: list[Any] | tuple = ()) -> pl.DataFrame:
    """Run trusted SQL on the shared connection; results are cached per lake state.

    Parameters
    ----------
    cat
        The workspace's catalog.
    sql
        Trusted SQL built by the pages (values quoted or passed as ``params``).
    params
        Positional ``?`` parameters.

    Returns
    -------
    polars.DataFrame
        A copy: callers may change it freely.

    Raises
    ------
    SQLError
        When a table the query reads has a file that is not valid Parquet.
    """
    root, tables_dir, args = str(cat.ws.root), cat.ws.tables_dir, tuple(params or ())
    for _ in range(READ_ATTEMPTS - 1):
        sig = signature(tables_dir)
        try:
            df = _query(root, sig, sql, args)
        except duckdb.Error as e:
            if signature(tables_dir) != sig:
                continue  # a stage replaced or removed a file meanwhile: read the new state
            msg = broken_file_message(e)
            if msg is not None:  # one line naming the file, not a DuckDB traceback
                raise SQLError(msg) from None
            raise
        if signature(tables_dir) == sig:
            return df
    # files kept changing: read once more without the cache (retries, then pinned files)
    return cat.query(sql, list(args))


def cache_dir(cat: Catalog) -> Path:
    """``lake/cache/ui``: rendered images (ignored by git, not a DVC output)."""
    return cat.ws.lake / "cache" / "ui"


def file_key(*parts: Any) -> str:
    """A stable key of files and options: each file contributes path, size and mtime."""
    h = hashlib.sha1()
    for p in parts:
        if isinstance(p, Path):
            s = p.stat()
            p = f"{p}|{s.st_size}|{s.st_mtime_ns}"
        h.update(str(p).encode() + b"\0")
    return h.hexdigest()


def cached_file(cat: Catalog, key: str, make: Callable[[], Image.Image], *,
                fmt: str = "PNG") -> Path:
    """The cached rendering ``key`` (made with ``make()`` and stored on first use).

    The file is written to a temporary name and renamed, so a reader never sees half an
    image and two sessions rendering the same image at once both end with a whole file.
    """
    dest = cache_dir(cat) / key[:2] / f"{key}.{fmt.lower()}"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    im = make()
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{id(im)}.tmp")
    try:
        im.save(tmp, format=fmt)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
