"""Helpers that adapters share: reading CSVs as strings, row numbers, common checks.

Every adapter reads its CSV through :func:`read_csv`, which checks the file before any
adapter-specific rule runs:

* **encoding**: UTF-8 (a UTF-8 byte-order mark is dropped); a file starting with a UTF-16 or
  UTF-32 byte-order mark is decoded as such. Anything else that is not valid UTF-8 (Latin-1,
  Windows-1252, UTF-16 without a byte-order mark) stops the ingest with an
  :class:`IngestError` naming the encoding problem and the line.
* **header**: a column name given twice stops the ingest (:class:`SchemaError` naming the
  file and the column); empty names (``Bbox [x,y,w,h],,,``) may repeat.
* **rows** (to the quarantine, so rows read = ingested + quarantined keeps holding):
  ``blank line``, ``short row: N of M fields``, ``long row: N fields, the header has M``,
  ``control character (0xNN) in COLUMN`` (bytes 0x00-0x08, 0x0B, 0x0C, 0x0E-0x1F, 0x7F; tab,
  line feed and carriage return are allowed) and ``COLUMN longer than 512 characters`` for
  id columns (:data:`medlake.catalog.ingestkit.MAX_ID_LENGTH`).

Numbers go through :func:`parse_number`: NaN and infinity (``1e400``) are not numbers, and
values outside a column's range (ages: :data:`AGE_RANGE`) go to the quarantine.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from medlake.catalog import Catalog, IngestError, Quarantine, SchemaError
from medlake.catalog.ingestkit import MAX_ID_LENGTH, require_columns

ROW = "__row"  # 1-based data row number (header not counted)
#: control bytes refused in any cell (tab, LF and CR are allowed)
CONTROL = r"[\x00-\x08\x0B\x0C\x0E-\x1F\x7F]"
_CONTROL = re.compile(CONTROL)
_CONTROL_CHARS = [chr(b) for b in (*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F)]
_CTRL_PREFIX = "control character in "
#: accepted ages in years, both ends included (wider than any real age, so only sign errors,
#: overflow and unit mistakes are caught; RSNA's DICOM headers hold ages up to 155)
AGE_RANGE = (0.0, 200.0)
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def read_csv(
    path: Path, expected: list[str] | tuple[str, ...], q: Quarantine, *,
    ids: Sequence[str] = (), **kw: Any,
) -> tuple[pl.DataFrame, int]:
    """Read a CSV (plain or .gz) with every column as text, plus a 1-based ``__row`` column.

    Rows that cannot be read faithfully (see the module docstring) go to ``q`` and are left
    out of the frame; the other rows keep their ``__row`` numbers.

    Parameters
    ----------
    path
        The file.
    expected
        Columns that must be present.
    q
        The adapter's quarantine (a strict one raises at the first bad row).
    ids
        Id columns: values longer than ``MAX_ID_LENGTH`` characters are quarantined, and
        the first one names the row in the quarantine's ``item``.
    **kw
        Passed to :func:`polars.read_csv` (e.g. ``columns=[...]`` by name).

    Returns
    -------
    (DataFrame, int)
        The good rows and the number of data rows read (for :class:`FileReport`).

    Raises
    ------
    SchemaError
        ``expected`` columns missing, or a column named twice in the header.
    IngestError
        The file is not readable, not gzip, or not UTF-8 (nor UTF-16/32 with a byte-order
        mark) text.
    """
    name = path.name
    header, codec = _sniff(path)
    data = load_text(path) if codec else None  # UTF-16/32: decoded to UTF-8 first
    counts = None
    src: Path | bytes = path if data is None else data
    try:
        df = _polars_read(src, name, ragged=False, **kw)
    except _Ragged:  # a row longer than the header: count every row's fields, then read
        counts = _field_counts(name, src)
        df = _polars_read(src, name, ragged=True, **kw)
    require_columns(name, df.columns, expected)
    df = df.with_row_index(ROW, offset=1).with_columns(pl.col(ROW).cast(pl.Int64))
    total = df.height
    # a row is short when a column read here lies past its last field; polars reads such
    # cells as null, so rows with the last read column non-null cannot be short
    read = set(df.columns)
    pos = [i for i, h in enumerate(header) if h.strip() and h in read]
    need = pos[-1] + 1 if pos else 0
    if counts is None and need and df[header[need - 1]].null_count():
        counts = _field_counts(name, src)
    if counts is not None and len(counts) != total:
        raise IngestError(
            f"{name}: found {len(counts):,} rows when counting fields but {total:,} when reading; "
            "a stray quote character (\") probably joins or splits rows. Quote fields that "
            "hold quotes, commas or line breaks (\"like \"\"this\"\"\") and ingest again."
        )
    return check_rows(q, name, df, ids=ids, counts=counts, need=need, ncols=len(header),
                      total=total), total


class _Ragged(Exception):
    """Polars met a row with more fields than the header."""


def _polars_read(src: Path | bytes, name: str, *, ragged: bool, **kw: Any) -> pl.DataFrame:
    try:
        return pl.read_csv(src if isinstance(src, Path) else io.BytesIO(src), infer_schema=False,
                           truncate_ragged_lines=ragged, **kw)
    except pl.exceptions.ComputeError as e:
        text = str(e)
        if not ragged and "more fields" in text:
            raise _Ragged from e
        if "utf-8" in text.lower() and isinstance(src, Path):
            load_text(src)  # raises the encoding error, naming the line
        raise IngestError(f"{name}: cannot be read as CSV ({text.splitlines()[0]})") from e
    except (pl.exceptions.PolarsError, OSError) as e:
        raise IngestError(f"{name}: cannot be read as CSV ({str(e).splitlines()[0]})") from e


def read_header(path: Path) -> list[str]:
    """The column names of a CSV (plain or .gz), read from its first line only.

    Raises
    ------
    SchemaError
        A non-empty column name given twice.
    IngestError
        Unreadable, or a header that is not UTF-8 (nor UTF-16/32 with a byte-order mark).
    """
    return _sniff(path)[0]


def _sniff(path: Path) -> tuple[list[str], str | None]:
    """(header names, the byte-order mark's codec or None) from the file's first 64 KiB."""
    try:
        with open(path, "rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            head = fh.read(1 << 16)
    except (OSError, EOFError, zlib.error) as e:
        raise IngestError(f"{path.name}: cannot be read ({e})") from e
    codec = next((c for bom, c in _BOMS if head.startswith(bom)), None)
    if codec:
        text = head.decode(codec, errors="replace")
    else:
        end = head.find(b"\n")
        first = head if end < 0 else head[:end]
        first = first.removeprefix(codecs.BOM_UTF8)
        try:
            text = first.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _encoding_error(path.name, first, e) from None
    return _header(path.name, text.split("\n", 1)[0].lstrip("\ufeff")), codec


def load_text(path: Path) -> bytes:
    """A text file's bytes as UTF-8 (gunzipped; UTF-16/32 with a byte-order mark decoded).

    Raises
    ------
    IngestError
        Unreadable, a broken gzip stream, or not valid UTF-8 (naming the line and a likely
        encoding).
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise IngestError(f"{path.name}: cannot be read ({e.strerror or e})") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise IngestError(f"{path.name}: not a readable gzip file ({e}); download it again") from e
    return _to_utf8(path.name, raw)


def _to_utf8(name: str, data: bytes) -> bytes:
    """``data`` as UTF-8 without a byte-order mark; raise a clear error when it is not text."""
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec).encode("utf-8")
            except UnicodeDecodeError as e:
                line = data[: e.start].decode(codec, errors="replace").count("\n") + 1
                raise IngestError(
                    f"{name}: starts with a {codec.upper()} byte-order mark but is not valid "
                    f"{codec.upper()} at line {line}; save it again as UTF-8 and ingest again"
                ) from e
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _encoding_error(name, data, e) from None
    return data


