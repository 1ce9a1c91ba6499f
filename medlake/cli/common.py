"""What every command shares: ``--workspace``, error handling, the catalog."""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from medlake.catalog import Catalog, CatalogError, Workspace


def workspace_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """Adds ``--workspace DIR`` (default: nearest parent folder holding ``.dvc/``)."""
    return click.option(
        "--workspace", "-w", "workspace",
        type=click.Path(file_okay=False, path_type=Path), default=None,
        help="Workspace folder (default: the nearest parent folder that holds .dvc/).",
    )(f)


def open_catalog(workspace: Path | None) -> Catalog:
    """The workspace's catalog; in a user's workspace ``params.yaml: medlake_version`` is kept
    equal to the installed medlake (the pipeline's code dependency there)."""
    ws = Workspace.find(workspace)
    if (ws.root / "dvc.yaml").exists():
        from medlake.pipelines.workspace_pipeline import set_version

        set_version(ws)
    return Catalog(ws)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Library errors become one-line messages; tracebacks only with ``medlake --verbose``."""
    ctx = click.get_current_context(silent=True)
    verbose = bool(ctx and ctx.find_root().params.get("verbose"))
    try:
        yield
    except CatalogError as e:
        if verbose:
            raise
        raise click.ClickException(str(e)) from e


def command(f: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command body in :func:`user_errors`."""

    @functools.wraps(f)
    def wrapper(*a: Any, **kw: Any) -> Any:
        with user_errors():
            return f(*a, **kw)

    return wrapper


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
