"""Binarisation of graded labels and consensus of several annotators, as a derived source.

Graded answers (e.g. the purrlab tube grades 0, 0.25, 0.5, 0.75, 1 or INVALID) become codes
with a :class:`BinariseRule`: a threshold, and what the middle value means (positive,
negative, an ``uncertain`` category of its own, or excluded). Several annotators' codes become
one label per (image, finding) with a consensus rule:

``all_certain_agree``  every annotator gave a certain answer and they all agree; else none
``majority``           more than half of the annotators with a usable answer agree; else none
``any_positive``       positive if anyone says positive; negative when all usable answers
                       are negative; else none

The result is a ``derived`` source whose ``rule`` column records both rules, so it can be
compared with any other source.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

import polars as pl

from medlake.catalog.errors import CatalogError

MiddleAs = Literal["positive", "negative", "uncertain", "exclude"]
Rule = Literal["all_certain_agree", "majority", "any_positive"]
RULES: tuple[str, ...] = ("all_certain_agree", "majority", "any_positive")
UNCERTAIN = 2  # the code of the "uncertain" category when middle_as == "uncertain"


@dataclass(frozen=True)
class BinariseRule:
    """How a graded value in [0, 1] becomes 1 (positive), 0 (negative), 2 (uncertain) or null.

    ``value == middle`` is mapped by ``middle_as``; otherwise ``value >= threshold`` is
    positive. Invalid answers (null value) are always excluded.
    """

    threshold: float = 0.5
    middle: float | None = 0.5
    middle_as: MiddleAs = "exclude"

    def __post_init__(self) -> None:
        if self.middle_as not in ("positive", "negative", "uncertain", "exclude"):
            raise CatalogError(
                f"binarise middle_as must be positive, negative, uncertain or exclude, "
                f"not '{self.middle_as}' (params.yaml: agreement.binarise)"
            )

    @classmethod
    def from_params(cls, p: dict[str, Any] | None) -> BinariseRule:
        """From a ``params.yaml`` mapping such as ``{threshold: 0.5, middle_as: exclude}``."""
        p = dict(p or {})
        unknown = set(p) - {"threshold", "middle", "middle_as"}
        if unknown:
            raise CatalogError(
                f"params.yaml agreement.binarise: unknown keys {sorted(unknown)}; "
                "use threshold, middle and middle_as"
            )
        return cls(**p)

    def describe(self) -> str:
        mid = "" if self.middle is None else f"; value {self.middle:g} -> {self.middle_as}"
        return f">= {self.threshold:g} positive{mid}; invalid excluded"

    def expr(self, value: pl.Expr) -> pl.Expr:
        """The Int8 code of ``value`` (null when excluded)."""
        mid_code = {"positive": 1, "negative": 0, "uncertain": UNCERTAIN, "exclude": None}[self.middle_as]
        base = pl.when(value >= self.threshold).then(pl.lit(1, pl.Int8)).otherwise(pl.lit(0, pl.Int8))
        if self.middle is None:
            out = base
        else:
            out = pl.when(value == self.middle).then(pl.lit(mid_code, pl.Int8)).otherwise(base)
        return pl.when(value.is_null()).then(pl.lit(None, pl.Int8)).otherwise(out)


def consensus(
    ann: pl.DataFrame, *, rule: Rule, binarise: BinariseRule | None = None
) -> pl.DataFrame:
    """One consensus label per (image_id, finding) from several annotators' rows.

    Parameters
    ----------
    ann
        Annotation rows with ``image_id, finding, annotator, value`` (graded or 0/1).
    rule
        ``all_certain_agree``, ``majority`` or ``any_positive`` (see the module docstring).
    binarise
        How graded values become codes (default :class:`BinariseRule`).

    Returns
    -------
    polars.DataFrame
        ``image_id, finding, value`` (1.0, 0.0 or null), ``meaning`` (positive, negative,
        no_consensus, no_usable_answer), ``raw_value`` (each annotator's value, e.g.
        ``a1=0.75;a2=1``) and the counts ``n_pos, n_neg, n_unc, n_excl``. One row per input
        (image, finding): nothing is dropped.

    Example
    -------
    >>> df = pl.DataFrame({"image_id": ["i", "i"], "finding": ["f", "f"],
    ...                    "annotator": ["a1", "a2"], "value": [0.75, 1.0]})
    >>> consensus(df, rule="all_certain_agree")["value"].to_list()
    [1.0]
    """
    if rule not in RULES:
        raise CatalogError(f"unknown consensus rule '{rule}'; use one of {', '.join(RULES)}")
    br = binarise or BinariseRule()
    code = br.expr(pl.col("value"))
    raw = pl.col("annotator") + "=" + pl.col("value").cast(pl.String).fill_null("invalid")
    g = (
        ann.sort("annotator")
        .with_columns(code.alias("_c"))
        .group_by(["image_id", "finding"], maintain_order=True)
        .agg(
            (pl.col("_c") == 1).sum().alias("n_pos"), (pl.col("_c") == 0).sum().alias("n_neg"),
            (pl.col("_c") == UNCERTAIN).sum().alias("n_unc"),
            pl.col("_c").is_null().sum().alias("n_excl"), pl.len().alias("n"),
            raw.str.join(";").alias("raw_value"),
        )
    )
    pos, neg, unc, n = pl.col("n_pos"), pl.col("n_neg"), pl.col("n_unc"), pl.col("n")
    usable = pos + neg + unc
    if rule == "all_certain_agree":
        val = pl.when(pos == n).then(1.0).when(neg == n).then(0.0)
    elif rule == "majority":
        val = pl.when(pos * 2 > usable).then(1.0).when(neg * 2 > usable).then(0.0)
    else:
        val = pl.when(pos > 0).then(1.0).when((neg == usable) & (neg > 0)).then(0.0)
    val = val.otherwise(None).cast(pl.Float64)
    return g.with_columns(val.alias("value")).with_columns(
        pl.when(pl.col("value") == 1).then(pl.lit("positive"))
        .when(pl.col("value") == 0).then(pl.lit("negative"))
        .when(usable == 0).then(pl.lit("no_usable_answer"))
        .otherwise(pl.lit("no_consensus")).alias("meaning")
    ).drop("n")


def derive_source(
    sources: pl.DataFrame, ann: pl.DataFrame, findings: pl.DataFrame, *, source_id: str,
    rule: Rule, binarise: BinariseRule | None = None, name: str | None = None,
) -> dict[str, pl.DataFrame]:
    """A derived source: ``source_id``'s annotators combined by ``rule``.

    Parameters
    ----------
    sources, ann, findings
        The catalog's ``sources`` row(s), ``annotations`` rows and ``findings`` rows of (at
        least) ``source_id``.
    name
        The new source's name (default ``<source name>_<rule>``); its id is
        ``<dataset>:<name>``.

    Returns
    -------
    dict
        ``sources``, ``annotations``, ``coverage`` and ``findings`` frames of the new source;
        its ``rule`` column is JSON ``{"from", "consensus", "binarise", "text"}``.

    Raises
    ------
    CatalogError
        When ``source_id`` is not in ``sources`` or has no annotation rows.
    """
    src = sources.filter(pl.col("source_id") == source_id)
    if src.height == 0:
        raise CatalogError(
            f"consensus: source '{source_id}' is not in the sources table; "
            "check params.yaml agreement.consensus (medlake sql 'SELECT source_id FROM sources')"
        )
    s = src.row(0, named=True)
    rows = ann.filter(pl.col("source_id") == source_id)
    if rows.height == 0:
        raise CatalogError(f"consensus: source '{source_id}' has no annotation rows")
    br = binarise or BinariseRule()
    new_name = name or f"{s['name']}_{rule}"
    new_id = f"{s['dataset_id']}:{new_name}"
    c = consensus(rows, rule=rule, binarise=br)
    text = (f"{rule} of {rows['annotator'].n_unique()} annotators of {source_id}; "
            f"binarised: {br.describe()}")
    rule_json = json.dumps({"from": source_id, "consensus": rule, "binarise": asdict(br),
                            "text": text}, sort_keys=True)
    annotations = c.select(
        "image_id", pl.lit(new_id).alias("source_id"), pl.lit("").alias("annotator"), "finding",
        "value", pl.lit(None, pl.String).alias("category"), "raw_value", "meaning",
        pl.lit(False).alias("is_invalid"),
    ).sort(["image_id", "finding"])
    srow = pl.DataFrame([{
        "source_id": new_id, "dataset_id": s["dataset_id"], "name": new_name, "kind": "derived",
        "exhaustive": s["exhaustive"], "negatives": "explicit", "value_type": "binary",
        "rule": rule_json, "description": text,
        "code_map": json.dumps({"1": {"value": 1.0, "meaning": "positive"},
                                "0": {"value": 0.0, "meaning": "negative"},
                                "null": {"value": None, "meaning": "no_consensus"}}, sort_keys=True),
        "file": None,
    }])
    fnd = findings.filter(pl.col("source_id") == source_id).with_columns(
        pl.lit(new_id).alias("source_id"), pl.lit("binary").alias("value_type")
    )
    coverage = annotations.select("image_id", "source_id").unique().sort("image_id")
    return {"sources": srow, "annotations": annotations, "coverage": coverage, "findings": fnd}
