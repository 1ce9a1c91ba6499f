"""What the pages read, through :mod:`catalog`: paginated queries, images, versions, diffs.

Every query pushes filtering, sorting and paging into DuckDB (``LIMIT``/``OFFSET``), so a
page costs the same on 100 images and on 100k. Tables that a stage has not written yet
read as empty with their declared columns; pages then say what to run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl
import streamlit as st
from PIL import Image

from medlake.catalog import Catalog, CatalogError
from medlake.ui import cache

# what to run when a page's table does not exist yet
def _hints() -> dict[str, str]:
    from medlake.pipelines.registry import hints

    return hints()


#: table -> the commands that write it (derived from the stage declarations)
HINTS: dict[str, str] = _hints()


class ImagePathError(CatalogError):
    """An image whose stored path would leave the workspace, or that has no file."""


class NoFileError(ImagePathError):
    """An image with no file recorded: its dataset is metadata-only until
    ``medlake attach-images DATASET FOLDER`` gives it pixels (pages say so once, not per image).
    """

    def __init__(self, image_id: str, dataset_id: str | None) -> None:
        self.image_id, self.dataset_id = image_id, dataset_id
        super().__init__(f"image '{image_id}' has no file recorded; attach its folder with "
                         f"'medlake attach-images {dataset_id or 'DATASET'} FOLDER'")


def lit(value: Any) -> str:
    """A SQL string literal (for values picked in widgets from table contents)."""
    return "'" + str(value).replace("'", "''") + "'"


def has(cat: Catalog, table: str) -> bool:
    """Whether any stage has written ``table``."""
    return cat.tables.exists(table)


def column_types(cat: Catalog, table: str) -> dict[str, str]:
    """Column name -> DuckDB type of the table's files (columns may grow; read defensively)."""
    d = q(cat, f'DESCRIBE "{table}"')
    return dict(zip(d["column_name"].to_list(), d["column_type"].to_list()))


def columns(cat: Catalog, table: str) -> list[str]:
    """Columns present in the table's files."""
    return list(column_types(cat, table))


def q(cat: Catalog, sql: str, params: list[Any] | None = None) -> pl.DataFrame:
    """Trusted SQL (built by the pages, values quoted with :func:`lit` or params).

    Runs on the shared connection and is cached per lake state (:mod:`ui.cache`).
    """
    return cache.query(cat, sql, params or ())


def count(cat: Catalog, table: str, where: str = "true") -> int:
    return int(q(cat, f'SELECT count(*) AS n FROM "{table}" WHERE {where}')["n"][0])


# --- images -----------------------------------------------------------------------------------
def image_paths(cat: Catalog, image_ids: list[str]) -> dict[str, Path | ImagePathError]:
    """The file of each image (one query for all), or why it cannot be served.

    A path is only returned when it lies inside the workspace and the dataset's images
    root; ``..``, absolute paths and symlinks that leave it give an :class:`ImagePathError`.
    """
    from medlake.catalog.imageio import ImageReadError
    from medlake.catalog.paths import image_file

    if not image_ids:
        return {}
    df = q(cat, "SELECT i.image_id, any_value(i.path) AS path, any_value(d.images_root) AS root, "
                "any_value(i.dataset_id) AS dataset_id "
                "FROM images i LEFT JOIN datasets d USING (dataset_id) "
                f"WHERE i.image_id IN ({', '.join(lit(i) for i in image_ids)}) GROUP BY 1")
    found = {r["image_id"]: r for r in df.iter_rows(named=True)}
    out: dict[str, Path | ImagePathError] = {}
    for iid in image_ids:
        r = found.get(iid)
        if r is None:
            out[iid] = ImagePathError(f"image '{iid}' is not in the images table")
            continue
        rel, root = r["path"], r["root"]
        if not rel:
            out[iid] = NoFileError(iid, r["dataset_id"])
            continue
        try:
            out[iid] = image_file(cat.ws.root, root, rel)
        except ImageReadError as e:
            out[iid] = ImagePathError(
                f"image '{iid}': refusing to read {rel!r} under images_root {root!r}: {e}. "
                "Images are only served from inside the workspace")
    return out


def image_path(cat: Catalog, image_id: str) -> Path:
    """The file of ``image_id``, guaranteed to lie inside the workspace.

    Raises
    ------
    ImagePathError
        Unknown image, no path recorded, or a path (via ``..``, an absolute path or a
        symlink) that resolves outside the workspace or the dataset's images root.
    """
    p = image_paths(cat, [image_id])[image_id]
    if isinstance(p, ImagePathError):
        raise p
    return p