def _encoding_error(name: str, data: bytes, e: UnicodeDecodeError) -> IngestError:
    line = data.count(b"\n", 0, e.start) + 1
    where = "the header (line 1)" if line == 1 else f"line {line} (data row {line - 1})"
    bad = data[e.start]
    sample = data[: 1 << 16]
    if sample.count(0) > len(sample) // 4:
        guess = ("it looks like UTF-16 without a byte-order mark; save it as UTF-8 (or as "
                 "UTF-16 with a byte-order mark)")
    else:
        try:
            ch = bytes([bad]).decode("cp1252")
            guess = (f"it looks like Latin-1 / Windows-1252 (0x{bad:02X} is {ch!r} there); save it "
                     f"as UTF-8, e.g. 'iconv -f WINDOWS-1252 -t UTF-8 {name} > fixed.csv'")
        except UnicodeDecodeError:
            guess = "save it as UTF-8"
    return IngestError(
        f"{name}: not UTF-8 text: byte 0x{bad:02X} in {where} is not valid UTF-8; {guess}, "
        "and ingest again"
    )


def _header(name: str, line: str) -> list[str]:
    """The header's field names (CSV quoting honoured); a repeated non-empty name is an error."""
    try:
        names = next(csv.reader(io.StringIO(line.rstrip("\r"))), [])
    except csv.Error as e:
        raise IngestError(f"{name}: the header line is not readable CSV ({e})") from e
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        key = n.strip()
        if not key:
            continue
        if key in seen:
            raise SchemaError(
                f"{name}: the header names column '{key}' twice (fields {seen[key] + 1} and "
                f"{i + 1}); only one of them could be read. Rename or remove one and ingest again."
            )
        seen[key] = i
    return names


