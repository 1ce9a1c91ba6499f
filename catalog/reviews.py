"""Review verdicts: an append-only table that survives restarts and concurrent writers.

Storage scheme
--------------
Every call of :func:`record` writes **one new Parquet file** (one verdict batch) under
``lake/tables/reviews/ui/`` with a unique name (``<time ns>-<pid>-<random>.parquet``), via
a temporary file and an atomic rename. Nothing is ever rewritten in place, so

* a verdict is durable the moment ``record`` returns (the file is fsynced, then renamed);
* two reviewers (or two server processes) never overwrite each other: they never write
  the same file, and a reader sees a file either whole or not at all;
* a pipeline stage writing other tables at the same time touches other folders only.

A reviewer can change their mind: a new verdict on the same item is a new row, the
history stays, and :func:`latest` picks the newest row per (item, reviewer) — or per item.
``review_id`` sorts by time (it starts with the nanosecond clock), which breaks ties.

Many small files slow reading down, so :func:`compact` merges them into one file. It is
safe to run while others record: it only merges files that exist when it starts, and the
merged file and the removal of the originals are one commit (``catalog.tables.Transaction``),
so readers, and a compaction killed at any moment, see the originals or the merged file,
never both (readers still drop a duplicate ``review_id``, should one appear).

Kinds and verdicts
------------------
``pair``  (item ``<image_a>|<image_b>``, images sorted): duplicate, unclear, different.
``label`` (item ``<image_id>|<source_id>|<finding>``): correct, wrong, unsure.
``image`` (item ``<image_id>``): ok, outlier, unsure.
"""

from __future__ import annotations

import fcntl
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from medlake.catalog.errors import CatalogError
from medlake.catalog.schema import spec
from medlake.catalog.tables import (
    TableStore,
    Transaction,
    conform,
    scan_sql,
    write_parquet_atomic,
)

TABLE = "reviews"
STAGE = "ui"

VERDICTS: dict[str, tuple[str, ...]] = {
    "pair": ("duplicate", "unclear", "different"),
    "label": ("correct", "wrong", "unsure"),
    "image": ("ok", "outlier", "unsure"),
}


# ``Verdict.identity``: how the UI knew the reviewer. 'typed' (a loopback server, the name
# typed in the sidebar), 'insecure-open' (typed on an open address), 'proxy-header:<NAME>'
# (request header NAME set by an authenticating reverse proxy); None: not recorded.
IDENTITY_MODES = ("typed", "insecure-open", "proxy-header:<NAME>")


def valid_identity(identity: str | None) -> bool:
    """Whether ``identity`` is None or one of :data:`IDENTITY_MODES`."""
    if identity is None or identity in ("typed", "insecure-open"):
        return True
    name = identity.removeprefix("proxy-header:")
    return (name != identity and bool(name)
            and all(c.isascii() and (c.isalnum() or c == "-") for c in name))


class ReviewError(CatalogError):
    """A verdict that cannot be recorded (unknown kind or verdict, no reviewer name)."""


@dataclass(frozen=True)
class Verdict:
    """One verdict to record. Build with :func:`pair_verdict` or :func:`label_verdict`."""

    kind: str
    item: str
    verdict: str
    reviewer: str
    rule: str | None = None
    note: str | None = None
    image_id: str | None = None
    image_b: str | None = None
    source_id: str | None = None
    finding: str | None = None
    label: str | None = None
    label_shown: bool | None = None
    session: str | None = None
    identity: str | None = None  # how the reviewer was identified (:data:`IDENTITY_MODES`)


def pair_item(image_a: str, image_b: str) -> str:
    """The item key of an image pair (order-independent)."""
    a, b = sorted((image_a, image_b))
    return f"{a}|{b}"


def pair_verdict(image_a: str, image_b: str, verdict: str, reviewer: str, **kw: Any) -> Verdict:
    """A verdict on a candidate duplicate pair (duplicate, unclear or different)."""
    a, b = sorted((image_a, image_b))
    return Verdict("pair", pair_item(a, b), verdict, reviewer, image_id=a, image_b=b, **kw)


def label_item(image_id: str, source_id: str, finding: str) -> str:
    """The item key of one source's label of one image."""
    return f"{image_id}|{source_id}|{finding}"


def label_verdict(
    image_id: str, source_id: str, finding: str, verdict: str, reviewer: str, **kw: Any
) -> Verdict:
    """A verdict on one source's label of one image (correct, wrong or unsure)."""
    item = label_item(image_id, source_id, finding)
    return Verdict("label", item, verdict, reviewer, image_id=image_id, source_id=source_id,
                   finding=finding, **kw)