def load_image(cat: Catalog, image_id: str, *, max_side: int | None = None) -> Image.Image:
    """``image_id`` as 8-bit RGB, shrunk to ``max_side`` (None: full resolution)."""
    return open_rgb(image_path(cat, image_id), image_id, max_side=max_side)


def open_rgb(p: Path, image_id: str, *, max_side: int | None = None) -> Image.Image:
    """The file ``p`` (of ``image_id``, for messages) as 8-bit RGB, shrunk to ``max_side``."""
    from medlake.catalog.imageio import ImageReadError, load_rgb

    if not p.is_file():
        raise ImagePathError(f"image '{image_id}': file {p.name} is missing under its images root")
    try:
        # a large JPEG shown shrunk is decoded at a reduced DCT scale (twice the size shown)
        im = load_rgb(p, min_side=2 * max_side if max_side else None)
    except ImageReadError as e:
        raise ImagePathError(f"image '{image_id}': {e}") from e
    if max_side:
        im.thumbnail((max_side, max_side))
    return im


def blend(a: Image.Image, b: Image.Image, mode: str) -> Image.Image:
    """``b`` resized onto ``a``: a 50 % blend or the absolute difference."""
    from PIL import ImageChops

    b2 = b.resize(a.size)
    if mode == "difference":
        return ImageChops.difference(a, b2)
    return Image.blend(a, b2, 0.5)


# --- split schemes ----------------------------------------------------------------------------
Schemes = str | Mapping[str, str] | None
"""A split scheme for every dataset (str), one per dataset (``dataset_id -> scheme``; datasets
left out have no split shown), or None (any scheme)."""


def schemes_of(cat: Catalog, dataset_id: str | None = None) -> list[str]:
    """The split schemes in the ``splits`` table (of one dataset, or of all), sorted."""
    where = f"WHERE dataset_id = {lit(dataset_id)}" if dataset_id else ""
    return q(cat, f"SELECT DISTINCT scheme FROM splits {where} ORDER BY 1")["scheme"].to_list()


def default_schemes(cat: Catalog) -> dict[str, str]:
    """Each dataset's default split scheme: the scheme of its root version when the splits
    table has it, else ``official`` when present, else its first scheme by name."""
    df = q(cat, """
        WITH s AS (SELECT DISTINCT dataset_id, scheme FROM splits WHERE scheme IS NOT NULL),
        r AS (SELECT dataset_id, any_value(scheme) AS root_scheme FROM versions
              WHERE kind = 'root' GROUP BY 1)
        SELECT s.dataset_id, s.scheme FROM s LEFT JOIN r USING (dataset_id)
        QUALIFY row_number() OVER (PARTITION BY s.dataset_id ORDER BY
            coalesce(s.scheme = r.root_scheme, false) DESC, s.scheme = 'official' DESC,
            s.scheme) = 1
        ORDER BY 1""")
    return dict(zip(df["dataset_id"].to_list(), df["scheme"].to_list()))


def scheme_condition(scheme: Schemes, alias: str = "") -> str:
    """A SQL condition on ``splits`` rows (table alias ``alias``) for :data:`Schemes`."""
    a = f"{alias}." if alias else ""
    if scheme is None:
        return "true"
    if isinstance(scheme, str):
        return f"{a}scheme = {lit(scheme)}"
    conds = [f"({a}dataset_id = {lit(d)} AND {a}scheme = {lit(s)})"
             for d, s in sorted(scheme.items())]
    return "(" + " OR ".join(conds) + ")" if conds else "false"


def image_info(cat: Catalog, image_ids: list[str], scheme: Schemes = None) -> dict[str, dict]:
    """Group, split (of ``scheme``, see :data:`Schemes`; None: any) and positive labels of
    each image."""
    if not image_ids:
        return {}
    ids = ", ".join(lit(i) for i in image_ids)
    sch = f"AND {scheme_condition(scheme, 's')}"
    info = q(cat, f"""
        SELECT i.image_id, any_value(i.group_id) AS group_id,
               string_agg(DISTINCT s.split, '/') AS split
        FROM images i LEFT JOIN splits s ON s.image_id = i.image_id {sch}
        WHERE i.image_id IN ({ids}) GROUP BY i.image_id""")
    labels = q(cat, f"""
        SELECT image_id, string_agg(DISTINCT finding || ' (' || split_part(source_id, ':', 2)
               || ')', ', ' ORDER BY finding || ' (' || split_part(source_id, ':', 2) || ')')
               AS labels
        FROM annotations WHERE image_id IN ({ids}) AND value > 0 GROUP BY image_id""")
    out = {r["image_id"]: {**r, "labels": ""} for r in info.iter_rows(named=True)}
    for r in labels.iter_rows(named=True):
        out.setdefault(r["image_id"], {"image_id": r["image_id"]})["labels"] = r["labels"]
    return out