def _field_counts(name: str, src: Path | bytes) -> Any:
    """Fields per data row (numpy int64 array; 0 for a blank line), header not included.

    Lines are read one by one by Polars (no quoting, a separator byte the file lacks):
    commas in a line without quote characters; otherwise commas outside quoted text, with
    the lines of a quoted field that spans line breaks joined to their row first. Falls back
    to Python's ``csv`` module when no candidate separator byte is free.
    """
    lines = None
    if isinstance(src, Path):  # Polars decompresses; \x1f (unit separator) is rare in text
        try:
            lines = pl.read_csv(src, has_header=False, separator="\x1f", quote_char=None,
                                new_columns=["l"], infer_schema=False)
        except (pl.exceptions.PolarsError, OSError):
            src = load_text(src)  # the byte occurs: pick another below
    if lines is None:
        assert isinstance(src, bytes)
        sep = next((c for c in ("\x1f", "\x1e", "\x1d", "\x1c", "\x01") if c.encode() not in src), None)
        if sep is None:
            return _field_counts_slow(name, src)
        lines = pl.read_csv(io.BytesIO(src), has_header=False, separator=sep, quote_char=None,
                            new_columns=["l"], infer_schema=False)
    lines = lines.with_columns(pl.col("l").fill_null(""))
    odd = (pl.col("l").str.count_matches('"', literal=True) % 2).cast(pl.Int64)
    lines = lines.with_columns(odd.alias("odd"))
    # a line starts inside a quoted field when the lines before it hold an odd number of quotes
    lines = lines.with_columns((((pl.col("odd").cum_sum() - pl.col("odd")) % 2) == 0).alias("start"))
    lines = lines.with_columns(pl.col("start").cum_sum().alias("rec"))
    if lines.height and not lines["start"].all():
        lines = lines.group_by("rec", maintain_order=True).agg(pl.col("l").str.join("\n"))
    unquoted = pl.when(pl.col("l").str.contains('"', literal=True)).then(
        pl.col("l").str.replace_all(r'"[^"]*"', "")).otherwise(pl.col("l"))
    n = lines.select(
        pl.when(pl.col("l").str.strip_chars("\r") == "").then(0)
        .otherwise(unquoted.str.count_matches(",", literal=True) + 1).cast(pl.Int64).alias("n")
    )["n"].to_numpy()
    return n[1:]


def _field_counts_slow(name: str, data: bytes) -> Any:
    import numpy as np

    try:
        counts = [len(r) for r in csv.reader(io.StringIO(data.decode("utf-8"), newline=""))]
    except csv.Error as e:
        raise IngestError(f"{name}: not readable CSV ({e})") from e
    return np.array(counts[1:], dtype=np.int64)


def _escape(text: str, limit: int = 80) -> str:
    """Quarantine ``item`` text: control bytes written as ``\\xNN``, cut at ``limit`` characters."""
    out = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text[:limit])
    return out + ("..." if len(text) > limit else "")


