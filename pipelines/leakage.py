"""Stage ``leakage``: groups (patients, lesions, duplicate clusters) that span splits.

A *unit* is a connected set of images: two images are in one unit when they share a
``group_id`` (patient or lesion), a duplicate cluster (the ``clusters`` table), or a
duplicate pair from an imported list (a CSV ``similarity,from_img,to_img`` whose names are
native ids with or without a file extension). For each split scheme the stage reports, per
split pair and for all splits together (``split_a = '*'``), how many units span them, how
many images those units hold in each split and how many cross-split image pairs they form.
With ``params.yaml: leakage.all_splits: true`` it adds, per grouping, one row
``split_a = split_b = 'all'``: the units present in *every* split of the scheme (e.g. the
DermaMNIST audit's lesions in train, val and test at once), their images and cross-split
pairs, with the per-split counts in ``by_split`` (JSON).

Run as ``medlake leakage [DATASET] [--split-scheme S] [--pairs CSV]``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from medlake.catalog import Catalog, CatalogError, Quarantine
from medlake.catalog.params import param
from medlake.pipelines.stage import Stage, UsageProblem

log = logging.getLogger(__name__)
STAGE = "leakage"
SPLIT_ORDER = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}


def read_pairs_csv(
    catalog: Catalog, dataset_id: str, path: Path, q: Quarantine | None = None
) -> pl.DataFrame:
    """An imported duplicate list as ``image_a, image_b, score`` (image ids of ``dataset_id``).

    Accepts columns ``similarity,from_img,to_img`` (the DermaMNIST audit's format) or
    ``image_a,image_b[,score]``. Names match a native id exactly or after dropping a file
    extension; rows naming unknown images go to ``q`` (or raise when ``q`` is None).

    Raises
    ------
    CatalogError
        When the columns are not recognised, or an image is unknown and ``q`` is None.
    """
    try:
        raw = pl.read_csv(path, infer_schema=False)
    except (pl.exceptions.ComputeError, pl.exceptions.NoDataError, OSError) as e:
        raise CatalogError(f"{path.name}: cannot be read as a duplicate-pairs CSV ({e})") from e
    cols = {"from_img": "a", "to_img": "b", "similarity": "score", "image_a": "a",
            "image_b": "b", "score": "score"}
    have = {c: cols[c] for c in raw.columns if c in cols}
    if sorted(set(have.values()) - {"score"}) != ["a", "b"]:
        raise CatalogError(
            f"{path.name}: expected columns similarity,from_img,to_img (or image_a,image_b,score); "
            f"found {raw.columns}"
        )
    df = raw.rename(have).with_row_index("row", offset=1)
    if "score" not in df.columns:
        df = df.with_columns(pl.lit(None, pl.String).alias("score"))
    known = catalog.image_ids(dataset_id)
    lookup = dict(zip(known["native_id"].to_list(), known["image_id"].to_list()))

    def match(name: str | None) -> str | None:
        if name is None:
            return None
        name = name.strip()
        return lookup.get(name) or lookup.get(name.rsplit(".", 1)[0])

    a = [match(x) for x in df["a"].to_list()]
    b = [match(x) for x in df["b"].to_list()]
    out = df.with_columns(pl.Series("image_a", a, pl.String), pl.Series("image_b", b, pl.String))
    bad = out.filter(pl.col("image_a").is_null() | pl.col("image_b").is_null())
    if bad.height:
        first = bad.row(0, named=True)
        msg = (f"{path.name}: {bad.height} of {df.height} pairs name images that are not in "
               f"dataset '{dataset_id}' (first: row {first['row']}, {first['a']!r}/{first['b']!r})")
        if q is None:
            raise CatalogError(msg + "; check the dataset id or the file")
        q.add_frame(path.name, bad.select(
            "row", (pl.col("a") + "|" + pl.col("b")).alias("item"),
            pl.lit(f"names an image that is not in dataset '{dataset_id}'").alias("reason"),
        ))
        log.warning(msg)
    return out.filter(pl.col("image_a").is_not_null() & pl.col("image_b").is_not_null()).select(
        "image_a", "image_b", pl.col("score").cast(pl.Float64, strict=False),
        pl.lit(path.name).alias("evidence"),
    )


def duplicate_links(
    catalog: Catalog, dataset_id: str, pair_files: Iterable[Path] = (), *,
    use_clusters: bool = True, q: Quarantine | None = None,
) -> pl.DataFrame:
    """Duplicate evidence as ``image_a, image_b, score, evidence`` (one row per link).

    Cluster members are linked to their cluster's first image (``evidence = 'cluster:<id>'``),
    imported pairs keep their similarity (``evidence`` = the file name).
    """
    frames = []
    if use_clusters and catalog.tables.exists("clusters"):
        cl = catalog.read("clusters", columns=["image_id", "cluster_id"]).filter(
            pl.col("image_id").str.starts_with(dataset_id + ":")
        )
        first = cl.group_by("cluster_id").agg(pl.col("image_id").min().alias("image_a"))
        frames.append(cl.join(first, on="cluster_id").filter(pl.col("image_id") != pl.col("image_a"))
                      .select("image_a", pl.col("image_id").alias("image_b"),
                              pl.lit(None, pl.Float64).alias("score"),
                              (pl.lit("cluster:") + pl.col("cluster_id")).alias("evidence")))
    for f in pair_files:
        frames.append(read_pairs_csv(catalog, dataset_id, Path(f), q))
    if not frames:
        return pl.DataFrame(schema={"image_a": pl.String, "image_b": pl.String,
                                    "score": pl.Float64, "evidence": pl.String})
    return pl.concat(frames)


def units(frame: pl.DataFrame, links: pl.DataFrame | None = None) -> pl.DataFrame:
    """Connected units of images: ``frame`` (image_id, group_id) plus duplicate ``links``.

    Returns ``frame`` with a ``unit`` column: the smallest group id (or image id, for images
    without a group) of the connected component, so the labels are deterministic.
    """
    ids = frame["image_id"].to_list()
    index = {x: i for i, x in enumerate(ids)}
    n = len(ids)
    grp = frame["group_id"].fill_null(frame["image_id"]).to_list() if "group_id" in frame.columns else ids
    gcodes = {g: n + j for j, g in enumerate(dict.fromkeys(grp))}
    rows = list(range(n))
    cols = [gcodes[g] for g in grp]
    if links is not None and links.height:
        for a, b in zip(links["image_a"].to_list(), links["image_b"].to_list()):
            if a in index and b in index:
                rows.append(index[a])
                cols.append(index[b])
    size = n + len(gcodes)
    m = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(size, size))
    _, comp = connected_components(m, directed=False)
    df = frame.with_columns(pl.Series("_c", comp[:n]), pl.Series("_g", grp, pl.String))
    label = df.group_by("_c").agg(pl.col("_g").min().alias("unit"))
    return df.join(label, on="_c", how="left").drop("_c", "_g")


ALL = "all"  # split_a = split_b of the rows for units present in every split


def leakage_rows(frame: pl.DataFrame, *, all_splits: bool = False) -> list[dict]:
    """Leakage counts of ``frame`` (image_id, split, unit); images without a split are ignored.

    One row per split pair plus one for all splits together (``split_a = split_b = '*'``);
    with ``all_splits`` (and two splits or more) one more, ``split_a = split_b = 'all'``:
    the units with images in every split, ``n_images`` = all their images, ``n_pairs`` =
    their image pairs from different splits, and ``by_split`` = JSON ``{"splits": [...],
    "images": {split: n}, "pairs": {"a-b": n}}``.
    """
    f = frame.filter(pl.col("split").is_not_null())
    splits = sorted(f["split"].unique().to_list(), key=lambda s: (SPLIT_ORDER.get(s, 9), s))
    wide = f.group_by("unit", "split").len().pivot("split", index="unit", values="len").fill_null(0)
    for s in splits:
        if s not in wide.columns:
            wide = wide.with_columns(pl.lit(0).alias(s))
    n_units, n_images = wide.height, f.height
    out = []
    for a, b in combinations(splits, 2):
        sp = wide.filter((pl.col(a) > 0) & (pl.col(b) > 0))
        out.append({"split_a": a, "split_b": b, "n_groups": sp.height,
                    "n_images_a": int(sp[a].sum()), "n_images_b": int(sp[b].sum()),
                    "n_images": int(sp[a].sum() + sp[b].sum()),
                    "n_pairs": int((sp[a] * sp[b]).sum())})
    present = wide.select(pl.sum_horizontal([(pl.col(s) > 0).cast(pl.Int64) for s in splits])
                          .alias("k")) if splits else pl.DataFrame({"k": []})
    multi = wide.filter(present["k"] > 1) if splits else wide
    pairs_all = sum(int((multi[a] * multi[b]).sum()) for a, b in combinations(splits, 2))
    out.append({"split_a": "*", "split_b": "*", "n_groups": multi.height, "n_images_a": None,
                "n_images_b": None,
                "n_images": int(multi.select(pl.sum_horizontal(splits)).to_series().sum())
                if splits and multi.height else 0,
                "n_pairs": pairs_all})
    if all_splits and len(splits) >= 2:
        every = wide.filter(pl.all_horizontal([pl.col(s) > 0 for s in splits]))
        pairs = {f"{a}-{b}": int((every[a] * every[b]).sum()) for a, b in combinations(splits, 2)}
        images = {s: int(every[s].sum()) for s in splits}
        out.append({"split_a": ALL, "split_b": ALL, "n_groups": every.height,
                    "n_images_a": None, "n_images_b": None, "n_images": sum(images.values()),
                    "n_pairs": sum(pairs.values()),
                    "by_split": json.dumps({"splits": splits, "images": images, "pairs": pairs})})
    for r in out:
        r.update(n_groups_total=n_units, n_images_total=n_images)
    return out


def scheme_frame(catalog: Catalog, dataset_id: str, scheme: str) -> pl.DataFrame:
    """``image_id, group_id, split`` of one dataset's split scheme."""
    esc = dataset_id.replace("'", "''")
    sp = catalog.read("splits", where=f"dataset_id = '{esc}' AND scheme = '{scheme.replace(chr(39), '')}'",
                      columns=["image_id", "split"])
    if not sp.height:
        raise CatalogError(
            f"no split scheme '{scheme}' for dataset '{dataset_id}' in the splits table; "
            f"'medlake sql \"SELECT DISTINCT dataset_id, scheme FROM splits\"' lists them"
        )
    img = catalog.read("images", where=f"dataset_id = '{esc}'", columns=["image_id", "group_id"])
    return sp.join(img, on="image_id", how="left").sort("image_id")


def run(
    catalog: Catalog, dataset_id: str | None = None, *, scheme: str | None = None,
    pairs: Iterable[Path | str] = (), use_clusters: bool = True, params: Any = None,
    all_splits: bool | None = None,
) -> pl.DataFrame:
    """Compute and write the ``leakage`` table for one or every (dataset, split scheme).

    Parameters
    ----------
    dataset_id, scheme
        Restrict to one dataset and/or scheme (default: every scheme in ``splits``).
    pairs
        Imported duplicate lists for ``dataset_id``; without it, ``params.yaml``
        ``leakage.pairs.<dataset>`` (paths relative to the workspace or ``real:``).
    use_clusters
        Also join images of one duplicate cluster (``clusters`` table, when it exists).
    all_splits
        Add the ``split_a = split_b = 'all'`` rows (units in every split); None:
        ``params.yaml: leakage.all_splits`` (default false).

    Returns
    -------
    polars.DataFrame
        The rows written: two groupings per scheme, ``group_id`` and ``group_id+duplicates``.

    Raises
    ------
    CatalogError
        When the splits table is missing or the scheme is unknown.
    """
    from medlake.catalog.recipes import resolve_path

    sp = catalog.read("splits", columns=["dataset_id", "scheme"], required=True,
                      hint="ingest a dataset with a split scheme first").unique()
    if dataset_id:
        sp = sp.filter(pl.col("dataset_id") == dataset_id)
    if scheme:
        sp = sp.filter(pl.col("scheme") == scheme)
    if not sp.height:
        raise CatalogError(f"no split scheme {scheme or ''} for dataset '{dataset_id}' in the "
                           "splits table; ingest one first (e.g. 'medlake ingest dermamnist FILE')")
    prm = DECLARATION.load_params(catalog, params)
    param_pairs = prm.pairs
    every = prm.all_splits if all_splits is None else bool(all_splits)
    rows, qs = [], {}
    for ds, sch in sorted(sp.iter_rows()):
        q = qs.setdefault(ds, Quarantine(ds, stage=STAGE))
        explicit = bool(pairs and ds == dataset_id)  # typed by the user (--pairs): taken as given
        files = list(pairs) if explicit else list(param_pairs.get(ds) or [])
        paths = [Path(f) if explicit and Path(f).is_absolute() else
                 resolve_path(str(f), ws_root=catalog.ws.root, real_data=catalog.ws.real_data_dir(),
                              key=f"params.yaml leakage.pairs.{ds}" if not explicit else "--pairs")
                 for f in files]
        frame = scheme_frame(catalog, ds, sch)
        links = duplicate_links(catalog, ds, paths, use_clusters=use_clusters, q=q)
        for grouping, lk in (("group_id", None), ("group_id+duplicates", links)):
            for r in leakage_rows(units(frame, lk), all_splits=every):
                rows.append({"dataset_id": ds, "scheme": sch, "grouping": grouping,
                             "version": f"{ds}@{sch}", **r})
    out = pl.DataFrame(rows, infer_schema_length=None)
    with catalog.transaction() as tx:
        for (ds, sch), part in out.group_by("dataset_id", "scheme", maintain_order=True):
            tx.write("leakage", part, stage=STAGE, partition=f"{ds}--{sch}")
        for ds, q in qs.items():  # always written (possibly empty): a dvc.yaml output
            tx.write("quarantine", q.frame(), stage=STAGE, partition=ds)
    return out


def summary(df: pl.DataFrame) -> str:
    """Human lines for the CLI: one per (dataset, scheme, grouping)."""
    lines = []
    for r in df.filter(pl.col("split_a") == "*").iter_rows(named=True):
        lines.append(
            f"{r['dataset_id']}@{r['scheme']} [{r['grouping']}]: {r['n_groups']:,} of "
            f"{r['n_groups_total']:,} groups span splits, holding {r['n_images']:,} of "
            f"{r['n_images_total']:,} images ({r['n_pairs']:,} cross-split pairs)"
        )
        pairs = df.filter((pl.col("dataset_id") == r["dataset_id"]) & (pl.col("scheme") == r["scheme"])
                          & (pl.col("grouping") == r["grouping"]) & (pl.col("split_a") != "*"))
        for p in pairs.iter_rows(named=True):
            if p["split_a"] == ALL:
                d = json.loads(p["by_split"])
                lines.append(
                    f"  in every split ({', '.join(d['splits'])}): {p['n_groups']:,} groups, "
                    + " + ".join(f"{d['images'][s]:,}" for s in d["splits"])
                    + f" images, {p['n_pairs']:,} pairs ("
                    + ", ".join(f"{k} {v:,}" for k, v in d["pairs"].items()) + ")")
                continue
            lines.append(f"  {p['split_a']}-{p['split_b']}: {p['n_groups']:,} groups, "
                         f"{p['n_images_a']:,} + {p['n_images_b']:,} images, {p['n_pairs']:,} pairs")
    return "\n".join(lines)


@dataclass(frozen=True)
class Params:
    """``params.yaml: leakage``."""

    pairs: dict[str, list[str]] = param(
        factory=dict, help="duplicate-pair CSVs per dataset (similarity,from_img,to_img); paths "
        "relative to the workspace, or to real_data with 'real:'")
    all_splits: bool = param(False, "also write rows split_a = split_b = 'all': groups with "
                             "images in every split of the scheme, their images and pairs")


@dataclass(frozen=True)
class LeakageResult:
    """The leakage rows written (:func:`run`)."""

    rows: pl.DataFrame

    def summary(self) -> str:
        return summary(self.rows)


def run_stage(catalog: Catalog, params: Params | dict[str, Any] | None = None, *,
              dataset: str | None = None, scheme: str | None = None,
              pairs: Iterable[Path | str] = (), no_clusters: bool = False) -> LeakageResult:
    """The stage's entry (``medlake leakage``): :func:`run` with the stage's calling convention."""
    if pairs and not dataset:
        raise UsageProblem("--pairs needs DATASET (the pairs name images of one dataset)")
    return LeakageResult(run(catalog, dataset, scheme=scheme, pairs=pairs,
                             use_clusters=not no_clusters, params=params))


def _options() -> tuple[Any, ...]:
    import click

    return (
        click.argument("dataset", required=False),
        click.option("--split-scheme", "scheme", help="Split scheme (default: every scheme)."),
        click.option("--pairs", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
                     help="Duplicate-pairs CSV (similarity,from_img,to_img), repeatable; default: "
                          "params.yaml leakage.pairs.<dataset>."),
        click.option("--no-clusters", is_flag=True, help="Ignore the clusters table."),
    )


DECLARATION = Stage(
    name=STAGE, params=Params, run=run_stage,
    reads=("splits", "images", "clusters"), writes=("leakage", "quarantine"),
    help="Count groups (patients, lesions, duplicate clusters) that span train/val/test.\n\n"
         "Without DATASET, every (dataset, split scheme) in the splits table is checked.",
    options=_options(), extra_params=("real_data",),
    example="medlake leakage ham10000 --split-scheme dermamnist",
)


def evidence(unit: str, members: int) -> str:
    """Lineage evidence text for a unit."""
    return json.dumps({"group": unit, "images": members}, sort_keys=True)


if __name__ == "__main__":  # pragma: no cover
    from medlake.cli.main import run_stage

    run_stage("leakage")
