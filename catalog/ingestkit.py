"""Building blocks shared by every ingest adapter: quarantine, counts, publishing.

An adapter turns one input file (or folder) into the foundation tables for one dataset, then
calls :func:`publish`, which checks ``rows read = rows ingested + rows quarantined`` per file,
writes every table partition in one transaction and returns an :class:`IngestResult`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from medlake.catalog.errors import IngestError, SchemaError

STAGE = "ingest"
# code_map key describing the rows an implicit-negative source leaves out
ABSENT = "(absent)"

#: Dataset ids: 1-64 characters from ``a-z 0-9 . _ -``, first and last a letter or digit, and
#: no ``--`` (it separates a dataset from a format in partition names, ``<dataset>--<format>``).
#: Such an id is its own file name on every file system (no case folding, no character
#: mapping), so two datasets can never share a partition file.
DATASET_ID_PATTERN = r"[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?"
DATASET_ID_RULE = (
    "1-64 characters from a-z, 0-9, '.', '_', '-', starting and ending with a letter or "
    "digit, without '--'"
)
_DATASET_ID = re.compile(DATASET_ID_PATTERN)
#: The longest native (per-dataset) image id ingest accepts, in characters; longer ids go
#: to the quarantine (reason ``id longer than 512 characters``).
MAX_ID_LENGTH = 512


def check_dataset_id(dataset_id: Any, *, where: str = "dataset id") -> str:
    """Return ``dataset_id`` when it matches :data:`DATASET_ID_PATTERN`, else raise.

    Parameters
    ----------
    dataset_id
        The id to check (from an adapter, ``--dataset`` or a generic YAML's ``dataset``).
    where
        Where the id came from, for the message (e.g. ``"data.yaml: dataset"``).

    Raises
    ------
    SchemaError
        Naming the id, the allowed character set and a close valid id.

    Example
    -------
    >>> check_dataset_id("nih-cxr14")
    'nih-cxr14'
    """
    text = dataset_id if isinstance(dataset_id, str) else str(dataset_id)
    if isinstance(dataset_id, str) and _DATASET_ID.fullmatch(text) and "--" not in text:
        return text
    hint = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9._-]+", "-", text.lower())).strip("._-")[:64]
    hint = hint.rstrip("._-")
    raise SchemaError(
        f"{where} {text[:80]!r}{'...' if len(text) > 80 else ''} is not a valid dataset id: "
        f"use {DATASET_ID_RULE} (pattern {DATASET_ID_PATTERN})"
        + (f", e.g. '{hint}'" if hint and _DATASET_ID.fullmatch(hint) else "")
    )


def storage_key(name: str) -> str:
    """The name a dataset or partition has on disk, case-folded (for collision checks)."""
    from medlake.catalog.tables import safe_name

    try:
        return safe_name(name).lower()
    except ValueError:
        return name.lower()


def check_storage(catalog: Any, dataset_id: str, partition: str) -> None:
    """Refuse a write that would share a partition file with another dataset.

    Two names collide when they map to the same file name (``safe_name``) or differ only
    in case (case-insensitive file systems). Checked against the ``datasets`` table and the
    dataset ids already stored in the ``images`` / ``datasets`` partition being replaced,
    so a lake written before dataset ids were validated is protected too.

    Raises
    ------
    SchemaError
        Naming both datasets and what to do.
    """
    from medlake.catalog.tables import safe_name

    if safe_name(partition) != partition:
        raise SchemaError(
            f"partition name '{partition}' of dataset '{dataset_id}' is not a valid file name "
            f"(it would be stored as '{safe_name(partition)}'); dataset ids must be "
            f"{DATASET_ID_RULE}"
        )
    key = storage_key(dataset_id)
    others = set(catalog.read("datasets", columns=["dataset_id"])["dataset_id"].drop_nulls().to_list())
    for table in ("datasets", "images"):
        f = catalog.tables.path(table, STAGE, partition)
        if f.is_file():
            others |= set(pl.read_parquet(f, columns=["dataset_id"])["dataset_id"].drop_nulls().unique().to_list())
    clash = sorted(o for o in others if o != dataset_id and storage_key(o) == key)
    if clash:
        raise SchemaError(
            f"dataset '{dataset_id}' would be stored under the same name as the existing "
            f"dataset '{clash[0]}' (partition '{partition}'), and ingesting it would erase "
            f"that dataset's tables; choose another id with --dataset (or 'dataset:' in the "
            f"YAML), or remove '{clash[0]}' first"
        )


@dataclass(frozen=True)
class FileReport:
    """Counts for one input file. ``rows_read == rows_ingested + rows_quarantined`` always."""

    file: str
    rows_read: int
    rows_ingested: int
    rows_quarantined: int

    def __post_init__(self) -> None:
        if self.rows_read != self.rows_ingested + self.rows_quarantined:
            raise RuntimeError(
                f"{self.file}: {self.rows_read} rows read but {self.rows_ingested} ingested + "
                f"{self.rows_quarantined} quarantined; an adapter lost rows (a medlake bug)"
            )


@dataclass(frozen=True)
class IngestResult:
    """What one adapter run did. ``tables`` maps table name to rows written."""

    adapter: str
    dataset_id: str
    partition: str
    files: tuple[FileReport, ...]
    tables: dict[str, int]
    reasons: dict[str, int]
    messages: tuple[str, ...] = ()

    @property
    def rows_read(self) -> int:
        return sum(f.rows_read for f in self.files)

    @property
    def rows_quarantined(self) -> int:
        return sum(f.rows_quarantined for f in self.files)

    def summary(self) -> str:
        lines = []
        for f in self.files:
            lines.append(
                f"{f.file}: {f.rows_read:,} rows read = {f.rows_ingested:,} ingested + "
                f"{f.rows_quarantined:,} quarantined"
            )
        for reason, n in sorted(self.reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"  quarantined {n:,}: {reason}")
        t = ", ".join(f"{k} {v:,}" for k, v in self.tables.items())
        lines.append(f"dataset '{self.dataset_id}' ({self.adapter}): wrote {t}")
        lines.extend(self.messages)
        return "\n".join(lines)


QUARANTINE_COLUMNS = ("row", "item", "reason", "detail")


@dataclass
class Quarantine:
    """Collects rows that are not ingested, with why; raises at the first one in strict mode.

    ``row`` is the 1-based data row number in the file (the header is not counted) or, for
    image files, 0 with the file path in ``item``.
    """

    dataset_id: str
    strict: bool = False
    stage: str = STAGE
    _frames: list[pl.DataFrame] = field(default_factory=list)

    def add(self, file: str, row: int, item: str | None, reason: str, detail: Any = None) -> None:
        self.add_frame(
            file,
            pl.DataFrame(
                {"row": [row], "item": [item], "reason": [reason],
                 "detail": [detail if isinstance(detail, str) or detail is None else json.dumps(detail, default=str)]},
                schema={"row": pl.Int64, "item": pl.String, "reason": pl.String, "detail": pl.String},
            ),
        )

    def add_frame(self, file: str, df: pl.DataFrame, *, total: int | None = None) -> None:
        """Quarantine many rows: ``df`` has columns row, item, reason[, detail]."""
        if df.height == 0:
            return
        if "detail" not in df.columns:
            df = df.with_columns(pl.lit(None, pl.String).alias("detail"))
        df = df.select(
            pl.col("row").cast(pl.Int64), pl.col("item").cast(pl.String),
            pl.col("reason").cast(pl.String), pl.col("detail").cast(pl.String),
        )
        if self.strict:
            first = df.sort("row").row(0, named=True)
            of = f" of {total:,}" if total is not None else ""
            raise IngestError(
                f"{file}: row {first['row']}{of}: {first['reason']}"
                + (f" ({first['item']})" if first["item"] else "")
                + f"; {df.height:,} bad rows in all. Stopped because of --strict; "
                "without it they go to the quarantine table and the rest is ingested."
            )
        self._frames.append(
            df.with_columns(
                pl.lit(self.stage).alias("stage"), pl.lit(self.dataset_id).alias("dataset_id"),
                pl.lit(file).alias("file"),
            )
        )

    def count(self, file: str | None = None) -> int:
        return sum(
            f.height if file is None else f.filter(pl.col("file") == file).height
            for f in self._frames
        )

    def frame(self) -> pl.DataFrame:
        cols = ["stage", "dataset_id", "file", "row", "item", "reason", "detail"]
        if not self._frames:
            return pl.DataFrame(schema={c: (pl.Int64 if c == "row" else pl.String) for c in cols})
        return pl.concat([f.select(cols) for f in self._frames]).unique(
            subset=["file", "row", "item", "reason"], keep="first", maintain_order=True
        )

    def reasons(self) -> dict[str, int]:
        df = self.frame()
        if df.height == 0:
            return {}
        g = df.group_by("reason").len().sort("len", descending=True)
        return dict(zip(g["reason"].to_list(), g["len"].to_list()))


def publish(
    catalog: Any,
    *,
    adapter: str,
    dataset_id: str,
    partition: str,
    tables: dict[str, Any],
    quarantine: Quarantine,
    files: list[FileReport],
    messages: list[str] | None = None,
) -> IngestResult:
    """Write an adapter's tables (and its quarantine rows) as one atomic transaction.

    Every table in ``tables`` replaces the partition ``partition`` of the ingest stage, and the
    quarantine partition of the same name is replaced too (emptied when nothing was bad), so
    re-ingesting the same input gives identical files.

    Raises
    ------
    SchemaError
        ``dataset_id`` breaks :data:`DATASET_ID_PATTERN`, or its storage name collides with
        another dataset's (:func:`check_storage`); nothing is written then.
    """
    check_dataset_id(dataset_id)
    check_storage(catalog, dataset_id, partition)
    counts: dict[str, int] = {}
    with catalog.transaction() as tx:
        for name, data in tables.items():
            if data is None:
                continue
            tx.write(name, data, stage=STAGE, partition=partition)
            counts[name] = len(data)
        q = quarantine.frame()
        if q.height:
            tx.write("quarantine", q, stage=STAGE, partition=partition)
        else:
            tx.delete("quarantine", stage=STAGE, partition=partition)
    return IngestResult(
        adapter=adapter, dataset_id=dataset_id, partition=partition, files=tuple(files),
        tables=counts, reasons=quarantine.reasons(), messages=tuple(messages or ()),
    )


def require_columns(file: str, found: list[str], expected: list[str] | tuple[str, ...]) -> None:
    """Raise a :class:`SchemaError` naming the file, the columns found and those expected."""
    from medlake.catalog.errors import SchemaError

    missing = [c for c in expected if c not in found]
    if missing:
        raise SchemaError(
            f"{file}: missing column(s) {missing}. Found columns: {found}. "
            f"Expected at least: {list(expected)}. Is this the right file for this format?"
        )


def root_versions(
    splits: pl.DataFrame, *, dataset_id: str, inputs: dict[str, str], medlake_version: str
) -> pl.DataFrame:
    """One root ``versions`` row per split scheme in ``splits`` (``<dataset>@<scheme>``).

    Root versions have no parent and no creation time (so re-ingesting gives identical
    tables); ``inputs`` maps input file names to their sha256.
    """
    rows = []
    for scheme in sorted(splits["scheme"].unique().to_list()):
        s = splits.filter(pl.col("scheme") == scheme)
        counts = dict(sorted(zip(*s.group_by("split").len().sort("split").to_dict(as_series=False).values())))
        rows.append({
            "name": f"{dataset_id}@{scheme}", "dataset_id": dataset_id, "parent": None,
            "kind": "root", "scheme": scheme, "recipe": None, "recipe_hash": None,
            "params": None, "inputs": json.dumps(inputs, sort_keys=True), "git_commit": None,
            "medlake_version": medlake_version, "created_at": None, "n_images": s.height,
            "counts": json.dumps({"split": counts}, sort_keys=True), "path": None,
        })
    return pl.DataFrame(rows) if rows else None  # type: ignore[return-value]


def sha256_file(path: Any, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def findings_rows(
    catalog: Any, source_id: str, findings: list[str], value_type: str
) -> list[dict[str, Any]]:
    """``findings`` table rows for one source's vocabulary, mapped through the workspace YAML."""
    ov = catalog.findings_overrides()
    from medlake.catalog.vocab import shared_name

    return [
        {"source_id": source_id, "finding": f, "shared_finding": shared_name(source_id, f, ov),
         "value_type": value_type}
        for f in sorted(set(findings))
    ]
