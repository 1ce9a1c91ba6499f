"""Stage ``ingest``: map public formats and user data into the foundation tables.

``run`` ingests one file with one adapter; ``run_all`` ingests what ``params.yaml`` lists
under ``ingest:`` (the demo's synthetic data and, where present, the public metadata).

Run as ``medlake ingest FORMAT PATH`` or ``python -m medlake.pipelines.ingest FORMAT PATH``.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

from dataclasses import dataclass

from medlake.catalog import Catalog, CatalogError, IngestResult, Workspace
from medlake.catalog.params import param, to_dict
from medlake.pipelines import adapters
from medlake.pipelines.stage import Stage, UsageProblem

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
    if dataset_id:  # before reading anything (publish checks every id again)
        from medlake.catalog.ingestkit import check_dataset_id

        check_dataset_id(dataset_id, where="--dataset")
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
    entries = [{k: v for k, v in e.items() if v not in (None, {})}
               for e in to_dict(DECLARATION.load_params(catalog).entries)]
    real = catalog.ws.real_data_dir()
    out = []
    from medlake.catalog.recipes import RecipeError, resolve_path

    for i, e in enumerate(entries):
        raw = str(e["path"])
        try:  # confined to the workspace and real_data; a missing file is only skipped
            p = resolve_path(raw, ws_root=catalog.ws.root, real_data=real,
                             key=f"{catalog.ws.params_file.name}: ingest[{i}].path")
        except RecipeError as err:
            if "file not found" not in str(err) and "not available" not in str(err):
                raise CatalogError(str(err)) from None
            p = None
        out.append({**e, "resolved": p, "missing": p is None or not p.exists()})
    return out


def run_all(
    catalog: Catalog,
    *,
    strict: bool = False,
    echo: Callable[[str], None] = log.info,
    processes: int | None = None,
) -> list[IngestResult]:
    """Ingest every entry of :func:`plan`; absent real-data files are skipped.

    Entries of different datasets are independent, so they run in a pool of ``processes``
    worker processes (default: one per CPU; 1 runs everything in this process). Entries of
    one dataset (a linked label file such as ``nih-bbox`` and the ``nih-cxr14`` file whose
    images it labels) run in plan order in the same worker. Each entry publishes its tables
    in its own transaction, as a sequential run does; the largest inputs start first.

    Returns
    -------
    list of IngestResult
        In plan order; the summaries are echoed in plan order too.

    Raises
    ------
    CatalogError
        The first failing entry in plan order (entries not started yet are cancelled; those
        already running finish and publish, as earlier entries of a sequential run do).
    """
    todo = []
    for e in plan(catalog):
        if e["missing"]:
            echo(f"skip {e['format']}: {e['path']} not found")
        else:
            todo.append(e)
    groups = _groups(todo)
    n = min(processes or os.cpu_count() or 1, len(groups))
    if n <= 1:  # entry by entry, each summary echoed as soon as it is done
        return _collect([(i, 0) for i in range(len(todo))],
                        lambda i: _run_group(catalog.ws, [todo[i]], strict), echo)
    slots = [(gi, pos) for e in todo for gi, g in enumerate(groups) for pos, x in enumerate(g)
             if x is e]
    # the largest inputs first, so the long ones do not start last (LPT order)
    order = sorted(range(len(groups)), key=lambda i: -sum(_size(e) for e in groups[i]))
    with ProcessPoolExecutor(max_workers=n, mp_context=_context()) as pool:
        futs = {i: pool.submit(_run_group, catalog.ws, groups[i], strict) for i in order}
        try:
            return _collect(slots, lambda gi: futs[gi].result(), echo)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


GroupOut = tuple[list[IngestResult], BaseException | None]


def _groups(entries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Plan entries grouped by dataset id (plan order kept inside a group and between groups)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        ds = e.get("dataset") or adapters.get(e["format"]).dataset_id
        groups.setdefault(ds, []).append(e)
    return list(groups.values())


def _run_group(ws: Workspace, entries: list[dict[str, Any]], strict: bool) -> GroupOut:
    """Run one group's entries in order (in a worker process or this one); stop at an error."""
    catalog = Catalog(ws)
    done: list[IngestResult] = []
    for e in entries:
        try:
            done.append(run(catalog, e["format"], e["resolved"], dataset_id=e.get("dataset"),
                            strict=strict, **(e.get("options") or {})))
        except Exception as exc:  # noqa: BLE001 - handed to the parent, raised in plan order
            return done, exc
    return done, None


def _collect(
    slots: list[tuple[int, int]], get: Callable[[int], GroupOut], echo: Callable[[str], None]
) -> list[IngestResult]:
    """Results in plan order: ``slots[k]`` is (group, position in group) of plan entry k."""
    results = []
    for gi, pos in slots:
        done, exc = get(gi)
        if pos >= len(done):  # this entry failed (later entries of its group never ran)
            assert exc is not None
            raise exc
        echo(done[pos].summary())
        results.append(done[pos])
    return results


def _size(entry: dict[str, Any]) -> int:
    try:
        return Path(entry["resolved"]).stat().st_size
    except OSError:
        return 0


