"""Ingest adapters: one module per public format (plus the generic one).

Each module defines ``ADAPTERS``: a list of :class:`Adapter`. They are discovered here, so
adding a format means adding a module and nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlake.catalog import Catalog, IngestResult


@dataclass(frozen=True)
class Adapter:
    """One input format.

    ``run(catalog, path, *, dataset_id, strict, **options) -> IngestResult``.
    ``links_to`` names the adapter whose dataset must be ingested first (label files that
    describe another file's images, e.g. the NIH bounding boxes), or None.
    ``default_path`` is relative to the real-data folder (``../shared/data``) when the format
    has a public file there.
    """

    name: str
    dataset_id: str
    description: str
    run: Callable[..., IngestResult]
    links_to: str | None = None
    default_path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def registry() -> dict[str, Adapter]:
    """All adapters by name, in a stable order (dependencies of linked adapters first)."""
    found: dict[str, Adapter] = {}
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{mod.name}")
        for ad in getattr(module, "ADAPTERS", []):
            if ad.name in found:
                raise RuntimeError(f"two adapters are named '{ad.name}'")
            found[ad.name] = ad
    return found


def get(name: str) -> Adapter:
    reg = registry()
    if name not in reg:
        from medlake.catalog import CatalogError

        raise CatalogError(f"unknown format '{name}'; known formats: {', '.join(sorted(reg))}")
    return reg[name]


def resolve(path: Path | str) -> Path:
    return Path(path).expanduser().resolve()


__all__ = ["Adapter", "Catalog", "get", "registry", "resolve"]
