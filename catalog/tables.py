"""Reading and writing catalog tables as Parquet, atomically.

Each table lives in ``lake/tables/<table>/<stage>/<partition>.parquet``. A write goes to a
temporary file in the same folder and is renamed into place, so a reader (or a crash) never
sees half a file. :class:`Transaction` stages several files (and version folders) and
publishes them together, so a stage that writes images *and* annotations publishes both or
neither, whatever moment the process dies:

1. every new file is written and fsynced under a temporary name (``.<name>.<pid>-<rand>.tmp``,
   folders ``.<name>.tmp-<pid>-<rand>``);
2. an *intent* file listing the renames and deletions is written, fsynced and renamed into
   ``lake/tables/.journal/<pid>-<rand>.intent`` -- this rename is the commit point;
3. the renames and deletions are applied, then the intent is removed.

Recovery rolls a committed intent forward: readers (:meth:`TableStore.files`, hence
``Catalog.read``/``query``/``sql`` and the UI) finish an intent whose writer died before they
list files, and wait for one whose writer is still renaming (it holds a lock on the intent),
so they only ever see files of complete commits. Opening a lake (:class:`TableStore`, hence
``Catalog``) also removes the temporary files and folders of dead writers
(:func:`recover`). Final files keep their names, so plain DuckDB/Polars globs read the
same files; only during a live commit's renames (milliseconds), or between a crash and the
next medlake process, may a glob see a partly renamed commit.

Fault injection (tests and ``bench/faults.py``): ``MEDLAKE_FAULT`` makes the commit code
kill its own process at a chosen rename or deletion (see :func:`fault_point`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Self, TypeVar

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from medlake.catalog.errors import MissingTableError, SchemaError, SQLError
from medlake.catalog.schema import TableSpec, spec

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._@=+-]+")


def safe_name(name: str) -> str:
    """A partition or stage name usable as one path component (no slashes, no dots first)."""
    out = _SAFE.sub("_", name).strip("._")
    if not out:
        raise ValueError(f"'{name}' cannot be used as a table partition name")
    return out


def conform(table: str | TableSpec, data: Any, *, check_key: bool = True) -> pa.Table:
    """Cast ``data`` (Arrow table, Polars or pandas frame, or list of dicts) to a table's schema.

    Missing optional columns are filled with nulls, columns come out in schema order.

    Raises
    ------
    SchemaError
        When ``data`` has columns the table does not declare, a key column is missing or null,
        a value cannot be cast, or (``check_key``) two rows share a key.
    """
    ts = spec(table) if isinstance(table, str) else table
    key_checked = False
    if (isinstance(data, pl.DataFrame) and check_key and data.height
            and all(k in data.columns for k in ts.key)):
        _check_key(ts, data.select(list(ts.key)))  # in Polars: no round trip via Arrow
        key_checked = True
    at = _to_arrow(data)
    extra = [c for c in at.column_names if c not in ts.schema.names]
    if extra:
        raise SchemaError(
            f"table '{ts.name}': unexpected columns {extra}; declared columns are "
            f"{ts.schema.names} (add new columns in catalog/schema.py)"
        )
    missing_key = [k for k in ts.key if k not in at.column_names]
    if missing_key:
        raise SchemaError(f"table '{ts.name}': key columns {missing_key} are missing")
    cols = []
    for field in ts.schema:
        if field.name in at.column_names:
            col = at.column(field.name)
            if col.type != field.type:
                try:
                    col = col.cast(field.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    raise SchemaError(
                        f"table '{ts.name}', column '{field.name}': cannot store {col.type} "
                        f"as {field.type} ({e})"
                    ) from e
        else:
            col = pa.nulls(at.num_rows, field.type)
        cols.append(col)
    out = pa.Table.from_arrays(cols, schema=ts.schema)
    if check_key and out.num_rows and not key_checked:
        df = pl.from_arrow(out.select(list(ts.key)))
        assert isinstance(df, pl.DataFrame)
        _check_key(ts, df)
    return out


def _to_arrow(data: Any) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pl.DataFrame):
        # string_view columns share Polars' buffers (no copy); conform casts them to the
        # schema's types (about 15x cheaper than Polars building large_string columns)
        return data.to_arrow(compat_level=pl.CompatLevel.newest())
    if isinstance(data, list):
        if not data:
            return pa.table({})
        # Polars types the rows without importing pandas (pyarrow's from_pylist does, ~1 s)
        # and, unlike from_pylist, keeps keys that only later rows have
        try:
            return _to_arrow(pl.DataFrame(data, infer_schema_length=None))
        except (TypeError, ValueError, pl.exceptions.PolarsError):
            return pa.Table.from_pylist(data)
    if hasattr(data, "to_arrow"):
        return data.to_arrow()
    try:  # pandas
        return pa.Table.from_pandas(data, preserve_index=False)
    except Exception as e:  # pragma: no cover - message path
        raise SchemaError(f"cannot store an object of type {type(data).__name__} as a table") from e


def _check_key(ts: TableSpec, df: pl.DataFrame) -> None:
    nulls = df.null_count().row(0)
    for k, n in zip(ts.key, nulls):
        if n:
            raise SchemaError(f"table '{ts.name}': key column '{k}' has {n} null values")
    # a 64-bit row hash is fast; only when it sees a repeat is the exact (slow) check run
    if df.hash_rows().n_unique() != df.height and df.n_unique() != df.height:
        dup = df.filter(df.is_duplicated()).head(1).row(0)
        raise SchemaError(
            f"table '{ts.name}': {df.height - df.n_unique()} rows repeat a key "
            f"{ts.key} (first: {dup})"
        )


def write_parquet_atomic(at: pa.Table, dest: Path) -> Path:
    """Write ``at`` to ``dest`` via a temporary file and rename; deterministic bytes.

    The temporary file (``.<name>.<pid>-<rand>.tmp``) names its writer's process, so a
    leftover of a killed writer is removed by the next :func:`recover`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)
    try:
        _write(at, tmp)
        fault_point("rename", dest)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def temp_path(dest: Path) -> Path:
    """A temporary sibling of ``dest``: ``.<name>.<pid>-<random>.tmp`` (see :func:`recover`)."""
    return dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def temp_dir_path(final: Path, kind: str = "tmp") -> Path:
    """A temporary sibling folder of ``final``: ``.<name>.<kind>-<pid>-<random>``.

    ``kind`` is ``tmp`` (a folder being built) or ``old`` (the folder it replaces, moved
    aside during the swap).
    """
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


