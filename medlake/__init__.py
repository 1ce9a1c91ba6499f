"""medlake: versioned catalog, audits and corrected versions of medical image datasets.

One import namespace. The repository keeps its top-level folders; the installed package maps
them under ``medlake`` (``pyproject.toml: [tool.setuptools] package-dir``):

========================  =====================  ==============================================
import name               repository folder      what
========================  =====================  ==============================================
``medlake``               ``medlake/``           this file: version and the public API
``medlake.cli``           ``medlake/cli/``       the ``medlake`` command
``medlake.catalog``       ``catalog/``           the library (lake, tables, SQL, vectors, stats)
``medlake.pipelines``     ``pipelines/``         one module per stage, ingest adapters
``medlake.ui``            ``ui/``                the Streamlit app
``medlake.demo``          ``demo/``              demo only: synthetic data, demo runner, UI sample
========================  =====================  ==============================================

Example
-------
>>> import medlake
>>> cat = medlake.Catalog.open("my-workspace")            # doctest: +SKIP
>>> cat.sql("SELECT count(*) FROM images")                 # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"

_PUBLIC = {
    "Catalog": "medlake.catalog",
    "Workspace": "medlake.catalog",
    "CatalogError": "medlake.catalog",
    "load_version": "medlake.catalog.versions",
    "VersionDataset": "medlake.catalog.versions",
    "STAGES": "medlake.stages",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:  # lazy, so `import medlake` stays light
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'medlake' has no attribute {name!r}")
