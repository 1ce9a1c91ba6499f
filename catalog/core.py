"""The :class:`Catalog`: one object that joins a workspace's tables, SQL and vectors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from medlake.catalog import sql as _sql
from medlake.catalog.tables import TableStore, Transaction
from medlake.catalog.vocab import load_overrides, shared_name
from medlake.catalog.workspace import Workspace


class Catalog:
    """Entry point of the library for one workspace.

    Example
    -------
    >>> cat = Catalog.open("path/to/workspace")  # doctest: +SKIP
    >>> cat.sql("SELECT dataset_id, count(*) FROM images GROUP BY 1")  # doctest: +SKIP
    """

    def __init__(self, workspace: Workspace) -> None:
        self.ws = workspace
        self.tables = TableStore(workspace.tables_dir)

    @classmethod
    def open(cls, path: Path | str | None = None) -> "Catalog":
        """The catalog of the workspace at or above ``path`` (default: the current folder)."""
        return cls(Workspace.find(path))

    # --- tables -----------------------------------------------------------------------------
    def read(self, table: str, **kw: Any) -> pl.DataFrame:
        """A whole table as a Polars frame; see :meth:`TableStore.read`."""
        return self.tables.read(table, **kw)

    def write(self, table: str, data: Any, *, stage: str, partition: str = "all") -> Path:
        """Replace one partition of a table atomically."""
        return self.tables.write(table, data, stage=stage, partition=partition)

    def transaction(self) -> Transaction:
        return Transaction(self.tables)

    # --- SQL --------------------------------------------------------------------------------
    def sql(
        self, query: str, *, limit: int | None = None, timeout_s: float | None = None,
        memory_limit: str | None = None,
    ) -> pa.Table:
        """Run one read-only query over every table in the sandbox (see :mod:`catalog.sql`).

        Parameters
        ----------
        query
            One SELECT-like statement (DuckDB dialect), e.g. written by a user.
        limit
            Most rows returned (default ``sql.DEFAULT_ROW_CAP``); the engine stops after
            ``limit + 1`` rows and a cut result says so (``medlake.catalog.sql.row_cap``).
        timeout_s
            Seconds before the query is stopped (default ``sql.DEFAULT_TIMEOUT_S``).
        memory_limit
            DuckDB memory limit such as ``"8GB"`` (default ``sql.DEFAULT_MEMORY_LIMIT``).

        Raises
        ------
        SQLError
            When the query is not a read, reaches a limit, meets a broken file or fails.
        """
        return _sql.run_query(
            self.ws.tables_dir, query, limit=limit, timeout_s=timeout_s,
            memory_limit=memory_limit,
        )

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A trusted DuckDB connection with all table views (for library code, not users)."""
        return _sql.connect(self.ws.tables_dir, sandbox=False)

    def query(self, query: str, params: list[Any] | None = None) -> pl.DataFrame:
        """Run trusted SQL over the table views and return a Polars frame.

        A stage rewriting a table meanwhile makes the query run again (see
        :func:`catalog.sql.trusted_query`); a broken table file raises ``BrokenFileError``
        (an :class:`SQLError`) naming it.
        """
        at = _sql.trusted_query(self.ws.tables_dir, query, params)
        df = pl.from_arrow(at)
        assert isinstance(df, pl.DataFrame)
        return df

    # --- vocabulary -------------------------------------------------------------------------
    def findings_overrides(self) -> dict[str, Any]:
        return load_overrides(self.ws.findings_file)

    def shared_finding(self, source_id: str, finding: str) -> str:
        return shared_name(source_id, finding, self.findings_overrides())

    # --- datasets ---------------------------------------------------------------------------
    def dataset_ids(self) -> list[str]:
        return sorted(self.read("datasets", columns=["dataset_id"])["dataset_id"].unique().to_list())

    def image_ids(self, dataset_id: str) -> pl.DataFrame:
        """``image_id, native_id`` of one dataset (empty when it is not ingested)."""
        return self.read(
            "images", columns=["image_id", "native_id"],
            where=f"dataset_id = '{dataset_id.replace(chr(39), chr(39) * 2)}'",
        )


def to_json(obj: Any) -> str:
    """Stable JSON text (sorted keys) for JSON-typed columns."""
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