def check_rows(
    q: Quarantine, file: str, df: pl.DataFrame, *, ids: Sequence[str] = (), counts: Any = None,
    need: int = 0, ncols: int = 0, total: int, control: bool = True,
) -> pl.DataFrame:
    """Quarantine rows with a wrong field count, control bytes, or an over-long id.

    Parameters
    ----------
    counts
        Fields per data row (numpy array aligned with ``df``), or None when all are right.
    need
        Fields a row must have (up to the last column read); fewer is a short row.
    ncols
        Fields in the header; more is a long row.
    ids
        Id columns (values longer than ``MAX_ID_LENGTH`` characters are refused); the first
        present one gives the quarantine ``item`` (control bytes escaped, cut at 80 characters;
        the row number when the id is blank).
    control
        Look for control bytes (False when the caller knows the input has none).

    Returns
    -------
    DataFrame
        The other rows (same columns).
    """
    why: list[pl.Expr] = []
    if counts is not None:
        df = df.with_columns(pl.Series("__fields", counts, pl.Int64))
        why.append(
            pl.when(pl.col("__fields") == 0).then(pl.lit("blank line"))
            .when(pl.col("__fields") < need)
            .then(pl.format("short row: {} of {} fields", pl.col("__fields"), pl.lit(ncols)))
            .when(pl.col("__fields") > ncols)
            .then(pl.format("long row: {} fields, the header has {}", pl.col("__fields"), pl.lit(ncols)))
        )
    if control:
        why += [pl.when(pl.col(c).str.contains_any(_CONTROL_CHARS)).then(pl.lit(_CTRL_PREFIX + c))
                for c, t in df.schema.items() if t == pl.String]
    why += [pl.when(pl.col(c).str.len_chars() > MAX_ID_LENGTH).then(pl.format(
        "{} longer than {} characters ({} characters)", pl.lit(c), pl.lit(MAX_ID_LENGTH),
        pl.col(c).str.len_chars())) for c in ids if c in df.columns]
    if not why:
        return df
    df = df.with_columns(pl.coalesce(why).alias("__why"))
    bad = df.filter(pl.col("__why").is_not_null())
    if bad.height:
        key = next((c for c in ids if c in df.columns), None)
        rows = []
        for r in bad.iter_rows(named=True):
            reason = r["__why"]
            if reason.startswith(_CTRL_PREFIX):  # name the byte
                col = reason[len(_CTRL_PREFIX):]
                m = _CONTROL.search(r[col])
                reason = f"control character (0x{ord(m.group()) if m else 0:02X}) in {col}"
            item = str(r[ROW]) if key is None or not r[key] else _escape(r[key])
            rows.append({"row": r[ROW], "item": item, "reason": reason})
        q.add_frame(file, pl.DataFrame(rows, schema={"row": pl.Int64, "item": pl.String,
                                                     "reason": pl.String}), total=total)
    return df.filter(pl.col("__why").is_null()).drop("__why", "__fields", strict=False)


def parse_number(
    q: Quarantine, file: str, df: pl.DataFrame, col: str, *, alias: str, what: str | None = None,
    lo: float | None = None, hi: float | None = None, item: str | pl.Expr, total: int,
    unparseable: str | None = None,
) -> pl.DataFrame:
    """Parse ``col`` as a finite number into ``alias``; bad values go to the quarantine.

    A blank cell gives null. Text that is not a number gives the reason
    ``unparseable <what>: <cell>`` (or ``unparseable`` when given); NaN, infinity (``1e400``)
    and values outside ``[lo, hi]`` give ``<what> out of range (lo to hi): <cell>``.
    """
    what = what or col
    v = pl.col(col).str.strip_chars().cast(pl.Float64, strict=False)
    df = df.with_columns(v.alias(alias))
    df = quarantine_where(q, file, df, pl.col(alias).is_null() & ~blank(col),
                          pl.lit(unparseable or f"unparseable {what}: ") + pl.col(col), item, total=total)
    out = ~pl.col(alias).is_finite()
    if lo is not None:
        out = out | (pl.col(alias) < lo)
    if hi is not None:
        out = out | (pl.col(alias) > hi)
    rng = f"{'' if lo is None else f'{lo:g}'} to {'' if hi is None else f'{hi:g}'}".strip()
    return quarantine_where(q, file, df, pl.col(alias).is_not_null() & out,
                            pl.lit(f"{what} out of range ({rng}): ") + pl.col(col).str.slice(0, 40),
                            item, total=total)


def finite(col: str) -> pl.Expr:
    """``col`` as Float64, null when blank, not a number, NaN or infinite."""
    v = pl.col(col).str.strip_chars().cast(pl.Float64, strict=False)
    return pl.when(v.is_finite()).then(v)


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