# --- duplicates ------------------------------------------------------------------------------
def pair_datasets(cat: Catalog) -> list[str]:
    """The datasets whose images appear in candidate pairs, sorted."""
    return q(cat, """
        SELECT DISTINCT dataset_id FROM images
        WHERE image_id IN (SELECT image_a FROM pairs UNION SELECT image_b FROM pairs)
          AND dataset_id IS NOT NULL ORDER BY 1""")["dataset_id"].to_list()


def pairs_page(cat: Catalog, *, offset: int, limit: int, method: str | None = None,
               verified: bool | None = None, min_score: float = 0.0,
               cross_only: bool = False, scheme: Schemes = None,
               dataset: str | None = None) -> tuple[pl.DataFrame, int]:
    """One page of candidate pairs, best score first, and the number of pairs matching.

    ``scheme`` picks the splits shown (see :data:`Schemes`); ``dataset`` keeps the pairs
    with an image of that dataset.
    """
    conds = [f"p.score >= {float(min_score)}"]
    if method:
        conds.append(f"p.method = {lit(method)}")
    if verified is not None:
        conds.append(f"p.verified = {'true' if verified else 'false'}")
    if dataset:
        ds = f"(SELECT image_id FROM images WHERE dataset_id = {lit(dataset)})"
        conds.append(f"(p.image_a IN {ds} OR p.image_b IN {ds})")
    base = f"""
        WITH s AS (SELECT image_id, any_value(split) AS split FROM splits
                   WHERE {scheme_condition(scheme)} GROUP BY image_id),
        x AS (SELECT p.*, sa.split AS split_a, sb.split AS split_b,
                     coalesce(sa.split <> sb.split, false) AS crosses_splits
              FROM pairs p LEFT JOIN s sa ON sa.image_id = p.image_a
              LEFT JOIN s sb ON sb.image_id = p.image_b WHERE {' AND '.join(conds)})
        SELECT * FROM x {'WHERE crosses_splits' if cross_only else ''}"""
    total = int(q(cat, f"SELECT count(*) AS n FROM ({base})")["n"][0])
    page = q(cat, f"{base} ORDER BY score DESC, image_a, image_b LIMIT {int(limit)} "
                  f"OFFSET {int(offset)}")
    return page, total


def score_histogram(cat: Catalog, bins: int = 40) -> pl.DataFrame:
    """Counts of pair scores in ``bins`` equal bins (computed in DuckDB)."""
    return q(cat, f"""
        WITH r AS (SELECT min(score) lo, max(score) hi FROM pairs)
        SELECT method, least(floor((score - r.lo) / nullif(r.hi - r.lo, 0) * {bins}),
                              {bins - 1}) AS bin,
               any_value(r.lo + (r.hi - r.lo) * (least(floor((score - r.lo)
                   / nullif(r.hi - r.lo, 0) * {bins}), {bins - 1}) + 0.5) / {bins}) AS score,
               count(*) AS n
        FROM pairs, r WHERE score IS NOT NULL GROUP BY ALL ORDER BY bin""")


# --- versions ---------------------------------------------------------------------------------
def versions(cat: Catalog) -> pl.DataFrame:
    return q(cat, "SELECT * FROM versions ORDER BY name")


