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
from typing import Any, Literal

import polars as pl

from medlake.catalog import Catalog, CatalogError, conform, spec
from medlake.catalog.consensus import BinariseRule, derive_source
from medlake.catalog.params import ParamsError, defaults, load, param, to_dict
from medlake.pipelines.stage import Stage
from medlake.pipelines import _agreement_labels as al
from medlake.pipelines import _agreement_pairs as ap
from medlake.pipelines import _agreement_policy as apol
from medlake.pipelines._agreement_stats import group_stats, multi_stats, prevalence_rows

log = logging.getLogger(__name__)
STAGE = "agreement"


@dataclass(frozen=True)
class Reference:
    """A (test, reference) source pair: PPV/NPV/sensitivity/specificity of test against it."""

    test: str = param(help="source id taken as the test")
    reference: str = param(help="source id taken as the truth")


@dataclass(frozen=True)
class Binarise:
    """How graded values in [0, 1] become binary."""

    threshold: float = param(0.5, "value >= threshold is positive", min=0, max=1)
    middle: float | None = param(0.5, "a value that is mapped by middle_as (null: none)",
                                 min=0, max=1)
    middle_as: Literal["positive", "negative", "uncertain", "exclude"] = param(
        "exclude", "what the middle value becomes")


@dataclass(frozen=True)
class Consensus:
    """A consensus rule over one multi-annotator source: a derived source."""

    source: str = param(help="source id with several annotators")
    rule: Literal["all_certain_agree", "majority", "any_positive"] = param("majority", "the rule")
    name: str | None = param(None, "derived source name (default: <source name>_<rule>)")
    binarise: Binarise | None = param(None, "binarisation for this rule (default: binarise)")


@dataclass(frozen=True)
class AnnotationSubgroup:
    """Subgroups by another source's label (yes / no / its meaning)."""

    source: str = param(help="source id")
    finding: str = param(help="the source's finding name")


@dataclass(frozen=True)
class Combined:
    """A shared finding that one source labels once and another as several parts (OR)."""

    finding: str = param(help="shared finding name")
    of: list[str] = param(factory=list, help="shared names of the parts")


@dataclass(frozen=True)
class Params:
    """``params.yaml: agreement``."""

    datasets: list[str] = param(factory=list, help="datasets to compare (empty: every dataset "
                                "with label sources)")
    references: list[Reference] = param(factory=list, help="which side is the truth for PPV")
    binarise: Binarise = param(factory=Binarise, help="graded -> binary")
    consensus: list[Consensus] = param(factory=list, help="consensus rules (derived sources)")
    subgroups: list[str] = param(factory=lambda: ["view", "sex", "age_band", "site"],
                                 help="images columns to split by (age_band from age_bands)")
    annotation_subgroups: list[AnnotationSubgroup] = param(
        factory=list, help="split by another source's label")
    age_bands: list[float] = param(factory=lambda: [0, 20, 40, 60, 80, 200],
                                   help="age band edges (years)", min=0)
    combined: list[Combined] = param(
        factory=lambda: [Combined("nodule_or_mass", ["nodule", "mass"])],
        help="findings compared as the OR of their parts")

    def check(self) -> str | None:
        if list(self.age_bands) != sorted(self.age_bands):
            return f"age_bands must be increasing, found {list(self.age_bands)}"
        return None


# keys validated by their own modules (e.g. pipelines/_agreement_policy.py), raw values
EXTRA_DEFAULTS: dict[str, Any] = {
    "policies": {}, "pooled": [], "kappa_ci": "clip", "positive_only_categories": "skip"}
DEFAULTS: dict[str, Any] = {**defaults(Params), **EXTRA_DEFAULTS}
ANN_COLS = ["image_id", "source_id", "annotator", "finding", "value", "category", "meaning"]


@dataclass(frozen=True)
class AgreementResult:
    """What one run wrote: agreement rows per dataset, derived sources, the plot, seconds."""

    rows: dict[str, int]
    derived: tuple[str, ...]
    plot: Path | None
    seconds: float

    def summary(self) -> str:
        # the per-dataset lines were printed as progress already
        n = len(self.rows)
        lines = [f"agreement: {sum(self.rows.values()):,} rows for {n} dataset{'s' * (n != 1)}"]
        if self.derived:
            lines.append(f"derived sources: {', '.join(self.derived)}")
        if self.plot:
            lines.append(f"plot: {self.plot}")
        lines.append(f"agreement done in {self.seconds:.2f} s")
        return "\n".join(lines)