# min/max statistics only where readers filter (keys, dataset, scheme): statistics on long
# free-text columns (meta, raw_value, rule) cost write time and never prune a row group
_STATS = frozenset({
    "image_id", "dataset_id", "source_id", "finding", "annotator", "scheme", "split", "stage",
    "kind", "name", "group_id",
})


def _write(at: pa.Table, path: Path) -> None:
    stats = [f.name for f in at.schema if f.name in _STATS or not pa.types.is_string(f.type)]
    pq.write_table(
        at, path, compression="zstd", row_group_size=1 << 20, write_statistics=stats,
        use_dictionary=True, store_schema=True,
    )
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


class TableStore:
    """The tables of one lake. Usually reached as ``Catalog.tables``."""

    def __init__(self, tables_dir: Path) -> None:
        self.dir = Path(tables_dir)
        _recover_once(self.dir)

    def path(self, table: str, stage: str, partition: str) -> Path:
        spec(table)  # validates the name
        return self.dir / table / safe_name(stage) / f"{safe_name(partition)}.parquet"

    def files(self, table: str, *, stage: str | None = None) -> list[Path]:
        """The Parquet files of a table (all stages, or one), sorted by path.

        Only files of complete commits: a commit whose writer died after its commit point
        is finished first, and one whose writer is still renaming is waited for (see
        :func:`settle`).
        """
        spec(table)
        settle(self.dir)
        base = self.dir / table
        if stage is not None:
            base = base / safe_name(stage)
        if not base.exists():
            return []
        return sorted(p for p in base.rglob("*.parquet") if not p.name.startswith("."))

    def exists(self, table: str) -> bool:
        return bool(self.files(table))

    def write(self, table: str, data: Any, *, stage: str, partition: str = "all") -> Path:
        """Replace one partition of a table atomically; returns the file written."""
        at = conform(table, data)
        return write_parquet_atomic(at, self.path(table, stage, partition))

    def delete(self, table: str, *, stage: str, partition: str) -> bool:
        p = self.path(table, stage, partition)
        if p.exists():
            p.unlink()
            return True
        return False

    def read(
        self, table: str, *, stage: str | None = None, where: str | None = None,
        columns: Iterable[str] | None = None, required: bool = False, hint: str | None = None,
    ) -> pl.DataFrame:
        """Read a whole table (union of its files) as a Polars frame.

        Parameters
        ----------
        where
            Optional SQL filter pushed into the Parquet scan (trusted code only).
        required
            Raise :class:`MissingTableError` (with ``hint``) instead of returning an empty
            frame with the table's schema when no file exists.
        """
        ts = spec(table)
        for attempt in range(READ_ATTEMPTS):
            files = self.files(table, stage=stage)
            if not files:
                if required:
                    raise MissingTableError(table, hint)
                empty = pl.from_arrow(ts.schema.empty_table())
                assert isinstance(empty, pl.DataFrame)
                return empty.select(list(columns)) if columns else empty
            if attempt == READ_ATTEMPTS - 1:  # writers kept changing files: read a snapshot
                return self._read_pinned(ts, stage, where, columns)
            state = file_state(files)
            try:
                df = _read_eq(ts, files, where, columns)
                if df is None:
                    df = _read_duckdb(files, where, columns)
            except (duckdb.Error, OSError) as e:
                if file_state(self.files(table, stage=stage)) != state:
                    _pause(attempt)  # a stage replaced or removed a file: read the new state
                    continue
                broken = find_broken(self.dir, files, data=not sql_mistake(e))
                if broken is not None:
                    raise broken from None
                raise
            if file_state(self.files(table, stage=stage)) == state:
                return df
            _pause(attempt)  # files changed while they were read: the result may mix states
        raise AssertionError("unreachable")  # pragma: no cover - the last attempt returns

    def _read_pinned(
        self, ts: TableSpec, stage: str | None, where: str | None,
        columns: Iterable[str] | None,
    ) -> pl.DataFrame:
        """Read from files held open (see :func:`pin_files`): immune to concurrent renames."""
        pinned = pin_files(self, ts.name, stage=stage)
        cols = ", ".join(f'"{c}"' for c in columns) if columns else "*"
        con = duckdb.connect()
        try:
            con.register("__pinned", pinned_dataset(self.dir, ts.name, pinned))
            sql = f"SELECT {cols} FROM __pinned"
            if where:
                sql += f" WHERE {where}"
            try:
                at = con.sql(sql).to_arrow_table()
            except duckdb.Error:
                broken = find_broken(self.dir, pinned, deep=True)
                if broken is not None:
                    raise broken from None
                raise
        finally:
            con.close()
        df = pl.from_arrow(at)
        assert isinstance(df, pl.DataFrame)
        return df