def version_graph(vs: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Nodes and edges of the parent -> child graph, laid out left to right by generation.

    Returns
    -------
    nodes
        ``name, n_images, kind, x, y, label`` (x = generation, y = row within it).
    edges
        ``parent, name, x, y, x2, y2``, one per version that has a parent in ``vs``.
    """
    rows = {r["name"]: r for r in vs.iter_rows(named=True)}

    def depth(name: str) -> int:
        seen: set[str] = set()
        d = 0
        while (parent := rows[name].get("parent")) in rows and parent not in seen:
            seen.add(name)
            name, d = parent, d + 1
        return d

    per_gen: dict[int, int] = {}
    nodes = []
    for name in sorted(rows):
        x = depth(name)
        y = per_gen[x] = per_gen.get(x, -1) + 1
        n = rows[name].get("n_images")
        nodes.append({"name": name, "n_images": n, "kind": rows[name].get("kind"), "x": x,
                      "y": y, "label": f"{name} ({n:,} images)" if n is not None else name})
    pos = {n["name"]: (n["x"], n["y"]) for n in nodes}
    edges = [{"parent": r["parent"], "name": name, "x": pos[r["parent"]][0],
              "y": pos[r["parent"]][1], "x2": pos[name][0], "y2": pos[name][1]}
             for name, r in rows.items() if r.get("parent") in pos]
    node_schema = {"name": pl.String, "n_images": pl.Int64, "kind": pl.String, "x": pl.Int64,
                   "y": pl.Int64, "label": pl.String}
    edge_schema = {"parent": pl.String, "name": pl.String, "x": pl.Int64, "y": pl.Int64,
                   "x2": pl.Int64, "y2": pl.Int64}
    return pl.DataFrame(nodes, schema=node_schema), pl.DataFrame(edges, schema=edge_schema)


def split_counts(vs: pl.DataFrame) -> pl.DataFrame:
    """``version, split, n`` from each version's ``counts`` JSON."""
    rows = []
    for r in vs.iter_rows(named=True):
        try:
            c = json.loads(r.get("counts") or "{}").get("split", {})
        except (json.JSONDecodeError, AttributeError):
            c = {}
        rows += [{"version": r["name"], "split": k, "n": int(v)} for k, v in c.items()]
    return pl.DataFrame(rows, schema={"version": pl.String, "split": pl.String, "n": pl.Int64})


def version_dir(cat: Catalog, name: str) -> Path | None:
    from medlake.catalog.tables import safe_name

    d = cat.ws.versions_dir / safe_name(name)
    return d if d.is_dir() else None


def datasheet(cat: Catalog, name: str) -> str | None:
    d = version_dir(cat, name)
    p = d / "DATASHEET.md" if d else None
    return p.read_text() if p and p.is_file() else None


def version_images(cat: Catalog, name: str) -> pl.DataFrame:
    """``image_id, split`` of a version: its manifest, else (roots) the ingest splits."""
    d = version_dir(cat, name)
    if d and (d / "manifest.parquet").is_file():
        m = pl.read_parquet(d / "manifest.parquet")
        if "split" not in m.columns:
            m = m.with_columns(pl.lit(None, pl.String).alias("split"))
        return m.select("image_id", "split")
    v = q(cat, "SELECT dataset_id, scheme FROM versions WHERE name = ?", [name])
    if v.height == 0 or v["scheme"][0] is None:
        return pl.DataFrame(schema={"image_id": pl.String, "split": pl.String})
    return q(cat, "SELECT image_id, split FROM splits WHERE dataset_id = ? AND scheme = ?",
             [v["dataset_id"][0], v["scheme"][0]])


def diff(cat: Catalog, a: str, b: str) -> tuple[dict[str, int], pl.DataFrame]:
    """Images added, removed and moved between versions ``a`` and ``b``, with the list.

    Cached per lake state (a materialised version also rewrites the versions table).
    """
    return _diff(str(cat.ws.root), cache.signature(cat.ws.tables_dir), a, b)


@st.cache_data(max_entries=32, show_spinner=False)
def _diff(root: str, sig: tuple, a: str, b: str) -> tuple[dict[str, int], pl.DataFrame]:
    cat = Catalog.open(root)
    ia, ib = version_images(cat, a), version_images(cat, b)
    j = ia.join(ib, on="image_id", how="full", suffix="_b", coalesce=True)
    j = j.with_columns(
        pl.when(pl.col("split").is_null()).then(pl.lit("added"))
        .when(pl.col("split_b").is_null()).then(pl.lit("removed"))
        .when(pl.col("split") != pl.col("split_b")).then(pl.lit("moved"))
        .otherwise(pl.lit("same")).alias("change")
    ).rename({"split": f"split in {a}", "split_b": f"split in {b}"})
    counts = {k: int((j["change"] == k).sum()) for k in ("added", "removed", "moved", "same")}
    return counts, j.filter(pl.col("change") != "same").sort("change", "image_id")