def image_verdict(image_id: str, verdict: str, reviewer: str, **kw: Any) -> Verdict:
    """A verdict on one image as a whole (ok, outlier or unsure), e.g. from the outliers page."""
    return Verdict("image", image_id, verdict, reviewer, image_id=image_id, **kw)


def _check(v: Verdict) -> None:
    if v.kind not in VERDICTS:
        raise ReviewError(f"unknown review kind '{v.kind}'; use one of {sorted(VERDICTS)}")
    if v.verdict not in VERDICTS[v.kind]:
        raise ReviewError(
            f"'{v.verdict}' is not a verdict for a {v.kind} (item {v.item}); "
            f"use one of {list(VERDICTS[v.kind])}"
        )
    if not (v.reviewer or "").strip():
        raise ReviewError(f"verdict on {v.item}: no reviewer name; enter your name first")
    if not (v.item or "").strip():
        raise ReviewError("a verdict needs an item (the image, pair or label it is about)")
    if not valid_identity(v.identity):
        raise ReviewError(f"verdict on {v.item}: identity '{v.identity}' is not one of "
                          f"{list(IDENTITY_MODES)} (or None)")


def folder(catalog: Any) -> Path:
    """``lake/tables/reviews/ui``: where verdict files go."""
    return catalog.ws.tables_dir / TABLE / STAGE


def record(catalog: Any, verdicts: Verdict | Iterable[Verdict]) -> int:
    """Store verdicts durably as one new file; return the number of rows written.

    Parameters
    ----------
    catalog
        The workspace's :class:`catalog.Catalog`.
    verdicts
        One :class:`Verdict` or several (stored together, all or none).

    Raises
    ------
    ReviewError
        An unknown kind or verdict, or a verdict without a reviewer; nothing is written.

    Example
    -------
    >>> record(cat, pair_verdict("d:1", "d:2", "different", "ana"))  # doctest: +SKIP
    1
    """
    batch = [verdicts] if isinstance(verdicts, Verdict) else list(verdicts)
    if not batch:
        return 0
    for v in batch:
        _check(v)
    now = datetime.now(UTC)
    rows = []
    for v in batch:
        row = {k: getattr(v, k) for k in Verdict.__dataclass_fields__}
        # time first so ids sort by time; pid + random so concurrent writers never collide
        row["review_id"] = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        row["created_at"] = now
        rows.append(row)
    at = conform(TABLE, pl.DataFrame(rows, infer_schema_length=None).to_arrow())
    name = rows[0]["review_id"] + ".parquet"
    write_parquet_atomic(at, folder(catalog) / name)
    return len(rows)


def read(catalog: Any, *, where: str | None = None) -> pl.DataFrame:
    """Every verdict ever recorded (the full history), oldest first.

    ``where`` is a trusted SQL filter (library code only).
    """
    files = catalog.tables.files(TABLE)
    if not files:
        empty = pl.from_arrow(spec(TABLE).schema.empty_table())
        assert isinstance(empty, pl.DataFrame)
        return empty
    con = duckdb.connect()
    try:
        for _ in range(3):  # a compaction may remove a file between listing and reading
            sql = f"SELECT DISTINCT ON (review_id) * FROM {scan_sql(files)}"
            if where:
                sql += f" WHERE {where}"
            try:
                at = con.sql(sql).to_arrow_table()
                break
            except duckdb.IOException:
                files = catalog.tables.files(TABLE)
        else:  # pragma: no cover - needs a compaction during every retry
            raise CatalogError("the reviews table changed while being read three times; try again")
    finally:
        con.close()
    df = pl.from_arrow(at)
    assert isinstance(df, pl.DataFrame)
    # files written before a column existed (e.g. identity) read as null in it
    declared = pl.from_arrow(spec(TABLE).schema.empty_table())
    assert isinstance(declared, pl.DataFrame)
    missing = [pl.lit(None, dtype=declared.schema[c]).alias(c)
               for c in declared.columns if c not in df.columns]
    return (df.with_columns(missing) if missing else df).sort("review_id")


