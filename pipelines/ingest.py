"""Stage ``ingest``: map public formats and user data into the foundation tables.

``run`` ingests one file with one adapter; ``run_all`` ingests what ``params.yaml`` lists
under ``ingest:`` (the demo's synthetic data and, where present, the public metadata).

Run as ``medlake ingest FORMAT PATH`` or ``python -m pipelines.ingest FORMAT PATH``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from catalog import Catalog, CatalogError, IngestResult
from pipelines import adapters

log = logging.getLogger(__name__)


def run(
    catalog: Catalog,
    fmt: str,
    path: Path | str,
    /,  # positional-only, so adapter options may be named 'path' (generic: -o path=COLUMN)
    *,
    dataset_id: str | None = None,
    strict: bool = False,
    **options: Any,
) -> IngestResult:
    """Ingest ``path`` with adapter ``fmt`` into ``catalog``.

    Parameters
    ----------
    fmt
        Adapter name (``medlake ingest --list`` shows them), e.g. ``nih-cxr14``.
    path
        The input file (or folder, for the generic adapter).
    dataset_id
        Override the adapter's default dataset id.
    strict
        Stop at the first bad row instead of quarantining it.

    Returns
    -------
    IngestResult
        Per-file counts (rows read = ingested + quarantined) and rows written per table.

    Raises
    ------
    CatalogError
        Missing file, missing columns, a linked dataset not ingested yet, or (``strict``)
        the first bad row.
    """
    ad = adapters.get(fmt)
    p = adapters.resolve(path)
    if not p.exists():
        raise CatalogError(f"{path}: no such file or folder (format '{fmt}')")
    ds = dataset_id or ad.dataset_id
    if ad.links_to and not catalog.image_ids(ds).height:
        raise CatalogError(
            f"format '{fmt}' labels images of dataset '{ds}', which is not ingested yet; "
            f"ingest it first with 'medlake ingest {ad.links_to} FILE'"
        )
    opts = {**ad.options, **{k: v for k, v in options.items() if v is not None}}
    log.info("ingest %s %s as %s", fmt, p, ds)
    return ad.run(catalog, p, dataset_id=ds, strict=strict, **opts)


def plan(catalog: Catalog) -> list[dict[str, Any]]:
    """The ingest list: ``params.yaml``'s ``ingest:`` entries, with paths resolved.

    Each entry: ``{format, path, dataset?, options?}``; ``path`` is relative to the
    workspace, or to the real-data folder when it starts with ``real:``. Entries whose file
    is absent are kept with ``missing: True`` so the caller can say what was skipped.
    """
    entries = catalog.ws.param("ingest") or []
    if not isinstance(entries, list):
        raise CatalogError("params.yaml: 'ingest' must be a list of {format, path} entries")
    real = catalog.ws.real_data_dir()
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "format" not in e or "path" not in e:
            raise CatalogError(f"params.yaml: ingest entry {i + 1} needs 'format' and 'path': {e}")
        raw = str(e["path"])
        if raw.startswith("real:"):
            p = (real / raw[5:]) if real else None
        else:
            p = catalog.ws.root / raw
        out.append({**e, "resolved": p, "missing": p is None or not p.exists()})
    return out


def run_all(
    catalog: Catalog, *, strict: bool = False, echo: Callable[[str], None] = log.info
) -> list[IngestResult]:
    """Ingest every entry of :func:`plan` in order; absent real-data files are skipped."""
    results = []
    for e in plan(catalog):
        if e["missing"]:
            echo(f"skip {e['format']}: {e['path']} not found")
            continue
        res = run(
            catalog, e["format"], e["resolved"], dataset_id=e.get("dataset"), strict=strict,
            **(e.get("options") or {}),
        )
        echo(res.summary())
        results.append(res)
    return results


if __name__ == "__main__":  # pragma: no cover
    from cli.main import run_stage

    run_stage("ingest")
