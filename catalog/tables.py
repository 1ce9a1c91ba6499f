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
import uuid
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Self

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from medlake.catalog.errors import MissingTableError, SchemaError
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
        files = self.files(table, stage=stage)
        if not files:
            if required:
                raise MissingTableError(table, hint)
            empty = pl.from_arrow(ts.schema.empty_table())
            assert isinstance(empty, pl.DataFrame)
            return empty.select(list(columns)) if columns else empty
        fast = _read_eq(ts, files, where, columns)
        if fast is not None:
            return fast
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