def settings(catalog: Catalog, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``params.yaml: agreement`` merged over :data:`DEFAULTS` (and ``overrides``)."""
    raw = catalog.ws.params().get("agreement")
    return resolve_settings(raw, overrides, file=catalog.ws.params_file.name)


def resolve_settings(raw: Any, overrides: dict[str, Any] | None = None, *,
                     file: str = "params.yaml") -> dict[str, Any]:
    """Validate an ``agreement`` block (:class:`Params`, plus :data:`EXTRA_DEFAULTS` keys) and
    apply ``overrides``; plain values as the stage uses them."""
    if isinstance(raw, Params):
        raw = to_dict(raw)
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{file}: agreement: found {raw!r}; allowed: a mapping")
    raw = {**(raw or {}), **(overrides or {})}
    extra = {k: raw.pop(k) for k in list(raw) if k in EXTRA_DEFAULTS}
    return {**to_dict(load(Params, raw, file=file, key="agreement")), **EXTRA_DEFAULTS, **extra}


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
    choices = apol.parse(cfg)
    derived: dict[str, list[pl.DataFrame]] = {}
    for cons in cfg.get("consensus") or []:
        if not str(cons.get("source", "")).startswith(dataset_id + ":"):
            continue
        d = derive_source(
            src, ann, fnd, source_id=cons["source"], rule=cons.get("rule", "majority"),
            binarise=BinariseRule.from_params(cons.get("binarise") or cfg.get("binarise")),
            name=cons.get("name"), policy=apol.consensus_policy(choices, cons["source"], fnd),
        )
        for k, v in d.items():
            derived.setdefault(k, []).append(v)
    dtabs = {k: pl.concat(v, how="vertical_relaxed") for k, v in derived.items()}
    if dtabs:
        src = pl.concat([src, dtabs["sources"]], how="diagonal_relaxed")
        ann = pl.concat([ann, dtabs["annotations"]], how="diagonal_relaxed")
        fnd = pl.concat([fnd, dtabs["findings"]], how="diagonal_relaxed")
        cov = pl.concat([cov, dtabs["coverage"]], how="diagonal_relaxed")
    tabs, dtabs = apol.add_pooled(choices, dataset_id, {"sources": src, "annotations": ann,
                                                         "findings": fnd, "coverage": cov}, dtabs)
    src, ann, fnd, cov = tabs["sources"], tabs["annotations"], tabs["findings"], tabs["coverage"]
    resolved = apol.resolve(choices, src, fnd, dataset_id, br)
    labels = al.rater_labels(ann, src, fnd, br, resolved)
    if labels.height == 0:
        return pl.from_arrow(spec("agreement").schema.empty_table()), dtabs  # type: ignore[return-value]
    absent, absent_f = resolved.absent(al.absent_codes(src))
    labels, fnd = al.combine_findings(labels, fnd, al.parse_combined(cfg.get("combined")), absent)
    labels, made = al.densify_annotators(labels, cov, fnd, absent, absent_f)
    if made:  # several readers, implicit negatives: now explicit rows
        src = src.with_columns(pl.when(pl.col("source_id").is_in(list(made)))
                               .then(pl.lit("explicit")).otherwise(pl.col("negatives"))
                               .alias("negatives"))
    rows, meta, no_overlap = ap.source_pairs(
        labels, src, cov, fnd, absent, absent_by_finding=absent_f,
        skip=apol.pool_skips(choices, resolved, dataset_id),
        compare_categories=choices.positive_only_categories == "compare")
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
                    categories=al.category_names(labels), ci=choices.kappa_ci,
                    code_names={c: n for n, c in resolved.categories.items()}),
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
        out = apol.with_policy_column(out, resolved)
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
                            for c in cfg.get("consensus") or []) or any(
            p.dataset_id == ds for p in apol.parse(cfg).pooled):
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
    choices = apol.parse(cfg)  # bad policies, pools or choices fail before any read
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
        by_label |= any(s.startswith(ds + ":") for s in choices.policies.sources())  # and policies
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
            "; " + apol.explain_empty(tables["sources"].filter(pl.col("dataset_id") == ds),
                                      tables["findings"], tables["annotations"], choices))
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


def run_stage(catalog: Catalog, params: Params | dict[str, Any] | None = None, *,
              dataset: str | None = None, plot: Path | None = None, no_subgroups: bool = False,
              show: int = 20, echo: Callable[[str], None] = log.info) -> AgreementResult:
    """The stage's entry (``medlake agreement``): :func:`run` with the calling convention."""
    extra = {"subgroups": [], "annotation_subgroups": []} if no_subgroups else {}
    if params is not None:
        extra = {**(to_dict(params) if isinstance(params, Params) else dict(params)), **extra}
    res = run(catalog, dataset, plot=plot, echo=echo, **extra)
    if show:
        from medlake.catalog import render

        df = catalog.read("agreement").filter(pl.col("subgroup") == "")
        if dataset:
            df = df.filter(pl.col("dataset_id") == dataset)
        df = df.filter(pl.col("kind") != "prevalence").sort("n_shared", descending=True)
        cols = ["finding", "source_a", "annotator_a", "source_b", "annotator_b", "n_shared",
                "kappa", "kappa_lo", "kappa_hi", "ppv", "pos_confirmed", "fleiss", "alpha"]
        echo(render(df.select(cols).head(show).to_arrow(), "table", max_rows=show))
    return res


def _options() -> tuple[Any, ...]:
    import click

    return (
        click.argument("dataset", required=False),
        click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Write a PNG: kappa heatmap per finding (n shared in each cell) and a "
                          "forest plot of PPV with Wilson intervals."),
        click.option("--no-subgroups", is_flag=True,
                     help="Skip the per-subgroup rows (params.yaml agreement.subgroups)."),
        click.option("--show", "show", type=int, default=20, show_default=True,
                     help="Print this many overall rows of the result (0: none)."),
    )


DECLARATION = Stage(
    name=STAGE, params=Params, run=run_stage,
    reads=("annotations", "sources", "findings", "coverage", "images"),
    writes=("agreement", "sources", "annotations", "coverage", "findings"),
    help="Compare label sources and annotators of DATASET (default: every dataset).\n\n"
         "Writes the agreement table (kappa with 95% CI, weighted kappas, off-by-one, Fleiss' "
         "kappa, Krippendorff's alpha, PPV/NPV/sensitivity/specificity against the references "
         "in params.yaml, prevalence where sources share no image) and the derived consensus "
         "sources. Query it with 'medlake sql \"SELECT * FROM agreement\"' and the "
         "discrepancies view.",
    options=_options(), dvc_args="--show 0", example="medlake agreement padchest --plot kappa.png",
    check_block=resolve_settings,
)


if __name__ == "__main__":  # pragma: no cover
    from medlake.cli.main import run_stage

    run_stage("agreement")
