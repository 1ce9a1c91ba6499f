"""One module per page; each exposes ``TITLE`` and ``render(cat)``."""

from __future__ import annotations

from types import ModuleType


def pages() -> dict[str, ModuleType]:
    """Page name (the ``?page=`` value) -> module, in sidebar order."""
    from medlake.ui.views import (
        catalog_page,
        discrepancies,
        duplicates,
        leakage,
        outliers,
        review,
        sql_page,
    )

    return {"catalog": catalog_page, "duplicates": duplicates, "discrepancies": discrepancies,
            "leakage": leakage, "outliers": outliers, "review": review, "sql": sql_page}
