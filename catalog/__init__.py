"""medlake's library: the lake on disk, its tables, SQL, vectors and statistics.

Public API (pipelines, UI and CLI use only these names)::

    from medlake.catalog import Catalog, Workspace, CatalogError
"""

from __future__ import annotations

from medlake.catalog.core import Catalog, to_json
from medlake.catalog.errors import (
    CatalogError,
    IngestError,
    MissingTableError,
    SchemaError,
    SQLError,
    WorkspaceError,
)
from medlake.catalog.ingestkit import FileReport, IngestResult, Quarantine, publish
from medlake.catalog.schema import SCHEMA_VERSION, TABLES, spec
from medlake.catalog.sql import VIEWS, render
from medlake.catalog.tables import Transaction, conform, write_parquet_atomic
from medlake.catalog.vocab import normalise, shared_name
from medlake.catalog.workspace import Workspace, run_dvc

from medlake import __version__

__all__ = [
    "SCHEMA_VERSION",
    "TABLES",
    "VIEWS",
    "Catalog",
    "CatalogError",
    "FileReport",
    "IngestError",
    "IngestResult",
    "MissingTableError",
    "Quarantine",
    "SQLError",
    "SchemaError",
    "Transaction",
    "Workspace",
    "WorkspaceError",
    "__version__",
    "conform",
    "normalise",
    "publish",
    "render",
    "run_dvc",
    "shared_name",
    "spec",
    "to_json",
    "write_parquet_atomic",
]
