"""Stage ``materialize``: build a corrected dataset version from a recipe.

``medlake materialize RECIPE`` reads ``recipes/RECIPE.yaml``, takes the parent version's
images (a root ``<dataset>@<scheme>`` from ingest, or a derived version's manifest), applies
the recipe's rules in order, and writes ``lake/versions/<name>/`` atomically (see
:mod:`catalog.versions` for its contents), the ``lineage`` table (one row per parent image
and rule that touched it, plus ``kept`` rows for untouched images) and a ``versions`` row.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from medlake.catalog import (
    Catalog,
    CatalogError,
    Quarantine,
    __version__,
    conform,
    shards,
    write_parquet_atomic,
)
from medlake.catalog.ingestkit import sha256_file
from medlake.catalog.recipes import LabelSpec, Recipe, RecipeError, load_recipe, recipe_path, resolve_path
from medlake.catalog.versions import MANIFEST_SCHEMA_VERSION, manifest_metadata
from medlake.pipelines import export
from medlake.pipelines.datasheet import datasheet_info
from medlake.pipelines.leakage import duplicate_links, leakage_rows, units
from medlake.pipelines.rules import RULE_FUNCS, Context
from medlake.pipelines.rules_reviews import exclude_pairs
from medlake.pipelines.stage import Stage, UsageProblem
from medlake.catalog.params import param

log = logging.getLogger(__name__)
STAGE = "materialize"
INPUT_TABLES = ("images", "annotations", "splits", "versions", "clusters", "outliers", "datasets")


@dataclass(frozen=True)
class MaterializeResult:
    """What a run did: counts per split, per rule/action, and where it wrote."""

    name: str
    path: Path
    n_parent: int
    n_kept: int
    counts: dict[str, int]
    actions: dict[str, int]
    files: dict[str, int]
    quarantined: int
    skipped: str | None = None  # why the recipe was not materialised

    def summary(self) -> str:
        if self.skipped:
            return f"version '{self.name}' skipped: {self.skipped} (also in the quarantine table)"
        acts = ", ".join(f"{k} {v:,}" for k, v in sorted(self.actions.items()))
        sp = ", ".join(f"{k} {v:,}" for k, v in self.counts.items())
        return (f"version '{self.name}': {self.n_parent:,} parent images -> {self.n_kept:,} kept "
                f"({sp}); lineage: {acts}" + (f"; {_rows(self.quarantined)} quarantined "
                                              "(see the quarantine table)"
                                              if self.quarantined else ""))


def _rows(n: int) -> str:
    return f"{n:,} row" + ("" if n == 1 else "s")


def load_label(catalog: Catalog, dataset_id: str, spec: LabelSpec) -> pl.DataFrame:
    """``image_id, <spec.name>`` (text: category, else value) from one source and finding.

    The frame's column ``<spec.name>`` is named after the label; :func:`label_finding` gives
    the finding used when the spec names none.

    Raises
    ------
    RecipeError
        When the source is unknown, the finding is ambiguous or absent, or an image has
        several rows (several annotators: name one with ``annotator``).
    """
    esc = spec.source.replace("'", "''")
    ann = catalog.read("annotations", where=f"source_id = '{esc}'",
                       columns=["image_id", "annotator", "finding", "value", "category", "meaning"])
    if not ann.height:
        known = catalog.read("sources", where=f"dataset_id = '{dataset_id}'",
                             columns=["source_id"])["source_id"].to_list()
        raise RecipeError(f"labels.{spec.name}: source '{spec.source}' has no annotations; "
                          f"sources of '{dataset_id}': {sorted(known)}")
    findings = sorted(ann["finding"].unique().to_list())
    finding = spec.finding
    if finding is None:
        if len(findings) > 1:
            raise RecipeError(f"labels.{spec.name}: source '{spec.source}' has findings "
                              f"{findings}; write '{spec.source}/FINDING'")
        finding = findings[0]
    ann = ann.filter((pl.col("finding") == finding) & (pl.col("annotator") == spec.annotator))
    if not ann.height:
        raise RecipeError(f"labels.{spec.name}: no rows for finding '{finding}' annotator "
                          f"'{spec.annotator}' in '{spec.source}' (findings: {findings})")
    if ann["image_id"].n_unique() != ann.height:
        raise RecipeError(f"labels.{spec.name}: several rows per image in '{spec.source}'")
    val = pl.when(pl.col("value") == pl.col("value").round(0)).then(
        pl.col("value").cast(pl.Int64).cast(pl.String)).otherwise(pl.col("value").cast(pl.String))
    text = (pl.when(pl.col("meaning") == "unknown").then(None)
            .otherwise(pl.coalesce(pl.col("category"), val)))
    if not spec.policy:
        return ann.select("image_id", text.alias(spec.name))
    return _with_policy(catalog, spec, ann, text)


def _with_policy(catalog: Catalog, spec: LabelSpec, ann: pl.DataFrame,
                 text: pl.Expr) -> pl.DataFrame:
    """``image_id, <spec.name>`` with the label's code policy (``labels.NAME.policy``):
    exclude -> null, negative -> ``'0'``, positive -> ``'1'``, category -> the meaning. For
    an implicit-negative source a policy on its absent meaning (code_map ``(absent)``, else
    ``not_mentioned``) also labels the covered images that have no row."""
    from medlake.catalog.consensus import ABSENT_MEANING, CodePolicy, policy_key

    pol = CodePolicy(spec.policy)

    def as_text(action: str, name: pl.Expr) -> pl.Expr:
        return {"exclude": pl.lit(None, pl.String), "negative": pl.lit("0"),
                "positive": pl.lit("1")}.get(action, name)

    for k, a in pol.meaning_rules():
        text = pl.when(pl.col("meaning") == k).then(as_text(a, pl.lit(k))).otherwise(text)
    for v, a in pol.value_rules():  # value rules win over meaning rules
        text = pl.when(pl.col("value") == v).then(
            as_text(a, pl.coalesce(pl.col("meaning"), pl.lit(policy_key(v))))).otherwise(text)
    out = ann.select("image_id", text.alias(spec.name))
    esc = spec.source.replace("'", "''")
    src = catalog.read("sources", where=f"source_id = '{esc}'", columns=["negatives", "code_map"])
    if src.height and src["negatives"][0] == "implicit":
        try:
            entry = (json.loads(src["code_map"][0] or "{}") or {}).get("(absent)") or {}
        except ValueError:
            entry = {}
        meaning = entry.get("meaning") or ABSENT_MEANING
        action = pol.as_dict().get(meaning)
        if action is not None:
            cov = catalog.read("coverage", where=f"source_id = '{esc}'", columns=["image_id"])
            missing = cov.unique().join(ann.select("image_id"), on="image_id", how="anti")
            out = pl.concat([out, missing.select(
                "image_id", pl.lit(None, pl.String).alias(spec.name)).with_columns(
                as_text(action, pl.lit(meaning)).alias(spec.name))])
    return out


def label_finding(catalog: Catalog, spec: LabelSpec) -> str:
    """``source/finding`` of a label spec (the source's only finding when none is named)."""
    if spec.finding:
        return f"{spec.source}/{spec.finding}"
    esc = spec.source.replace("'", "''")
    f = catalog.query(f"SELECT DISTINCT finding FROM annotations WHERE source_id = '{esc}'")
    return f"{spec.source}/{f['finding'][0]}" if f.height == 1 else spec.source


def root_members(catalog: Catalog, row: dict[str, Any]) -> pl.DataFrame:
    """``image_id, split`` of a root version: its split scheme's rows, or (a release without
    a scheme) every image of the dataset with a null split."""
    ds = row["dataset_id"].replace("'", "''")
    if row["scheme"]:
        scheme = row["scheme"].replace("'", "''")
        return catalog.read("splits", where=f"dataset_id = '{ds}' AND scheme = '{scheme}'",
                            columns=["image_id", "split"])
    return catalog.read("images", where=f"dataset_id = '{ds}'", columns=["image_id"]).with_columns(
        pl.lit(None, pl.String).alias("split"))


def parent_frame(catalog: Catalog, recipe: Recipe) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The parent version's images: ``image_id, split`` (+ label columns of a derived parent)."""
    v = catalog.read("versions", where=f"name = '{recipe.parent.replace(chr(39), '')}'")
    if not v.height:
        names = catalog.read("versions", columns=["name"])["name"].to_list()
        raise RecipeError(f"{recipe.file}: parent '{recipe.parent}' is not a version of this "
                          f"workspace; known: {sorted(names)} ('medlake versions' lists them)")
    row = v.row(0, named=True)
    if row["dataset_id"] != recipe.dataset:
        raise RecipeError(f"{recipe.file}: parent '{recipe.parent}' is a version of "
                          f"'{row['dataset_id']}', not of '{recipe.dataset}'")
    if row["kind"] == "root":
        f = root_members(catalog, row)
    else:
        from medlake.catalog.versions import load_version

        f = load_version(catalog.ws.versions_dir / row["name"]).drop(
            "native_id", "group_id", "unit", "width", "height", "sha256", "dataset_id", "path",
            strict=False)
        f = f.select([c for c in f.columns if not c.startswith("file")])
    return f.sort("image_id"), row


def fingerprints(catalog: Catalog, files: dict[str, Path],
                 extra: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every input: recipe files and the Parquet files of the tables read
    (``extra``: tables only some recipes read, such as reviews and fingerprints)."""
    out = {f"file:{raw}": sha256_file(p) for raw, p in sorted(files.items())}
    for t in (*INPUT_TABLES, *extra):
        h = hashlib.sha256()
        for f in catalog.tables.files(t):
            if f.parent.name == STAGE:  # our own outputs (other versions' rows) are not inputs
                continue
            h.update(str(f.relative_to(catalog.ws.tables_dir)).encode())
            h.update(sha256_file(f).encode())
        out[f"table:{t}"] = h.hexdigest()
    return out


def apply_rules(catalog: Catalog, recipe: Recipe) -> dict[str, Any]:
    """Everything but the writing: the final frame, lineage rows and evidence for the datasheet."""
    ws = catalog.ws
    files: dict[str, Path] = {}
    for raw in [*recipe.pairs, *[r.params["list"] for r in recipe.rules if r.params.get("list")]]:
        files[raw] = resolve_path(raw, ws_root=ws.root, real_data=ws.real_data_dir(),
                                  key=f"recipes/{recipe.file}")
    parent, prow = parent_frame(catalog, recipe)
    ds = recipe.dataset.replace("'", "''")
    img = catalog.read("images", where=f"dataset_id = '{ds}'", columns=[
        "image_id", "native_id", "group_id", "path", "width", "height", "sha256", "phi_tags"])
    df = parent.join(img, on="image_id", how="left")
    missing = df.filter(pl.col("native_id").is_null())
    if missing.height:
        raise CatalogError(f"parent '{recipe.parent}': {missing.height} images are not in the "
                           f"images table (first: {missing['image_id'][0]}); re-ingest the dataset")
    for spec in recipe.labels:
        if spec.name not in df.columns:
            df = df.join(load_label(catalog, recipe.dataset, spec), on="image_id", how="left")
    q = Quarantine(recipe.dataset, stage=STAGE)
    links = duplicate_links(catalog, recipe.dataset, [files[p] for p in recipe.pairs],
                            use_clusters=recipe.use_clusters, q=q)
    links, lineage = exclude_pairs(catalog, recipe.dataset, links, recipe.exclude_verdicts,
                                   use_clusters=recipe.use_clusters)
    ids = set(df["image_id"].to_list())
    lineage = [r for r in lineage if r["image_id"] in ids]  # only the parent's images
    ctx = Context(catalog, recipe, links, q, files,
                  load_label=lambda s: load_label(catalog, recipe.dataset, s))
    df = df.with_columns(pl.lit(False).alias("removed"))
    has_splits = df["split"].drop_nulls().len() > 0
    before = _leak(df, links) if has_splits else None
    for rule in recipe.rules:
        df, rows = RULE_FUNCS[rule.kind](df, rule, ctx)
        lineage += rows
    touched = {r["image_id"] for r in lineage}
    split_of = dict(zip(df["image_id"].to_list(), df["split"].to_list()))
    for iid in df.filter(~pl.col("image_id").is_in(list(touched)))["image_id"].to_list():
        lineage.append({"image_id": iid, "rule": "parent", "step": 0, "action": "kept",
                        "reason": "untouched by every rule", "from_split": split_of[iid],
                        "to_split": split_of[iid]})
    kept = df.filter(~pl.col("removed"))
    gone = {r["image_id"] for r in lineage if r["action"] in ("removed", "merged")}
    if kept.height + len(gone) != parent.height or gone & set(kept["image_id"].to_list()):
        raise RuntimeError(f"{recipe.name}: {parent.height} parent images but {kept.height} kept "
                           f"+ {len(gone)} removed (a medlake bug: an image was lost)")
    after = _leak(kept, links) if kept["split"].drop_nulls().len() else None
    return {"df": kept, "parent": parent, "prow": prow, "lineage": lineage, "files": files,
            "links": links, "quarantine": q, "leak_before": before, "leak_after": after}


def _leak(df: pl.DataFrame, links: pl.DataFrame) -> dict[str, Any]:
    u = units(df.select("image_id", "group_id"), links).join(df.select("image_id", "split"),
                                                             on="image_id")
    return next(r for r in leakage_rows(u) if r["split_a"] == "*")


def run(catalog: Catalog, recipe: str | Path, *, processes: int = 1) -> MaterializeResult:
    """Materialise ``recipe`` into ``lake/versions/<name>/`` and the lineage/versions tables.

    Parameters
    ----------
    recipe
        A recipe name (``recipes/NAME.yaml``) or a path to a YAML file.
    processes
        Worker processes for resizing.

    Returns
    -------
    MaterializeResult

    Raises
    ------
    RecipeError
        Bad recipe, unknown parent, source or file.
    CatalogError
        Missing tables or image files. Nothing is written then: the previous version folder
        and tables stay as they were.

    Example
    -------
    >>> run(cat, "ham10000-corrected").summary()  # doctest: +SKIP
    """
    ws = catalog.ws
    rec = load_recipe(recipe_path(ws.root, recipe))
    if not catalog.image_ids(rec.dataset).height:
        return _skip(catalog, rec.name, rec.dataset, f"dataset '{rec.dataset}' has no images in this "
                     "workspace (its public metadata was not found at params.yaml real_data)")
    st = apply_rules(catalog, rec)
    kept, lineage = st["df"], st["lineage"]
    labels = rec.label_names()
    dsrow = catalog.read("datasets", where=f"dataset_id = '{rec.dataset.replace(chr(39), '')}'")
    dsinfo = dsrow.row(0, named=True) if dsrow.height else {"dataset_id": rec.dataset}
    root = dsinfo.get("images_root")
    images_root = None
    if root and rec.export.images:
        from medlake.catalog.paths import images_root as resolve_root

        images_root = resolve_root(ws.root, root)  # inside the workspace, or an error
    kinds = {r.kind for r in rec.rules}
    extra = (("reviews",) if rec.exclude_verdicts or "relabel_from_reviews" in kinds else ()) + (
        ("fingerprints",) if "drop_quality" in kinds else ())
    inputs = fingerprints(catalog, st["files"], extra)
    u = units(kept.select("image_id", "group_id"), st["links"]).select("image_id", "unit")
    manifest = (kept.join(u, on="image_id").with_columns(pl.lit(rec.dataset).alias("dataset_id"))
                .select("image_id", "native_id", "dataset_id", "split", *labels, "group_id", "unit",
                        "width", "height", "sha256", "path").sort("image_id"))
    final = ws.versions_dir / rec.name
    lin = conform("lineage", pl.DataFrame(
        [{"version": rec.name, **r} for r in lineage],
        schema_overrides={k: pl.String for k in ("from_split", "to_split", "old_value", "new_value",
                                                 "into", "label", "evidence")},
        infer_schema_length=None).sort("image_id", "step"))
    # the folder and its lineage/versions/quarantine rows are one commit: readers (and a
    # kill at any moment) see both old or both new
    tx = catalog.transaction()
    with export.atomic_dir(final, tx=tx) as tmp:
        manifest, fstats = export.write_files(
            manifest, out=tmp, images_root=images_root, label=rec.export.npz or (labels[0] if labels else None),
            sizes=rec.export.sizes if images_root else (), layout=rec.export.layout,
            processes=processes)
        if rec.export.npz and images_root:
            export.write_npz(manifest, out=tmp, name=rec.name, label=rec.export.npz,
                             sizes=rec.export.sizes)
        if rec.export.pack and images_root:
            packed = shards.pack(tmp, ["images", *[f"images_{s}" for s in rec.export.sizes]],
                                 shard_mb=rec.export.shard_mb)
            fstats = {**fstats, "packed": packed.files, "shards": packed.shards}
        at = manifest.drop("path").to_arrow()
        srcs = {s.name: label_finding(catalog, s) for s in rec.labels}
        write_parquet_atomic(at.replace_schema_metadata(manifest_metadata(rec.name, srcs)),
                             tmp / "manifest.parquet")
        write_parquet_atomic(lin, tmp / "lineage.parquet")
        ids = manifest["image_id"].implode()
        ann = catalog.read("annotations", where=f"image_id LIKE '{rec.dataset}:%'").filter(
            pl.col("image_id").is_in(ids)).sort("image_id", "source_id", "annotator", "finding")
        write_parquet_atomic(conform("annotations", ann), tmp / "annotations.parquet")
        meta = {"name": rec.name, "dataset": rec.dataset, "parent": rec.parent,
                "recipe": rec.content, "recipe_hash": rec.hash, "inputs": inputs,
                "manifest_schema": MANIFEST_SCHEMA_VERSION, "medlake_version": __version__}
        (tmp / "version.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        info = datasheet_info(catalog, rec, manifest, st, dsinfo, bool(images_root), inputs)
        from medlake.catalog.versions import render_datasheet

        (tmp / "DATASHEET.md").write_text(render_datasheet(info))
        from medlake.pipelines import croissant  # croissant.json: Croissant 1.0 + RAI fields

        croissant.write(tmp, catalog, info=info, quarantined=st["quarantine"].count())
    counts = info["counts"]
    row = {"name": rec.name, "dataset_id": rec.dataset, "parent": rec.parent, "kind": "derived",
           "scheme": rec.name, "recipe": f"recipes/{rec.file}", "recipe_hash": rec.hash,
           "params": json.dumps(rec.content, sort_keys=True), "inputs": json.dumps(inputs, sort_keys=True),
           # no commit or wall-clock time in a DVC-tracked table: both would change the output
           # on every run; 'medlake publish' records them in the git tag instead
           "git_commit": None, "medlake_version": __version__,
           "created_at": None, "n_images": manifest.height,
           "counts": json.dumps({"split": counts, "label": info["label_totals"]}, sort_keys=True),
           "path": f"lake/versions/{rec.name}"}
    q = st["quarantine"]
    with tx:
        tx.write("lineage", lin, stage=STAGE, partition=rec.name)
        tx.write("versions", [row], stage=STAGE, partition=rec.name)
        # always written (possibly empty): dvc.yaml declares it as an output
        tx.write("quarantine", q.frame(), stage=STAGE, partition=rec.name)
    actions = pl.from_arrow(lin.select(["action"])).group_by("action").len()
    return MaterializeResult(
        name=rec.name, path=final, n_parent=st["parent"].height, n_kept=manifest.height,
        counts=counts, actions=dict(actions.iter_rows()), files=fstats, quarantined=q.count())


def _skip(catalog: Catalog, name: str, dataset_id: str, why: str) -> MaterializeResult:
    """Write an explicit 'skipped' version (DVC needs every declared output) and say why.

    The folder holds only SKIPPED.md; the lineage and versions partitions are empty, and the
    quarantine partition carries one row with the reason, so nothing is silently missing.
    """
    dest = catalog.ws.versions_dir / name
    tx = catalog.transaction()  # the folder and the rows: one commit
    with export.atomic_dir(dest, tx=tx) as tmp:
        (tmp / "SKIPPED.md").write_text(f"# {name}: not materialised\n\n{why}.\n")
    with tx:
        tx.write("lineage", pl.DataFrame(schema={"version": pl.String, "image_id": pl.String,
                                                  "rule": pl.String}),
                 stage="materialize", partition=name)
        tx.write("versions", pl.DataFrame(schema={"name": pl.String}), stage="materialize",
                 partition=name)
        tx.write("quarantine", [{"stage": "materialize", "dataset_id": dataset_id, "file": f"{name}.yaml",
                                 "row": 0, "item": name, "reason": f"skipped: {why}"}],
                 stage="materialize", partition=name)
    log.warning("recipe %s skipped: %s", name, why)
    return MaterializeResult(name=name, path=dest, n_parent=0, n_kept=0, counts={},
                             actions={"skipped": 1}, files={}, quarantined=1, skipped=why)


def run_all(catalog: Catalog, *, processes: int = 1) -> list[MaterializeResult]:
    """Materialise every ``recipes/*.yaml`` of the workspace, in name order."""
    return [run(catalog, p, processes=processes)
            for p in sorted(catalog.ws.recipes_dir.glob("*.yaml"))]


@dataclass(frozen=True)
class Params:
    """``params.yaml: materialize``."""

    processes: int = param(1, "worker processes for resizing images", min=1)
    recipes: list[str] = param(factory=list, help="recipes/NAME.yaml in the pipeline, in order "
                               "('medlake materialize NAME' adds NAME)", cli=False)


@dataclass(frozen=True)
class MaterializeRun:
    """What one ``medlake materialize`` call built."""

    results: tuple[MaterializeResult, ...]
    root: Path

    def summary(self) -> str:
        lines = []
        for r in self.results:
            lines += [r.summary(), f"  -> {r.path.relative_to(self.root) if r.path.is_relative_to(self.root) else r.path}"]
        return "\n".join(lines)


def run_stage(catalog: Catalog, params: Params | dict[str, Any] | None = None, *,
              recipe: str | None = None, all_: bool = False,
              echo: Any = log.info) -> MaterializeRun:
    """The stage's entry (``medlake materialize``); a recipe under ``recipes/`` that the
    pipeline does not list yet is added to ``params.yaml: materialize.recipes`` and the
    pipeline, so ``dvc repro`` reproduces it."""
    prm = DECLARATION.load_params(catalog, params)
    if all_ and recipe:
        raise UsageProblem("Use either RECIPE or --all, not both")
    if not all_ and not recipe:
        raise UsageProblem("Give RECIPE (a name under recipes/ or a YAML path) or --all")
    if all_:
        return MaterializeRun(tuple(run_all(catalog, processes=prm.processes)), catalog.ws.root)
    res = run(catalog, recipe, processes=prm.processes)
    from medlake.pipelines import workspace_pipeline as wp

    wp.record_recipe(catalog.ws, res.name, echo=echo)
    return MaterializeRun((res,), catalog.ws.root)


def _options() -> tuple[Any, ...]:
    import click

    return (click.argument("recipe", required=False),
            click.option("--all", "all_", is_flag=True, help="Materialise every recipes/*.yaml."))


DECLARATION = Stage(
    name=STAGE, params=Params, run=run_stage, foreach="recipes",
    reads=("images", "annotations", "sources", "findings", "splits", "versions", "leakage",
           "clusters", "pairs", "outliers", "fingerprints"),
    writes=("lineage", "versions", "quarantine"),
    help="Write lake/versions/NAME/ from recipes/RECIPE.yaml (or a YAML path), atomically.\n\n"
         "The folder holds manifest.parquet, lineage.parquet, annotations.parquet, "
         "DATASHEET.md and the images; the lineage and versions tables get the version's rows.",
    options=_options(), extra_params=("real_data",),
    example="medlake materialize ham10000-corrected",
)


if __name__ == "__main__":  # pragma: no cover
    from medlake.cli.main import run_stage

    run_stage("materialize")
