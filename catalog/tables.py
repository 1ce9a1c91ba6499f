"""Reading and writing catalog tables as Parquet, atomically.

Each table lives in ``lake/tables/<table>/<stage>/<partition>.parquet``. A write goes to a
temporary file in the same folder and is renamed into place, so a reader (or a crash) never
sees half a table. :class:`Transaction` stages several files and renames them together at the
end, so a stage that writes images *and* annotations publishes both or neither.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Self, TypeVar

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
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
    """Write ``at`` to ``dest`` via a temporary file and rename; deterministic bytes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _write(at, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


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

    def path(self, table: str, stage: str, partition: str) -> Path:
        spec(table)  # validates the name
        return self.dir / table / safe_name(stage) / f"{safe_name(partition)}.parquet"

    def files(self, table: str, *, stage: str | None = None) -> list[Path]:
        """The Parquet files of a table (all stages, or one), sorted by path."""
        spec(table)
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
) -> pads.Dataset:
    """An Arrow dataset over pinned files with the table's declared schema.

    Columns a file lacks read as nulls. Scanning it needs no file-system access.

    Raises
    ------
    BrokenFileError
        When a file is empty or lacks the Parquet header or footer.
    """
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
    """Stage several partitions and publish them together.

    ``write`` checks the data against the schema at once (a :class:`SchemaError` is raised
    there) and encodes and syncs the temporary file on a background thread, so the caller
    prepares the next table meanwhile and the files' fsyncs overlap; leaving the ``with``
    block waits for every file, then renames them all (or, on any error, none). Arrow data
    passed in (or NumPy buffers behind it) must not be changed in place before the block ends.

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
        self._jobs: list[Future[None]] = []

    def write(self, table: str, data: Any, *, stage: str, partition: str = "all") -> Path:
        at = conform(table, data)
        dest = self.store.path(table, stage, partition)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        self._pending.append((tmp, dest))
        self._jobs.append(_writer().submit(_write, at, tmp))
        return dest

    def delete(self, table: str, *, stage: str, partition: str) -> None:
        self._deletes.append(self.store.path(table, stage, partition))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            wait(self._jobs)
            if exc_type is None:
                for job in self._jobs:
                    job.result()  # re-raises a failed write: nothing is renamed
                for tmp, dest in self._pending:
                    os.replace(tmp, dest)
                for p in self._deletes:
                    p.unlink(missing_ok=True)
        finally:
            for tmp, _ in self._pending:
                tmp.unlink(missing_ok=True)
            self._pending.clear()
            self._jobs.clear()


_POOL: ThreadPoolExecutor | None = None


def _writer() -> ThreadPoolExecutor:
    """The threads that encode and fsync transaction files (Arrow releases the GIL)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="medlake-write")
    return _POOL