def latest(
    catalog: Any, *, kind: str | None = None, per_reviewer: bool = True,
    reviews: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """The verdict that counts: the newest per (item, reviewer), or per item.

    Parameters
    ----------
    kind
        Only this kind (``pair``, ``label``, ``image``).
    per_reviewer
        True: one row per item and reviewer (for reviewer-vs-reviewer agreement);
        False: one row per item, the newest of any reviewer.
    reviews
        Use this history instead of reading the table.
    """
    df = read(catalog) if reviews is None else reviews
    if kind is not None:
        df = df.filter(pl.col("kind") == kind)
    keys = ["item", "reviewer"] if per_reviewer else ["item"]
    return df.sort("review_id").unique(subset=keys, keep="last", maintain_order=True)


def compact(catalog: Any) -> int:
    """Merge the verdict files into one (history unchanged); return files merged.

    Only one compaction runs at a time (a lock file); recording goes on meanwhile.
    """
    base = folder(catalog)
    if not base.exists():
        return 0
    with open(base / ".compact.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store = TableStore(catalog.ws.tables_dir)
        files = store.files(TABLE, stage=STAGE)  # an interrupted compaction is finished first
        if len(files) < 2:
            return 0
        con = duckdb.connect()
        try:
            at = con.sql(
                f"SELECT DISTINCT ON (review_id) * FROM {scan_sql(files)} ORDER BY review_id"
            ).to_arrow_table()
        finally:
            con.close()
        last = files[-1].stem
        # one commit: the merged file appears and the originals go together, so a reader (or
        # a kill at any moment) sees either the originals or the merged file, never both
        with Transaction(store) as tx:
            merged = tx.write(TABLE, at, stage=STAGE, partition=f"{last}-merged")
            for p in files:
                if p != merged:
                    tx.delete_file(p)
    return len(files)


def ppv_by_class(catalog: Any, *, source_id: str | None = None,
                 reviews: pl.DataFrame | None = None) -> pl.DataFrame:
    """PPV of positive labels per finding from label verdicts, with a 95% Wilson interval.

    The latest verdict per item counts (any reviewer); ``correct`` is a true positive,
    ``wrong`` a false positive, ``unsure`` is left out of the proportion (counted apart).

    Returns
    -------
    polars.DataFrame
        ``source_id, finding, n_correct, n_wrong, n_unsure, n, ppv, ppv_lo, ppv_hi``.
    """
    from medlake.catalog.stats import wilson

    df = latest(catalog, kind="label", per_reviewer=False, reviews=reviews)
    if source_id is not None:
        df = df.filter(pl.col("source_id") == source_id)
    g = df.group_by("source_id", "finding").agg(
        (pl.col("verdict") == "correct").sum().alias("n_correct"),
        (pl.col("verdict") == "wrong").sum().alias("n_wrong"),
        (pl.col("verdict") == "unsure").sum().alias("n_unsure"),
    ).with_columns((pl.col("n_correct") + pl.col("n_wrong")).alias("n")).sort(
        "source_id", "finding"
    )
    p, lo, hi = wilson(g["n_correct"].to_numpy(), g["n"].to_numpy())
    return g.with_columns(pl.Series("ppv", p), pl.Series("ppv_lo", lo), pl.Series("ppv_hi", hi))


def reviewer_kappa(catalog: Any, *, kind: str = "label",
                   reviews: pl.DataFrame | None = None) -> pl.DataFrame:
    """Cohen's kappa between every two reviewers on the items both judged (latest verdicts).

    Returns
    -------
    polars.DataFrame
        ``reviewer_a, reviewer_b, n_shared, observed, kappa, kappa_lo, kappa_hi``; kappa is
        NaN when it is undefined (e.g. both gave one verdict to everything).
    """
    from medlake.catalog.stats import cohen_kappa

    df = latest(catalog, kind=kind, per_reviewer=True, reviews=reviews).select(
        "item", "reviewer", "verdict"
    )
    names = sorted(df["reviewer"].unique().to_list())
    cats = list(VERDICTS.get(kind, ()))
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            j = df.filter(pl.col("reviewer") == a).join(
                df.filter(pl.col("reviewer") == b), on="item", suffix="_b"
            ).sort("item")
            if j.height == 0:
                continue
            k = cohen_kappa(j["verdict"].to_numpy(), j["verdict_b"].to_numpy(),
                            labels=sorted(cats) or None)
            rows.append({"reviewer_a": a, "reviewer_b": b, "n_shared": j.height,
                         "observed": k["observed"], "kappa": k["kappa"], "kappa_lo": k["lo"],
                         "kappa_hi": k["hi"]})
    schema = {"reviewer_a": pl.String, "reviewer_b": pl.String, "n_shared": pl.Int64,
              "observed": pl.Float64, "kappa": pl.Float64, "kappa_lo": pl.Float64,
              "kappa_hi": pl.Float64}
    return pl.DataFrame(rows, schema=schema)
