"""Stage ``agreement``: how well label sources (and annotators) agree, per finding and subgroup.

Reads ``sources, annotations, findings, coverage, images``; writes the ``agreement`` table
(one partition per dataset) and, for each consensus rule in ``params.yaml: agreement.consensus``,
a ``derived`` source (``sources, annotations, coverage, findings`` under stage ``agreement``),
all in one transaction per dataset. See docs/ARCHITECTURE.md for the columns.

Run as ``medlake agreement [DATASET] [--plot out.png]`` or ``python -m medlake.pipelines.agreement``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from medlake.catalog import Catalog, CatalogError, conform, spec
from medlake.catalog.consensus import BinariseRule, derive_source
from medlake.pipelines import _agreement_labels as al
from medlake.pipelines import _agreement_pairs as ap
from medlake.pipelines._agreement_stats import group_stats, multi_stats, prevalence_rows

log = logging.getLogger(__name__)
STAGE = "agreement"
DEFAULTS: dict[str, Any] = {
    "datasets": [], "references": [], "binarise": {}, "consensus": [],
    "subgroups": ["view", "sex", "age_band", "site"], "annotation_subgroups": [],
    "age_bands": [0, 20, 40, 60, 80, 200],
    "combined": [{"finding": "nodule_or_mass", "of": ["nodule", "mass"]}],
}
ANN_COLS = ["image_id", "source_id", "annotator", "finding", "value", "category", "meaning"]


@dataclass(frozen=True)
class AgreementResult:
    """What one run wrote: agreement rows per dataset, derived sources, the plot, seconds."""

    rows: dict[str, int]
    derived: tuple[str, ...]
    plot: Path | None
    seconds: float

    def summary(self) -> str:
        lines = [f"{ds}: {n:,} agreement rows" for ds, n in self.rows.items()]
        if self.derived:
            lines.append(f"derived sources: {', '.join(self.derived)}")
        if self.plot:
            lines.append(f"plot: {self.plot}")
        lines.append(f"agreement done in {self.seconds:.2f} s")
        return "\n".join(lines)


def settings(catalog: Catalog, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``params.yaml: agreement`` merged over :data:`DEFAULTS` (and ``overrides``)."""
    p = catalog.ws.param("agreement") or {}
    if not isinstance(p, dict):
        raise CatalogError("params.yaml: 'agreement' must be a mapping (see docs/ARCHITECTURE.md)")
    unknown = set(p) - set(DEFAULTS)
    if unknown:
        raise CatalogError(
            f"params.yaml agreement: unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **p, **(overrides or {})}


def compute(
    tables: dict[str, pl.DataFrame], dataset_id: str, cfg: dict[str, Any]
) -> tuple[pl.DataFrame, dict[str, pl.DataFrame]]:
    """The agreement rows of one dataset from in-memory tables (no I/O).

    Parameters
    ----------
    tables
        ``sources, annotations, findings, coverage, images`` of (at least) the dataset.
    cfg
        As returned by :func:`settings`.

    Returns
    -------
    (agreement, derived)
        The ``agreement`` frame (conformed to its schema) and the derived-source tables.
    """
    src = tables["sources"].filter(pl.col("dataset_id") == dataset_id)
    ids = src["source_id"].implode()
    ann = tables["annotations"].filter(pl.col("source_id").is_in(ids))
    fnd = tables["findings"].filter(pl.col("source_id").is_in(ids))
    cov = tables["coverage"].filter(pl.col("source_id").is_in(ids))
    br = BinariseRule.from_params(cfg.get("binarise"))
    derived: dict[str, list[pl.DataFrame]] = {}
    for cons in cfg.get("consensus") or []:
        if not str(cons.get("source", "")).startswith(dataset_id + ":"):
            continue
        d = derive_source(
            src, ann, fnd, source_id=cons["source"], rule=cons.get("rule", "majority"),
            binarise=BinariseRule.from_params(cons.get("binarise") or cfg.get("binarise")),
            name=cons.get("name"),
        )
        for k, v in d.items():
            derived.setdefault(k, []).append(v)
    dtabs = {k: pl.concat(v, how="vertical_relaxed") for k, v in derived.items()}
    if dtabs:
        src = pl.concat([src, dtabs["sources"]], how="diagonal_relaxed")
        ann = pl.concat([ann, dtabs["annotations"]], how="diagonal_relaxed")
        fnd = pl.concat([fnd, dtabs["findings"]], how="diagonal_relaxed")
        cov = pl.concat([cov, dtabs["coverage"]], how="diagonal_relaxed")
    labels = al.rater_labels(ann, src, fnd, br)
    if labels.height == 0:
        return pl.from_arrow(spec("agreement").schema.empty_table()), dtabs  # type: ignore[return-value]
    absent = al.absent_codes(src)
    labels, fnd = al.combine_findings(labels, fnd, al.parse_combined(cfg.get("combined")), absent)
    labels, made = al.densify_annotators(labels, cov, fnd, absent)
    if made:  # several readers, implicit negatives: now explicit rows
        src = src.with_columns(pl.when(pl.col("source_id").is_in(list(made)))
                               .then(pl.lit("explicit")).otherwise(pl.col("negatives"))
                               .alias("negatives"))
    rows, meta, no_overlap = ap.source_pairs(labels, src, cov, fnd, absent)
    images = tables["images"].filter(pl.col("dataset_id") == dataset_id)
    meaning = pl.col("meaning") if "meaning" in ann.columns else pl.lit(None, pl.String)
    ann_codes = ann.select("image_id", "source_id", pl.col("finding").alias("finding_own"),
                           "value", meaning.alias("meaning"))
    sub = ap.subgroup_values(
        images, ann_codes, columns=list(cfg["subgroups"]), bands=[float(b) for b in cfg["age_bands"]],
        annotation_specs=[s for s in cfg["annotation_subgroups"]
                          if str(s.get("source", "")).startswith(dataset_id + ":")],
    )
    sgmeta = pl.concat([
        pl.DataFrame({"subgroup": [""], "subgroup_value": [""]}),
        sub.select("subgroup", "subgroup_value").unique().sort(["subgroup", "subgroup_value"]),
    ]).with_row_index("sg").with_columns(pl.col("sg").cast(pl.Int64))
    sub = sub.join(sgmeta, on=["subgroup", "subgroup_value"]).select("img", "sg")
    refs = {(r["test"], r["reference"]) for r in cfg.get("references") or []}
    mrows, mmeta = ap.multi_rater_items(labels, src)
    parts = [
        group_stats(ap.with_subgroups(rows, sub), meta, sgmeta, references=refs,
                    categories=al.category_names(labels)),
        multi_stats(ap.with_subgroups(mrows, sub), mmeta, sgmeta) if mrows.height else pl.DataFrame(),
        prevalence_rows(labels, cov, no_overlap, sub, sgmeta),
    ]
    out = pl.concat([p for p in parts if p.height], how="diagonal_relaxed") if any(
        p.height for p in parts) else pl.DataFrame()
    if out.height:
        sizes = sub.group_by("sg").agg(pl.len().alias("n_subgroup")).join(sgmeta, on="sg").drop("sg")
        out = out.join(sizes, on=["subgroup", "subgroup_value"], how="left").with_columns(
            pl.when(pl.col("subgroup") == "").then(pl.lit(images.height))
            .otherwise(pl.col("n_subgroup")).alias("n_subgroup"),
            pl.lit(dataset_id).alias("dataset_id"),
            pl.col("source_a").replace_strict(
                dict(zip(src["source_id"], src["rule"].fill_null(""))), default=None
            ).alias("rule"),
        ).sort(["finding", "kind", "source_a", "annotator_a", "source_b", "annotator_b",
                "subgroup", "subgroup_value"])
    if not out.height:  # e.g. only category-valued sources: nothing comparable
        return pl.from_arrow(spec("agreement").schema.empty_table()), dtabs  # type: ignore[return-value]
    return pl.from_arrow(conform("agreement", out)), dtabs  # type: ignore[return-value]


def _read(
    catalog: Catalog, table: str, column: str, values: list[str], columns: list[str] | None = None,
) -> pl.DataFrame:
    """Rows of ``table`` whose ``column`` is in ``values``: one ``Catalog.read`` per value, an
    equality filter with explicit columns, which the catalog answers with a pruned Polars
    scan (several times cheaper than DuckDB for the 675k VinDr reader rows)."""
    cols = columns or spec(table).schema.names
    frames = [catalog.read(table, where=f"{column} = '{v.replace(chr(39), chr(39) * 2)}'",
                           columns=cols) for v in values]
    return pl.concat(frames, how="vertical_relaxed") if frames else catalog.read(table, columns=cols)


def _single_reader(catalog: Catalog, ids: list[str], ds: str, cfg: dict[str, Any]) -> bool:
    """True when a dataset has one label source with one reader and no consensus rule: no
    pair exists, so its (possibly millions of) annotation rows need not be read."""
    if len(ids) != 1 or any(str(c.get("source", "")).startswith(ds + ":")
                            for c in cfg.get("consensus") or []):
        return False
    return _read(catalog, "annotations", "source_id", ids, ["annotator"])["annotator"].n_unique() < 2


def run(
    catalog: Catalog, dataset_id: str | None = None, *, plot: Path | str | None = None,
    echo: Callable[[str], None] = log.info, **overrides: Any,
) -> AgreementResult:
    """Compute and write the agreement table (and derived sources) for one or all datasets.

    Parameters
    ----------
    dataset_id
        One dataset, or None for ``params.yaml: agreement.datasets`` (default: every dataset
        with at least one label source).
    plot
        Where to write a PNG: a kappa heatmap per finding and a forest plot of PPV.
    echo
        Progress messages (one per dataset).
    overrides
        Keys of ``params.yaml: agreement`` to override for this run.

    Returns
    -------
    AgreementResult

    Raises
    ------
    MissingTableError
        When nothing has been ingested yet.
    CatalogError
        For an unknown dataset or bad settings.
    """
    t0 = time.perf_counter()
    cfg = settings(catalog, overrides)
    tables = {n: catalog.read(n, required=True, hint="run 'medlake ingest' first")
              for n in ("sources", "findings")}
    known = sorted(set(tables["sources"]["dataset_id"].to_list()))
    todo = [dataset_id] if dataset_id else (list(cfg["datasets"]) or known)
    for ds in todo:
        if ds not in known:
            raise CatalogError(
                f"dataset '{ds}' has no label sources in this workspace (known: "
                f"{', '.join(known) or 'none'}); ingest it first with 'medlake ingest'")
    # derived sources are this stage's own output: recompute them, never read them back
    derived_ids = tables["sources"].filter(pl.col("kind") == "derived")["source_id"].implode()
    for n in ("sources", "findings"):
        tables[n] = tables[n].filter(~pl.col("source_id").is_in(derived_ids))
    img_cols = {"image_id", "dataset_id", "age", *cfg["subgroups"]} & set(spec("images").schema.names)
    rows: dict[str, int] = {}
    derived: list[str] = []
    frames = []
    for i, ds in enumerate(todo, 1):
        t = time.perf_counter()
        ids = tables["sources"].filter(pl.col("dataset_id") == ds)["source_id"].to_list()
        by_label = any(str(a.get("source", "")).startswith(ds + ":")
                       for a in cfg["annotation_subgroups"])  # only they need 'meaning'
        if _single_reader(catalog, ids, ds, cfg):  # e.g. CheXpert: nothing to compare, no reads
            agr, dtabs = pl.from_arrow(spec("agreement").schema.empty_table()), {}
        else:
            tables["annotations"] = _read(catalog, "annotations", "source_id", ids,
                                          ANN_COLS if by_label else ANN_COLS[:-1])
            tables["coverage"] = _read(catalog, "coverage", "source_id", ids)
            tables["images"] = _read(catalog, "images", "dataset_id", [ds], sorted(img_cols))
            agr, dtabs = compute(tables, ds, cfg)
        with catalog.transaction() as tx:
            tx.write("agreement", agr, stage=STAGE, partition=ds)
            for name in ("sources", "annotations", "coverage", "findings"):
                if name in dtabs:
                    tx.write(name, dtabs[name], stage=STAGE, partition=ds)
                else:
                    tx.delete(name, stage=STAGE, partition=ds)
        rows[ds] = agr.height
        frames.append(agr)
        derived += dtabs["sources"]["source_id"].to_list() if "sources" in dtabs else []
        why = "" if agr.height else (
            f"; {len(ids)} label source, nothing to compare" if len(ids) < 2 else
            "; no two sources share a finding of the same value type")
        echo(f"[{i}/{len(todo)}] {ds}: {agr.height:,} agreement rows "
             f"({time.perf_counter() - t:.2f} s{why})")
    for name in ("sources", "annotations", "coverage", "findings"):
        if not catalog.tables.files(name, stage=STAGE):  # keep the DVC output folder present
            catalog.write(name, spec(name).schema.empty_table(), stage=STAGE, partition="empty")
    out = None
    if plot:
        from medlake.pipelines._agreement_plot import plot_agreement

        out = plot_agreement(pl.concat(frames, how="vertical_relaxed"), Path(plot))
    return AgreementResult(rows, tuple(derived), out, time.perf_counter() - t0)


if __name__ == "__main__":  # pragma: no cover
    from medlake.cli.main import run_stage

    run_stage("agreement")