def _context() -> BaseContext:
    """Workers forked from a fork server: a fresh interpreter that imported medlake once.

    Forking this process instead could hang a worker (Polars' and the transaction writer's
    thread pools may hold locks here); spawning would import everything once per worker.
    ``pyarrow.compute`` (loaded by the first cast in ``conform``) is preloaded too.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["medlake.pipelines.ingest", "pyarrow.compute"])
    return ctx




@dataclass(frozen=True)
class Entry:
    """One input file of ``medlake ingest --all``."""

    format: str = param(help="input format ('medlake ingest --list')")
    path: str = param(help="relative to the workspace, or to real_data with 'real:'")
    dataset: str | None = param(None, "dataset id instead of the format's default")
    options: dict[str, Any] = param(factory=dict, help="adapter options (as -o KEY=VALUE)")


@dataclass(frozen=True)
class Params:
    """``params.yaml: ingest``: a list of entries (the block is a YAML list)."""

    entries: list[Entry] = param(factory=list, help="what 'medlake ingest --all' ingests, in order")


@dataclass(frozen=True)
class IngestRun:
    """What one ``medlake ingest`` call did."""

    results: tuple[IngestResult, ...] = ()
    text: str = ""

    def summary(self) -> str:
        return self.text or "\n".join(r.summary() for r in self.results)


def run_stage(catalog: Catalog, params: Params | list | None = None, *, fmt: str | None = None,
              path: Path | None = None, dataset_id: str | None = None, strict: bool = False,
              all_: bool = False, list_: bool = False, opts: tuple[str, ...] = (),
              echo: Callable[[str], None] = log.info) -> IngestRun:
    """The stage's entry (``medlake ingest``).

    ``--all`` ingests every entry of ``params.yaml: ingest`` (the pipeline's stage);
    ``FORMAT PATH`` ingests one file and records it as an entry of ``params.yaml: ingest``
    (and in the pipeline), so ``dvc repro`` reproduces what was done by hand.
    """
    if list_:
        return IngestRun(text="\n".join(
            f"{name:22s} {ad.description}" + (f" (labels images of '{ad.links_to}')"
                                               if ad.links_to else "")
            for name, ad in adapters.registry().items()))
    if all_ and (fmt or path):
        raise UsageProblem("Use either --all or FORMAT PATH, not both")
    if all_:
        if isinstance(params, list):
            params = {"entries": params}
        DECLARATION.load_params(catalog, params)  # validated before anything runs
        run_all(catalog, strict=strict, echo=echo)
        return IngestRun(text="ingest: done")
    if not fmt or not path:
        raise UsageProblem("Give FORMAT and PATH (or --all); 'medlake ingest --list' shows formats")
    options: dict[str, Any] = {}
    for o in opts:
        if "=" not in o:
            raise UsageProblem(f"--option '{o}' must look like KEY=VALUE")
        k, v = o.split("=", 1)
        k = k.strip()
        # a repeated key (-o label=a:... -o label=b:...) collects its values in a list
        options[k] = ([*(options[k] if isinstance(options[k], list) else [options[k]]), v]
                      if k in options else v)
    from medlake.pipelines import workspace_pipeline as wp

    entry = wp.ingest_entry(catalog.ws, fmt, Path(path), dataset_id, options, echo=echo)
    res = run(catalog, fmt, wp.entry_path(catalog.ws, entry), dataset_id=dataset_id,
              strict=strict, **options)
    wp.record_ingest(catalog.ws, entry, echo=echo)  # only once it ingested
    wp.refresh(catalog.ws, echo=echo)
    return IngestRun((res,))


def _options() -> tuple[Any, ...]:
    import click

    return (
        click.argument("fmt", metavar="FORMAT", required=False),
        click.argument("path", required=False, type=click.Path(path_type=Path)),
        click.option("--dataset", "dataset_id", help="Dataset id instead of the format's default."),
        click.option("--strict", is_flag=True, help="Stop at the first bad row instead of "
                     "quarantining it."),
        click.option("--all", "all_", is_flag=True, help="Ingest every entry under 'ingest:' in "
                     "params.yaml (what the pipeline runs)."),
        click.option("--list", "list_", is_flag=True, help="List the known formats and exit."),
        click.option("--option", "-o", "opts", multiple=True, metavar="KEY=VALUE",
                     help="Adapter option, repeatable (e.g. -o mapping=ids.csv)."),
    )


DECLARATION = Stage(
    name="ingest", params=Params, run=run_stage,
    writes=("datasets", "images", "sources", "annotations", "coverage", "splits", "findings",
            "versions", "quarantine"),
    help="Ingest PATH in FORMAT into the workspace's tables (or --all: every params.yaml entry).\n\n"
         "Rows that cannot be ingested go to the quarantine table with a reason (or, with "
         "--strict, stop the command at the first one). Re-ingesting the same file replaces "
         "its rows, so the tables come out identical. FORMAT PATH is recorded under 'ingest:' "
         "in params.yaml, so 'dvc repro' does the same.",
    options=_options(), dvc_args="--all", extra_params=("real_data",), list_field="entries",
    example="medlake ingest ham10000 data/HAM10000_metadata.csv",
)


if __name__ == "__main__":  # pragma: no cover
    from medlake.cli.main import run_stage

    run_stage("ingest")