def _read_duckdb(files: list[Path], where: str | None,
                 columns: Iterable[str] | None) -> pl.DataFrame:
    cols = ", ".join(f'"{c}"' for c in columns) if columns else "*"
    sql = f"SELECT {cols} FROM {scan_sql(files)}"
    if where:
        sql += f" WHERE {where}"
    con = duckdb.connect()
    try:
        at = con.sql(sql).to_arrow_table()
    finally:
        con.close()
    df = pl.from_arrow(at)
    assert isinstance(df, pl.DataFrame)
    return df


# --- reading while stages write -------------------------------------------------------------
# A stage replaces a partition by renaming a new file over it and a reviews compaction removes
# files, so a file listed a moment ago may be another file (or gone) when it is read. Readers
# list, read and list again, and read again when the listing changed (READ_ATTEMPTS times);
# the last attempt reads *pinned* files: each file is read into memory (small ones) or
# memory-mapped first, so later renames and removals cannot touch what is being read (a
# mapping keeps the replaced file's data; writers never truncate a file in place).

READ_ATTEMPTS = 5
_T = TypeVar("_T")
_SMALL_FILE = 1 << 20  # smaller files are read into memory when pinned, larger ones mapped


def _pause(attempt: int) -> None:
    time.sleep(0.005 * (attempt + 1))


