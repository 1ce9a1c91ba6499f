"""Errors raised by the catalog. The CLI turns these into one-line user messages."""

from __future__ import annotations


class CatalogError(Exception):
    """Base class: a problem the user can fix (bad input, missing table, bad setting)."""


class WorkspaceError(CatalogError):
    """No workspace found, or the workspace is not set up as expected."""


class SchemaError(CatalogError):
    """A file or frame does not have the columns or types a table expects."""


class IngestError(CatalogError):
    """Bad input met in strict mode, or an input that cannot be read at all."""


class SQLError(CatalogError):
    """A user query failed or tried to do something the sandbox forbids."""


class MissingTableError(CatalogError):
    """A table that a command needs has not been written yet."""

    def __init__(self, table: str, hint: str | None = None) -> None:
        msg = f"table '{table}' does not exist in this workspace yet"
        if hint:
            msg += f"; {hint}"
        super().__init__(msg)
        self.table = table
