"""A pipeline stage, declared once.

Each stage module (``pipelines/<name>.py``) ends with one :class:`Stage`: its name, its typed
parameter class (the only place its defaults live), the tables it reads and writes, and its
``run``. Everything else that mentions a stage is derived from these declarations
(:mod:`medlake.pipelines.registry`): the ``medlake <name>`` command and ``python -m``
entry, the ``dvc.yaml`` of every workspace, the default ``params.yaml``, the UI's hints and
the stage table in docs/ARCHITECTURE.md.

Calling convention: ``run(catalog, params, **options) -> result``; ``params`` is an instance
of the stage's parameter class, a mapping validated into one, or None (``params.yaml``'s
block); the result has ``summary() -> str``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from medlake.catalog import Catalog, CatalogError
from medlake.catalog.params import ParamsError, load, to_dict

class UsageProblem(CatalogError):
    """Options of a stage command that do not go together (the CLI exits 2, as click does)."""


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    Attributes
    ----------
    name
        Stage, command and ``params.yaml`` block name.
    params
        Frozen dataclass of the block (None: the stage has no block).
    run
        ``run(catalog, params, **options) -> result`` with ``result.summary()``.
    reads, writes
        Table names (``catalog.schema.TABLES``). A written table is the DVC output
        ``lake/tables/<table>/<name>``; a read table is a dependency on every earlier
        stage's folder of that table.
    help
        The command's help text (first line: one sentence).
    options
        Extra click parameters of the command (passed to ``run`` by name).
    dvc_args
        Arguments the pipeline's ``cmd`` adds after ``medlake <name>``.
    foreach
        ``"recipes"``: one DVC stage per recipe (``materialize``); the command gets the
        recipe name as its argument.
    extra_params
        Other params keys the stage's results depend on (e.g. ``real_data``).
    list_field
        The block is a YAML list, held in this field of ``params`` (``ingest``).
    check_block
        ``check_block(raw, file=...)`` validates a block that has keys beyond ``params``.
    example
        One example command line for ``--help``.
    """

    name: str
    params: type | None
    run: Callable[..., Any]
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    help: str = ""
    options: tuple[Callable[[Any], Any], ...] = ()
    dvc_args: str = ""
    foreach: str | None = None
    extra_params: tuple[str, ...] = ()
    example: str = ""
    list_field: str | None = None
    check_block: Callable[..., Any] | None = None
    summary: Callable[[Any], str] | None = None
    module: str = field(default="", compare=False)

    def ensure_outputs(self, catalog: Catalog) -> list[str]:
        """Write an empty ``empty`` partition for each table the stage declares but wrote no
        file of (e.g. no quarantined row, a metadata-only dataset), so every DVC output of
        the stage exists; returns those tables. Readers see zero rows from it."""
        from medlake.catalog import spec

        if self.foreach:
            return []
        made = []
        for t in self.writes:
            if not catalog.tables.files(t, stage=self.name):
                catalog.write(t, spec(t).schema.empty_table(), stage=self.name, partition="empty")
                made.append(t)
        return made

    def wrap(self, raw: Any) -> Any:
        """The block as a mapping: a list block (``ingest:``) becomes ``{list_field: raw}``."""
        if self.list_field and (raw is None or isinstance(raw, list)):
            return {self.list_field: raw or []}
        return raw

    def unwrap(self, inst: Any) -> Any:
        """Plain YAML value of a params instance (a list for a list block)."""
        plain = to_dict(inst)
        return plain[self.list_field] if self.list_field else plain

    def load_params(self, catalog: Catalog | None, params: Any = None,
                    overrides: Mapping[str, Any] | None = None) -> Any:
        """The stage's validated params: ``params`` (instance or mapping) or the workspace's
        ``params.yaml`` block, with ``overrides`` (e.g. command-line flags) applied."""
        if self.params is None:
            return None
        if self.check_block is not None:  # a block with keys validated by their own modules
            if isinstance(params, self.params):
                params = to_dict(params)
            raw = (catalog.ws.params().get(self.name) if catalog is not None else None) \
                if params is None else params
            over = {k: v for k, v in (overrides or {}).items() if v is not None}
            file = catalog.ws.params_file.name if catalog is not None else "params.yaml"
            return self.check_block({**(raw or {}), **over}, file=file)
        if params is None:
            raw = catalog.ws.params().get(self.name) if catalog is not None else None
            base = load(self.params, self.wrap(raw), file=catalog.ws.params_file.name if catalog else
                        "params.yaml", key=self.name)
        elif isinstance(params, self.params):
            base = params
        elif isinstance(params, (Mapping, list)):
            base = load(self.params, self.wrap(params), file="params", key=self.name)
        else:
            raise ParamsError(f"{self.name}: params must be a {self.params.__name__} or a "
                              f"mapping, not {type(params).__name__}")
        over = {k: v for k, v in (overrides or {}).items() if v is not None}
        if not over:
            return base
        return load(self.params, {**to_dict(base), **over}, file="command line", key=self.name)


@dataclass(frozen=True)
class Counts:
    """A stage result that is a set of counts plus a one-line summary.

    Indexing reads a count (``res["verified"]``), so scripts that used the old dict results
    keep working.
    """

    stage: str
    counts: Mapping[str, Any]
    text: str = ""

    def __getitem__(self, key: str) -> Any:
        return self.counts[key]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self.counts) == dict(other)
        if isinstance(other, Counts):
            return dict(self.counts) == dict(other.counts) and self.stage == other.stage
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def get(self, key: str, default: Any = None) -> Any:
        return self.counts.get(key, default)

    def keys(self) -> Any:
        return self.counts.keys()

    def summary(self) -> str:
        return self.text or f"{self.stage}: " + ", ".join(
            f"{v:,} {k}" if isinstance(v, int) else f"{k} {v}" for k, v in self.counts.items())
