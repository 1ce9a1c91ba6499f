"""medlake's library: the lake on disk, its tables, SQL, vectors and statistics.

Public API (pipelines, UI and CLI use only these names)::

    from catalog import Catalog, Workspace, CatalogError
"""

from __future__ import annotations

from catalog.core import Catalog, to_json
from catalog.errors import (
    CatalogError,
    IngestError,
    MissingTableError,
    SchemaError,
    SQLError,
    WorkspaceError,
)
from catalog.ingestkit import FileReport, IngestResult, Quarantine, publish
from catalog.schema import SCHEMA_VERSION, TABLES, spec
from catalog.sql import VIEWS, render
from catalog.tables import Transaction, conform, write_parquet_atomic
from catalog.vocab import normalise, shared_name
from catalog.workspace import Workspace, run_dvc

__version__ = "0.1.0"

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
