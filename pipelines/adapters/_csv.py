"""Helpers that adapters share: reading CSVs as strings, row numbers, common checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from medlake.catalog import Catalog, IngestError, Quarantine
from medlake.catalog.ingestkit import require_columns

ROW = "__row"  # 1-based data row number (header not counted)


def read_csv(path: Path, expected: list[str] | tuple[str, ...], **kw: Any) -> pl.DataFrame:
    """Read a CSV (plain or .gz) with every column as text, plus a 1-based ``__row`` column.

    Raises a :class:`SchemaError` naming the file and columns when ``expected`` are missing,
    and an :class:`IngestError` when the file is not readable CSV.
    """
    try:
        df = pl.read_csv(
            path, infer_schema=False, truncate_ragged_lines=False, **kw
        )
    except (pl.exceptions.ComputeError, pl.exceptions.NoDataError, OSError, UnicodeDecodeError) as e:
        raise IngestError(f"{path.name}: cannot be read as CSV ({str(e).splitlines()[0]})") from e
    require_columns(path.name, df.columns, expected)
    return df.with_row_index(ROW, offset=1).with_columns(pl.col(ROW).cast(pl.Int64))


def quarantine_where(
    q: Quarantine, file: str, df: pl.DataFrame, bad: pl.Expr, reason: str | pl.Expr,
    item: str | pl.Expr, *, total: int | None = None,
) -> pl.DataFrame:
    """Move rows matching ``bad`` to the quarantine; return the rest."""
    mask = df.select(bad.fill_null(False).alias("m"))["m"]
    if not mask.any():
        return df
    bad_rows = df.filter(mask)
    reason_e = pl.lit(reason) if isinstance(reason, str) else reason
    item_e = pl.col(item) if isinstance(item, str) else item
    q.add_frame(
        file,
        bad_rows.select(
            pl.col(ROW).alias("row"), item_e.cast(pl.String).alias("item"),
            reason_e.alias("reason"),
        ),
        total=total,
    )
    return df.filter(~mask)


def dedupe(q: Quarantine, file: str, df: pl.DataFrame, key: str, *, total: int) -> pl.DataFrame:
    """Keep the first row of each ``key``; later repeats go to the quarantine."""
    if df.select(pl.col(key).hash().n_unique()).item() == df.height:
        return df  # distinct 64-bit hashes: no repeats (a collision only means the slow check)
    dup = pl.col(key).is_duplicated() & ~pl.col(key).is_first_distinct()
    return quarantine_where(
        q, file, df, dup, pl.lit("duplicate id (first occurrence kept): ") + pl.col(key), key,
        total=total,
    )


def blank(col: str) -> pl.Expr:
    return pl.col(col).is_null() | (pl.col(col).str.strip_chars() == "")


def link_to_images(
    catalog: Catalog, q: Quarantine, file: str, df: pl.DataFrame, *, dataset_id: str,
    native_col: str, total: int,
) -> pl.DataFrame:
    """Attach ``image_id`` by native id; rows naming images not in the dataset are quarantined."""
    known = catalog.image_ids(dataset_id).rename({"image_id": "__image_id"})
    # the native column may itself be called image_id (HAM10000, DermaMNIST): join on a temp name
    df = df.join(known, left_on=native_col, right_on="native_id", how="left", maintain_order="left")
    return quarantine_where(
        q, file, df, pl.col("__image_id").is_null(),
        f"names an image that is not in dataset '{dataset_id}'", native_col, total=total,
    ).with_columns(pl.col("__image_id").alias("image_id")).drop("__image_id")


def meta_json(df: pl.DataFrame, cols: dict[str, str]) -> pl.Expr:
    """A JSON-object text column from ``{json key: column}`` (nulls kept as null)."""
    return pl.struct([pl.col(c).alias(k) for k, c in cols.items()]).struct.json_encode()


def code_map(mapping: dict[str, tuple[float | None, str]]) -> str:
    """``sources.code_map`` text: raw code -> {value, meaning}."""
    return json.dumps(
        {k: {"value": v, "meaning": m} for k, (v, m) in mapping.items()}, sort_keys=True
    )


def stop_if_strict(q: Quarantine, file: str, *, strict: bool, total: int) -> None:
    """With ``strict``, raise an :class:`IngestError` naming the first bad row *in file order*.

    Use with a non-strict :class:`Quarantine` that has seen every check, so the error names
    the earliest bad row and the true number of bad rows (a strict ``Quarantine`` stops at
    the first failing check, which may not hold the earliest row).
    """
    if not strict or not q.count(file):
        return
    bad = q.frame().filter(pl.col("file") == file).sort("row")
    first = bad.row(0, named=True)
    raise IngestError(
        f"{file}: row {first['row']} of {total:,}: {first['reason']}"
        + (f" ({first['item']})" if first["item"] else "")
        + f"; {bad.height:,} bad rows in all. Stopped because of --strict (nothing written); "
        "without it they go to the quarantine table and the rest is ingested."
    )