def file_state(files: Iterable[Path]) -> tuple[tuple[str, int, int, int], ...]:
    """``(path, inode, size, mtime_ns)`` per file (``-1`` for a vanished one).

    Two equal states mean that no listed file was replaced, rewritten or removed in between
    (a replacing rename gives a new inode).
    """
    out = []
    for p in files:
        try:
            st = p.stat()
            out.append((str(p), st.st_ino, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            out.append((str(p), -1, -1, -1))
    return tuple(out)


def shown_path(tables_dir: Path, path: Path) -> str:
    """``lake/tables/<table>/<stage>/<file>``: a table file as users know it (no machine path)."""
    tables_dir = Path(tables_dir)
    try:
        rel = Path(path).relative_to(tables_dir).as_posix()
    except ValueError:
        return Path(path).name
    return f"{tables_dir.parent.name}/{tables_dir.name}/{rel}"


class BrokenFileError(SQLError):
    """A table file that is not a readable Parquet file (zero bytes, truncated, not Parquet).

    Attributes
    ----------
    path
        The file.
    reason
        What is wrong with it.
    """

    def __init__(self, tables_dir: Path, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        try:
            parts = self.path.relative_to(tables_dir).parts
        except ValueError:
            parts = ()
        table = parts[0] if parts else "this table"
        stage = f" ('{parts[1]}')" if len(parts) > 2 else ""
        super().__init__(
            f"{shown_path(tables_dir, self.path)} is not a valid Parquet file ({reason}); "
            f"delete it or re-run the stage that writes {table}{stage}"
        )


def _magic_problem(head: bytes, tail: bytes, size: int) -> str | None:
    """What the first and last bytes of a Parquet file say is wrong with it, or None."""
    if size == 0:
        return "zero bytes"
    if size < 12:
        return f"only {size} bytes"
    if head != b"PAR1":
        return "no Parquet header: not a Parquet file"
    if tail[4:] != b"PAR1":
        return "no Parquet footer: truncated or corrupt"
    if int.from_bytes(tail[:4], "little") + 12 > size:
        return "footer longer than the file: truncated or corrupt"
    return None


def parquet_problem(path: Path, *, deep: bool = False, data: bool = False) -> str | None:
    """Why ``path`` is not a readable Parquet file, or None when it looks fine.

    The quick check reads the magic bytes and the footer length; ``deep`` also parses the
    footer and ``data`` reads every row group. Raises ``FileNotFoundError`` when the file
    is gone.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(4)
        if size >= 8:
            fh.seek(-8, os.SEEK_END)
        tail = fh.read(8)
    problem = _magic_problem(head, tail, size)
    if problem is None and (deep or data):
        try:
            if data:
                for _ in pq.ParquetFile(path).iter_batches(1 << 16):
                    pass
            else:
                pq.read_metadata(path)
        except FileNotFoundError:
            raise
        except (pa.ArrowException, OSError) as e:
            return first_line(e)
    return problem


def first_line(e: BaseException | str) -> str:
    """The first line of an error message (the name of the error when it has none)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def find_broken(
    tables_dir: Path, files: Iterable[Path] | Iterable[tuple[Path, pa.Buffer]], *,
    deep: bool = True, data: bool = False,
) -> BrokenFileError | None:
    """The first file of ``files`` (paths or pinned ``(path, buffer)`` pairs) that is broken.

    The quick check reads magic bytes and footer length; ``deep`` parses the footer too;
    ``data`` (and ``deep`` on pinned files) reads every row group, so a corrupt data page
    is found as well (call these only after a read failed).
    """
    for f in files:
        if isinstance(f, tuple):
            path, buf = f
            problem = _buffer_problem(buf)
            if problem is None and deep:
                try:
                    for _ in pq.ParquetFile(pa.BufferReader(buf)).iter_batches(1 << 16):
                        pass
                except (pa.ArrowException, OSError) as e:
                    problem = first_line(e)
        else:
            path = f
            try:
                problem = parquet_problem(path, deep=deep, data=data)
            except FileNotFoundError:
                continue
        if problem is not None:
            return BrokenFileError(tables_dir, path, problem)
    return None


def sql_mistake(e: BaseException) -> bool:
    """True when DuckDB error ``e`` is about the SQL text, not about reading a file."""
    return isinstance(e, (duckdb.ParserException, duckdb.BinderException,
                          duckdb.CatalogException))


def _buffer_problem(buf: pa.Buffer) -> str | None:
    size = buf.size
    return _magic_problem(
        buf[:4].to_pybytes() if size >= 4 else b"",
        buf[size - 8:].to_pybytes() if size >= 8 else b"", size,
    )


def _pin(path: Path) -> pa.Buffer:
    """The bytes of ``path`` now (read, or mapped: a later rename cannot change them)."""
    if path.stat().st_size <= _SMALL_FILE:
        return pa.py_buffer(path.read_bytes())
    mm = pa.memory_map(str(path))
    try:
        return mm.read_buffer()  # the mapping outlives the closed file
    finally:
        mm.close()


def pin_files(
    store: TableStore, table: str, *, stage: str | None = None,
) -> list[tuple[Path, pa.Buffer]]:
    """The files of ``table`` pinned as ``(path, bytes)``: a snapshot no writer can change.

    Files are listed, pinned and listed again until the listing holds still (a file removed
    in between makes a new listing), so the snapshot is one state of the folder.
    """
    pinned: list[tuple[Path, pa.Buffer]] = []
    for attempt in range(4 * READ_ATTEMPTS):
        files = store.files(table, stage=stage)
        state = file_state(files)
        try:
            pinned = [(p, _pin(p)) for p in files]
        except FileNotFoundError:
            _pause(attempt)
            continue
        if file_state(store.files(table, stage=stage)) == state:
            return pinned
        _pause(attempt)
    if not pinned:
        raise SQLError(
            f"table '{table}' kept changing while it was read; try again when the stage "
            "writing it has finished"
        )
    return pinned  # writers never paused: the last complete set of files read


def pinned_dataset(
    tables_dir: Path, table: str, pinned: list[tuple[Path, pa.Buffer]],
) -> Any:
    """An Arrow dataset (``pyarrow.dataset.FileSystemDataset``) over pinned files with the
    table's declared schema (pyarrow.dataset is imported here: it imports pandas, ~1 s).

    Columns a file lacks read as nulls. Scanning it needs no file-system access.

    Raises
    ------
    BrokenFileError
        When a file is empty or lacks the Parquet header or footer.
    """
    import pyarrow.dataset as pads

    fmt = pads.ParquetFileFormat()
    frags = []
    for path, buf in pinned:
        problem = _buffer_problem(buf)
        if problem is not None:
            raise BrokenFileError(tables_dir, path, problem)
        frags.append(fmt.make_fragment(buf))
    return pads.FileSystemDataset(frags, schema=spec(table).schema, format=fmt)


def read_stable(
    listing: Callable[[], list[Path]], read: Callable[[int], _T], *,
    on_error: Callable[[BaseException], None] | None = None,
    attempts: int = READ_ATTEMPTS,
) -> _T:
    """``read(attempt)`` until no file of ``listing()`` changed while it ran.

    An error raised while files changed is retried; otherwise ``on_error`` may raise a
    better error (e.g. :class:`BrokenFileError`) before the error itself is raised. The last
    attempt's result is returned whatever happened meanwhile (make it read pinned files).
    """
    for attempt in range(attempts):
        state = file_state(listing())
        try:
            out = read(attempt)
        except (duckdb.Error, OSError) as e:
            if attempt < attempts - 1 and file_state(listing()) != state:
                _pause(attempt)
                continue
            if on_error is not None:
                on_error(e)
            raise
        if attempt == attempts - 1 or file_state(listing()) == state:
            return out
        _pause(attempt)
    raise AssertionError("unreachable")  # pragma: no cover


# declared Arrow types -> Polars (built by hand: pyarrow's empty_table() imports pandas)
_PL_TYPES: dict[pa.DataType, Any] = {
    pa.string(): pl.String, pa.int32(): pl.Int32, pa.int64(): pl.Int64,
    pa.float64(): pl.Float64, pa.bool_(): pl.Boolean, pa.timestamp("us", tz="UTC"): pl.Datetime("us", "UTC"),
}
_EQ = re.compile(r"^\s*(\w+)\s*=\s*'((?:[^']|'')*)'\s*$")


def _read_eq(
    ts: TableSpec, files: list[Path], where: str | None, columns: Iterable[str] | None
) -> pl.DataFrame | None:
    """``SELECT columns WHERE text_column = 'literal'`` through a Polars scan, or None.

    The common lookup (e.g. one dataset's image ids) costs a fifth of a DuckDB query this
    way (row groups are pruned by the ``dataset_id`` statistics). Anything else (another
    filter, all columns, a file that does not match the declared schema) returns None and
    the caller runs DuckDB, so results never differ.
    """
    m = _EQ.match(where or "")
    cols = list(columns or [])
    if m is None or not cols or not all(c in ts.schema.names for c in [m[1], *cols]):
        return None
    if not pa.types.is_string(ts.schema.field(m[1]).type):
        return None
    schema = {f.name: _PL_TYPES.get(f.type) for f in ts.schema}
    if None in schema.values():
        return None
    try:
        return (
            pl.scan_parquet(files, schema=schema, missing_columns="insert",
                            extra_columns="ignore", hive_partitioning=False)
            .filter(pl.col(m[1]) == m[2].replace("''", "'")).select(cols).collect()
        )
    except (pl.exceptions.PolarsError, OSError):
        return None


def scan_sql(files: list[Path]) -> str:
    """A DuckDB table expression reading ``files`` with columns unioned by name."""
    lst = ", ".join("'" + str(f).replace("'", "''") + "'" for f in files)
    return f"read_parquet([{lst}], union_by_name=true)"


class Transaction:
    """Stage several partitions (and version folders) and publish them together.

    ``write`` checks the data against the schema at once (a :class:`SchemaError` is raised
    there) and encodes and syncs the temporary file on a background thread, so the caller
    prepares the next table meanwhile and the files' fsyncs overlap; leaving the ``with``
    block waits for every file, then commits (or, on any error, removes every temporary file
    and publishes nothing). Arrow data passed in (or NumPy buffers behind it) must not be
    changed in place before the block ends.

    The commit is all or nothing for readers, whatever moment the process dies: an intent
    file naming every rename and deletion is published first (the commit point), then the
    renames are done and the intent removed; a reader or the next process finishes the
    renames of a writer that died after the commit point (see :func:`settle`).

    Example
    -------
    >>> with Transaction(store) as tx:  # doctest: +SKIP
    ...     tx.write("images", images, stage="ingest", partition="ham10000")
    ...     tx.write("annotations", ann, stage="ingest", partition="ham10000")
    """

    def __init__(self, store: TableStore) -> None:
        self.store = store
        self._pending: list[tuple[Path, Path]] = []
        self._deletes: list[Path] = []
        self._dirs: list[tuple[Path, Path]] = []
        self._jobs: list[Future[None]] = []
        self._published = False

    def write(self, table: str, data: Any, *, stage: str, partition: str = "all") -> Path:
        """Stage ``data`` as partition ``partition`` of ``table``; returns the final path."""
        at = conform(table, data)
        dest = self.store.path(table, stage, partition)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(dest)
        self._pending.append((tmp, dest))
        self._jobs.append(_writer().submit(_write, at, tmp))
        return dest

    def delete(self, table: str, *, stage: str, partition: str) -> None:
        """Remove partition ``partition`` of ``table`` with the commit (absent: nothing)."""
        self._deletes.append(self.store.path(table, stage, partition))

    def delete_file(self, path: Path) -> None:
        """Remove ``path`` (a file of the lake) with the commit."""
        self._deletes.append(Path(path))

    def publish_dir(self, tmp: Path, final: Path) -> None:
        """Swap the finished folder ``tmp`` in at ``final`` with the commit.

        ``tmp`` should be a sibling of ``final`` named by :func:`temp_dir_path`; on failure
        the transaction removes it.
        """
        self._dirs.append((Path(tmp), Path(final)))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            wait(self._jobs)
            if exc_type is None:
                for job in self._jobs:
                    job.result()  # re-raises a failed write: nothing is published
                ops: list[list[str]] = []
                for tmp, final in self._dirs:
                    ops.append(["dir", str(tmp), str(final), str(temp_dir_path(final, "old"))])
                ops += [["file", str(tmp), str(dest)] for tmp, dest in self._pending]
                written = {dest for _, dest in self._pending}
                ops += [["delete", str(p)] for p in self._deletes if p not in written]
                if ops:
                    self._commit(ops)
        finally:
            if not self._published:  # nothing was committed: no temporary file may stay
                for tmp, _ in self._pending:
                    tmp.unlink(missing_ok=True)
                for tmp, _ in self._dirs:
                    shutil.rmtree(tmp, ignore_errors=True)
            self._pending.clear()
            self._deletes.clear()
            self._dirs.clear()
            self._jobs.clear()
            self._published = False

    def _commit(self, ops: list[list[str]]) -> None:
        """Publish the intent (the commit point), then apply it (see :func:`commit`)."""
        intent = begin_commit(self.store.dir, ops)
        self._published = True  # from here on the temporary files belong to the intent
        intent.finish()


_POOL: ThreadPoolExecutor | None = None


def _writer() -> ThreadPoolExecutor:
    """The threads that encode and fsync transaction files (Arrow releases the GIL)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="medlake-write")
    return _POOL


# --- the commit protocol: intent (write-ahead) files and recovery ---------------------------
# An intent is JSON {"version": 1, "ops": [...]} in lake/tables/.journal/<pid>-<rand>.intent.
# Ops (paths relative to the lake folder, the parent of lake/tables):
#   ["file", tmp, dest]          os.replace(tmp, dest)
#   ["dir", tmp, final, old]     final -> old (when final exists), tmp -> final, remove old
#   ["delete", path]             unlink path
# Every op is idempotent given the files left by any earlier partial application: an op
# whose temporary source is gone was done. The writer holds an exclusive flock on the intent
# while it applies it; a reader that gets the lock knows the writer died and finishes it.

JOURNAL = ".journal"
"""Folder of intent files, inside ``lake/tables`` (not a table; no DVC output contains it)."""
INTENT_SUFFIX = ".intent"
SETTLE_WAIT_S = 60.0
"""Seconds a reader waits for a live writer to finish the renames of a commit."""


def _rel(lake: Path, p: Path | str) -> str:
    p = Path(p)
    try:
        return p.relative_to(lake).as_posix()
    except ValueError:
        return str(p)


def _abs(lake: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else lake / q


class Intent:
    """A published commit of this process: its intent file (locked) and its operations."""

    def __init__(self, tables_dir: Path, path: Path, fd: int, ops: list[list[str]]) -> None:
        self.tables_dir = tables_dir
        self.path = path
        self.fd = fd
        self.ops = ops

    def finish(self) -> None:
        """Apply the operations, remove the intent and release its lock.

        When an operation fails the intent stays (unlocked) and the next reader or process
        finishes it; the error is raised.
        """
        try:
            apply_ops(self.tables_dir.parent, self.ops)
            fault_point("delete", self.path)
            os.unlink(self.path)
            _fsync_dir(self.path.parent)
            _log_commit(self.tables_dir.parent, None)
        finally:
            _close_intent_fd(self.fd)


_INTENT_FDS: set[int] = set()
_FD_LOCK = threading.Lock()


def _close_intent_fd(fd: int) -> None:
    with _FD_LOCK:
        _INTENT_FDS.discard(fd)
    os.close(fd)


def _forget_intent_fds() -> None:
    """In a forked child: close the inherited intent descriptors (without unlocking them).

    The parent keeps its lock (a flock is held while any descriptor of it is open); the
    child must not keep the parent's intents looking alive after the parent died.
    """
    for fd in list(_INTENT_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _INTENT_FDS.clear()


os.register_at_fork(after_in_child=_forget_intent_fds)


def begin_commit(tables_dir: Path, ops: list[list[str]]) -> Intent:
    """Publish an intent for ``ops`` (absolute paths) in ``tables_dir/.journal``.

    The intent is written to a temporary file, fsynced and renamed into place: that rename is
    the commit point. Dead writers' intents are finished first, so commits apply in order.
    Returns the locked :class:`Intent`; call :meth:`Intent.finish` to apply it.
    """
    tables_dir = Path(tables_dir)
    lake = tables_dir.parent
    settle(tables_dir)
    journal = tables_dir / JOURNAL
    journal.mkdir(parents=True, exist_ok=True)
    rel = [[o[0], *(_rel(lake, x) for x in o[1:])] for o in ops]
    _log_commit(lake, rel)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp = journal / f".intent.{token}.tmp"
    final = journal / f"{token}{INTENT_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    with _FD_LOCK:
        _INTENT_FDS.add(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = json.dumps({"version": 1, "ops": rel}, indent=0).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        fault_point("rename", final)
        os.rename(tmp, final)  # the commit point
    except BaseException:
        tmp.unlink(missing_ok=True)
        _close_intent_fd(fd)
        raise
    _fsync_dir(journal)
    return Intent(tables_dir, final, fd, ops)


def apply_ops(lake: Path, ops: list[list[str]]) -> None:
    """Apply commit operations (idempotent; see the comment above :data:`JOURNAL`)."""
    touched: set[Path] = set()
    for op in ops:
        kind, paths = op[0], [_abs(lake, x) for x in op[1:]]
        if kind == "dir":
            tmp, final, old = paths
            replace_dir(tmp, final, old)
            touched.add(final.parent)
    for op in ops:
        kind, paths = op[0], [_abs(lake, x) for x in op[1:]]
        if kind == "file":
            tmp, dest = paths
            if os.path.lexists(tmp):
                fault_point("rename", dest)
                os.replace(tmp, dest)
                touched.add(dest.parent)
    for op in ops:
        kind, paths = op[0], [_abs(lake, x) for x in op[1:]]
        if kind == "delete" and os.path.lexists(paths[0]):
            fault_point("delete", paths[0])
            paths[0].unlink(missing_ok=True)
            touched.add(paths[0].parent)
    for d in sorted(touched):
        _fsync_dir(d)


def replace_dir(tmp: Path, final: Path, old: Path | None = None) -> None:
    """Swap folder ``tmp`` in at ``final``: ``final`` -> ``old``, ``tmp`` -> ``final``, remove
    ``old``. Idempotent: an interrupted swap is completed by calling it again."""
    old = old or temp_dir_path(final, "old")
    if os.path.lexists(tmp):
        if os.path.lexists(final):
            fault_point("rename", old)
            os.rename(final, old)
        fault_point("rename", final)
        os.rename(tmp, final)
    if os.path.lexists(old):
        fault_point("delete", old)
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _intents(tables_dir: Path) -> list[Path]:
    try:
        with os.scandir(Path(tables_dir) / JOURNAL) as it:
            names = [e.name for e in it
                     if e.name.endswith(INTENT_SUFFIX) and not e.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [Path(tables_dir) / JOURNAL / n for n in sorted(names)]


def _try_finish(tables_dir: Path, path: Path) -> str:
    """Finish the intent at ``path`` when its writer is gone: ``done``, ``busy`` or ``failed``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return "done"
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "busy"  # its writer (or another reader finishing it) holds the lock
        try:
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                return "done"
        except FileNotFoundError:
            return "done"  # finished by its writer meanwhile
        with os.fdopen(os.dup(fd), "rb") as fh:
            raw = fh.read()
        try:
            ops = json.loads(raw)["ops"]
        except (ValueError, KeyError, TypeError):
            log.error("%s is not a valid intent file; moved aside (check the tables it "
                      "names and re-run the stage that wrote them)", path)
            os.replace(path, path.with_name(f".{path.name}.invalid"))
            return "failed"
        apply_ops(Path(tables_dir).parent, ops)
        fault_point("delete", path)
        os.unlink(path)
        _fsync_dir(path.parent)
        log.info("finished the commit of a writer that stopped: %s", path.name)
        return "done"
    except OSError as e:  # e.g. a read-only lake: read what is there
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            log.warning("could not finish the interrupted commit %s: %s", path.name, e)
        return "failed"
    finally:
        os.close(fd)


def settle(tables_dir: Path, *, wait_s: float = SETTLE_WAIT_S) -> int:
    """Finish the commits of dead writers and wait for those of live ones.

    Called before every listing of table files (:meth:`TableStore.files`), so readers see
    complete commits only. One ``scandir`` of an empty folder when nothing is pending.

    Returns
    -------
    int
        Intents that were pending.
    """
    pending = _intents(tables_dir)
    deadline = time.monotonic() + wait_s
    for path in pending:
        pause = 0.001
        while _try_finish(tables_dir, path) == "busy":
            if time.monotonic() > deadline:
                log.warning("a writer has been renaming %s for %.0f s; reading anyway",
                            path.name, wait_s)
                break
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
    return len(pending)


# --- leftovers of killed writers --------------------------------------------------------------
_TMP_FILE = re.compile(r"^\.(?P<name>.+)\.(?:(?P<pid>\d+)-)?[0-9a-f]{8,}\.tmp$")
_TMP_DIR = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8,}$")
LEGACY_TEMP_AGE_S = 3600.0
"""A temporary name without a process id (written by older medlake) is removed when older."""


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _orphaned(entry: os.DirEntry, pid: str | None) -> bool:
    if pid is not None:
        return not _alive(int(pid))
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime > LEGACY_TEMP_AGE_S
    except FileNotFoundError:
        return False


def clean_orphans(folder: Path, *, name: str | None = None,
                  keep: frozenset[str] = frozenset()) -> list[Path]:
    """Remove the temporary files and folders of dead writers directly in ``folder``.

    ``.<x>.<pid>-<rand>.tmp`` files and ``.<x>.tmp-<pid>-<rand>`` folders are removed; an
    ``.<x>.old-<pid>-<rand>`` folder (moved aside by a folder swap that never finished) is
    moved back to ``<x>`` when that is missing, else removed. Entries of live processes, and
    paths in ``keep`` (named by an intent not finished yet), are kept. ``name`` limits the
    cleaning to one final name. Returns what was removed or restored.
    """
    done: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return done
    for e in sorted(entries, key=lambda e: e.name):
        if not e.name.startswith(".") or os.path.abspath(e.path) in keep:
            continue
        m = _TMP_DIR.match(e.name)
        if m and e.is_dir(follow_symlinks=False):
            if (name is not None and m["name"] != name) or not _orphaned(e, m["pid"]):
                continue
            final = Path(folder) / m["name"]
            if m["kind"] == "old" and not os.path.lexists(final):
                os.rename(e.path, final)  # a half-done swap without intent: roll back
            else:
                shutil.rmtree(e.path, ignore_errors=True)
            done.append(Path(e.path))
            continue
        m = _TMP_FILE.match(e.name)
        if m and not e.is_dir(follow_symlinks=False):
            if (name is not None and m["name"] != name) or not _orphaned(e, m["pid"]):
                continue
            Path(e.path).unlink(missing_ok=True)
            done.append(Path(e.path))
    return done


def recover(tables_dir: Path, *, extra: Iterable[Path] = ()) -> list[Path]:
    """Make the lake whole after a crash: finish interrupted commits, remove leftovers.

    Committed intents of dead writers are rolled forward (:func:`settle`); then temporary
    files and folders of dead writers are removed from every ``<table>/<stage>/`` folder,
    the journal and the ``extra`` folders (and the lake's own folder and its ``versions``).
    Run when a lake is opened (:class:`TableStore`, once per process and folder); safe while other
    processes write (their files name live processes and are kept).

    Returns
    -------
    list of Path
        What was removed or restored.
    """
    tables_dir = Path(tables_dir)
    settle(tables_dir)
    keep = frozenset(_named_by_intents(tables_dir))  # intents that could not be finished
    done: list[Path] = []
    folders = [tables_dir / JOURNAL, tables_dir.parent / "versions", tables_dir.parent,
               *map(Path, extra)]  # the lake itself: scratch folders of stages (features)
    try:
        with os.scandir(tables_dir) as it:
            tables = [e.path for e in it if e.is_dir() and not e.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        tables = []
    for t in tables:
        folders.append(Path(t))
        try:
            with os.scandir(t) as it:
                folders += [Path(e.path) for e in it if e.is_dir() and not e.name.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            continue
    for f in dict.fromkeys(folders):
        done += clean_orphans(f, keep=keep)
    if done:
        log.info("removed %d leftover temporary files of stopped writers", len(done))
    return done


def _named_by_intents(tables_dir: Path) -> set[str]:
    """Absolute paths every pending intent names (their temporary files must stay)."""
    lake = Path(tables_dir).parent
    out: set[str] = set()
    for path in _intents(tables_dir):
        try:
            ops = json.loads(path.read_bytes())["ops"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        for op in ops:
            out.update(os.path.abspath(_abs(lake, x)) for x in op[1:])
    return out


_RECOVERED: set[tuple[int, int]] = set()


def _recover_once(tables_dir: Path) -> None:
    """:func:`recover` the first time this process opens the lake at ``tables_dir``."""
    try:
        st = os.stat(tables_dir)
    except OSError:
        return
    key = (st.st_dev, st.st_ino)
    if key in _RECOVERED:
        settle(tables_dir)
        return
    _RECOVERED.add(key)
    try:
        recover(tables_dir)
    except OSError as e:  # a read-only lake, a folder removed meanwhile: read what is there
        log.debug("recovery of %s skipped: %s", tables_dir, e)


# --- fault injection ------------------------------------------------------------------------
FAULT_ENV = "MEDLAKE_FAULT"
"""``MEDLAKE_FAULT``: comma-separated items for the fault-injection harness.

``rename:N`` kill this process (SIGKILL) just before its Nth rename of a commit or atomic
write; ``delete:N`` before its Nth deletion; ``step:N`` before its Nth step of either kind;
``delay:S`` sleep S seconds before every step (so a kill from outside lands between steps);
``log:PATH`` append one JSON line per step and per commit (its operations) to PATH.
"""
_FAULT_COUNTS: dict[str, int] = {}


def fault_point(kind: str, path: Path | str) -> None:
    """A rename (``kind='rename'``) or deletion (``'delete'``) of the commit code is next.

    Does nothing unless ``MEDLAKE_FAULT`` is set (see :data:`FAULT_ENV`).
    """
    spec_ = os.environ.get(FAULT_ENV)
    if not spec_:
        return
    items = dict(it.split(":", 1) for it in spec_.split(",") if ":" in it)
    for k in (kind, "step"):
        _FAULT_COUNTS[k] = _FAULT_COUNTS.get(k, 0) + 1
    if "log" in items:
        _fault_log(items["log"], {"step": kind, "n": _FAULT_COUNTS["step"], "path": str(path)})
    if "delay" in items:
        time.sleep(float(items["delay"]))
    for k in (kind, "step"):
        if k in items and _FAULT_COUNTS[k] == int(items[k]):
            os.kill(os.getpid(), signal.SIGKILL)


def _log_commit(lake: Path, ops: list[list[str]] | None) -> None:
    """Log a commit's operations (``ops``) or its end (None) for the fault harness."""
    spec_ = os.environ.get(FAULT_ENV) or ""
    for it in spec_.split(","):
        if it.startswith("log:"):
            _fault_log(it[4:], {"commit": ops} if ops is not None else {"end": lake.name})


def _fault_log(path: str, rec: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
