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

A :class:`CodePolicy` says what a source's non-standard answers mean: each meaning
(``uncertain``, ``annotators_disagree``, ``not_mentioned``, ...) or graded value (``0.5``)
maps to ``exclude``, ``negative``, ``positive`` or ``category`` (its own category); the
CheXpert names ``U-Ignore``, ``U-Zeros``, ``U-Ones`` and ``U-MultiClass`` stand for
``{uncertain: exclude|negative|positive|category}``. :func:`pool_sources` makes one derived
source of several sources that label disjoint images (e.g. PadChest's physician and RNN
report labels).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import polars as pl

from medlake.catalog.errors import CatalogError

MiddleAs = Literal["positive", "negative", "uncertain", "exclude"]
Rule = Literal["all_certain_agree", "majority", "any_positive"]
RULES: tuple[str, ...] = ("all_certain_agree", "majority", "any_positive")
UNCERTAIN = 2  # the code of the "uncertain" category when middle_as == "uncertain"
ACTIONS: tuple[str, ...] = ("exclude", "negative", "positive", "category")
POLICY_ALIASES: dict[str, str] = {  # CheXpert's uncertainty policies (Irvin et al. 2019)
    "U-Ignore": "exclude", "U-Zeros": "negative", "U-Ones": "positive", "U-MultiClass": "category",
}
ABSENT_MEANING = "not_mentioned"  # meaning of an implicit source's missing row without a code_map entry


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


def policy_key(key: Any) -> str:
    """The text form of a policy key: a meaning as it is, a graded value as ``f"{v:g}"``.

    >>> policy_key(0.5), policy_key("0.50"), policy_key("uncertain")
    ('0.5', '0.5', 'uncertain')
    """
    if isinstance(key, bool):
        raise ValueError(f"{key!r} is neither a meaning nor a graded value")  # noqa: TRY004
    if isinstance(key, (int, float)):
        if not math.isfinite(float(key)):
            raise ValueError(f"{key!r} is not a finite graded value")
        return f"{float(key):g}"
    text = str(key).strip()
    if not text:
        raise ValueError("an empty key names no meaning")
    try:
        v = float(text)
    except ValueError:
        return text
    return f"{v:g}" if math.isfinite(v) else text


def key_value(key: str) -> float | None:
    """The graded value a policy key names, or None when it names a meaning."""
    try:
        v = float(key)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


@dataclass(frozen=True)
class CodePolicy:
    """What each non-standard answer of a source means for comparisons.

    ``rules`` holds ``(key, action)`` pairs sorted by key: a key is a meaning (``uncertain``,
    ``annotators_disagree``, ``not_mentioned``, ...) or a graded value in text form
    (``'0.5'``, see :func:`policy_key`); an action is one of :data:`ACTIONS`. A value rule
    wins over a meaning rule on the same row. An empty policy keeps today's reading (answers
    whose value is null are excluded; graded values follow the :class:`BinariseRule`).
    """

    rules: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, raw: Any, *, where: str) -> CodePolicy:
        """From YAML: an alias (``U-Ones``) or a mapping ``{meaning or value: action}``.

        Parameters
        ----------
        raw
            ``'U-Ones'`` (= ``{uncertain: positive}``) or e.g. ``{0.5: category,
            not_mentioned: negative}``; actions may be aliases too.
        where
            The setting's name for error messages, e.g. ``params.yaml
            agreement.policies['chexpert:report_nlp']``.

        Raises
        ------
        CatalogError
            Naming ``where``, the key, the value and what is allowed.
        """
        allowed = (f"one of {', '.join(ACTIONS)} (or an alias: "
                   f"{', '.join(f'{k} = {v}' for k, v in POLICY_ALIASES.items())})")
        if isinstance(raw, str):
            if raw not in POLICY_ALIASES:
                raise CatalogError(
                    f"{where}: {raw!r} is not a policy alias; use one of "
                    f"{', '.join(POLICY_ALIASES)} (each sets what 'uncertain' means) or a "
                    f"mapping {{MEANING or VALUE: ACTION}} with ACTION {allowed}")
            return cls((("uncertain", POLICY_ALIASES[raw]),))
        if not isinstance(raw, Mapping) or not raw:
            raise CatalogError(
                f"{where}: expected an alias ({', '.join(POLICY_ALIASES)}) or a non-empty "
                f"mapping {{MEANING or VALUE: ACTION}} such as {{uncertain: positive, 0.5: "
                f"category}}, got {raw!r}")
        out: dict[str, str] = {}
        for k, v in raw.items():
            try:
                key = policy_key(k)
            except ValueError as e:
                raise CatalogError(f"{where}: key {k!r}: {e}; keys are meanings such as "
                                   "uncertain, annotators_disagree, not_mentioned, or graded "
                                   "values such as 0.5") from None
            action = POLICY_ALIASES.get(v, v) if isinstance(v, str) else v
            if action not in ACTIONS:
                raise CatalogError(f"{where}: {k!r}: {v!r} is not an action; use {allowed}")
            if key in out and out[key] != action:
                raise CatalogError(f"{where}: {k!r} is given twice ({out[key]} and {action})")
            out[key] = action
        return cls(tuple(sorted(out.items())))

    def as_dict(self) -> dict[str, str]:
        return dict(self.rules)

    def merged(self, other: CodePolicy) -> CodePolicy:
        """This policy with ``other``'s rules on top (``other`` wins on a shared key)."""
        return CodePolicy(tuple(sorted({**self.as_dict(), **other.as_dict()}.items())))

    def value_rules(self) -> list[tuple[float, str]]:
        return [(v, a) for k, a in self.rules if (v := key_value(k)) is not None]

    def meaning_rules(self) -> list[tuple[str, str]]:
        return [(k, a) for k, a in self.rules if key_value(k) is None]

    def action(self, meaning: str | None, value: float | None) -> str | None:
        """The action for one answer (value rules first), or None when no rule applies."""
        if value is not None:
            for v, a in self.value_rules():
                if v == value:
                    return a
        if meaning is not None:
            return self.as_dict().get(meaning) if key_value(meaning) is None else None
        return None

    def code_expr(self, base: pl.Expr, *, categories: Mapping[str, int] | None = None,
                  names: Mapping[str, str] | None = None, meaning: bool = True) -> pl.Expr:
        """``base`` (an integer code) with this policy applied to each row.

        Rows matched by a rule get 0 (negative), 1 (positive), null (exclude) or the code of
        their category: ``categories[name]`` where ``name = names.get(key, key)`` (default
        :data:`UNCERTAIN`). Needs columns ``value`` and (when ``meaning``) ``meaning``.
        """
        def code(key: str, action: str) -> pl.Expr:
            if action == "category":
                name = (names or {}).get(key, key)
                c = (categories or {}).get(name, UNCERTAIN)
                return pl.lit(c, pl.Int32)
            return pl.lit({"negative": 0, "positive": 1, "exclude": None}[action], pl.Int32)

        out = base.cast(pl.Int32)
        # applied in reverse priority, so value rules (applied last) win over meaning rules
        if meaning:
            for k, a in self.meaning_rules():
                out = pl.when(pl.col("meaning") == k).then(code(k, a)).otherwise(out)
        for v, a in self.value_rules():
            out = pl.when(pl.col("value") == v).then(code(policy_key(v), a)).otherwise(out)
        return out


def _policy_codes(code: pl.Expr, policy: Mapping[str | None, CodePolicy] | None,
                  columns: Sequence[str]) -> pl.Expr:
    """``code`` with per-finding code policies (key None = every other finding) applied."""
    if not policy:
        return code
    has_meaning = "meaning" in columns
    out = policy[None].code_expr(code, meaning=has_meaning) if None in policy else code
    for f, pol in policy.items():
        if f is not None:
            out = pl.when(pl.col("finding") == f).then(
                pol.code_expr(code, meaning=has_meaning)).otherwise(out)
    return out


def consensus(
    ann: pl.DataFrame, *, rule: Rule, binarise: BinariseRule | None = None,
    policy: Mapping[str | None, CodePolicy] | None = None,
) -> pl.DataFrame:
    """One consensus label per (image_id, finding) from several annotators' rows.

    Parameters
    ----------
    ann
        Annotation rows with ``image_id, finding, annotator, value`` (graded or 0/1) and,
        for meaning rules of ``policy``, ``meaning``.
    rule
        ``all_certain_agree``, ``majority`` or ``any_positive`` (see the module docstring).
    binarise
        How graded values become codes (default :class:`BinariseRule`).
    policy
        Code policies by the annotation's own finding name (key None: every finding without
        its own entry), applied after ``binarise``: ``category`` counts as uncertain
        (``n_unc``: a usable answer that agrees with neither side), ``exclude`` as unusable.

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
    code = _policy_codes(br.expr(pl.col("value")), policy, ann.columns)
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
    policy: Mapping[str | None, CodePolicy] | None = None,
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
    policy
        Code policies of ``source_id`` by own finding name (see :func:`consensus`).

    Returns
    -------
    dict
        ``sources``, ``annotations``, ``coverage`` and ``findings`` frames of the new source;
        its ``rule`` column is JSON ``{"from", "consensus", "binarise", "text"}`` plus
        ``"policy"`` (``{finding or "*": {key: action}}``) when a policy applies.

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
    pol = {f: p for f, p in (policy or {}).items() if p.rules}
    c = consensus(rows, rule=rule, binarise=br, policy=pol)
    text = (f"{rule} of {rows['annotator'].n_unique()} annotators of {source_id}; "
            f"binarised: {br.describe()}")
    record: dict[str, Any] = {"from": source_id, "consensus": rule, "binarise": asdict(br)}
    if pol:
        record["policy"] = {("*" if f is None else f): p.as_dict() for f, p in pol.items()}
        text += "; code policy: " + "; ".join(
            f"{'every finding' if f is None else f}: "
            + ", ".join(f"{k} -> {a}" for k, a in p.rules) for f, p in pol.items())
    rule_json = json.dumps({**record, "text": text}, sort_keys=True)
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


def pool_sources(
    sources: pl.DataFrame, ann: pl.DataFrame, findings: pl.DataFrame, coverage: pl.DataFrame,
    *, members: Sequence[str], name: str, precedence: Sequence[str] | None = None,
) -> dict[str, pl.DataFrame]:
    """A derived source that is the union of ``members`` over their (disjoint) images.

    E.g. PadChest's ``physician`` (manual, 27%) and ``rnn`` (the rest) report labels become
    one ``report_labels`` source, as the published tube study compares them.

    Parameters
    ----------
    sources, ann, findings, coverage
        The catalog's tables, holding (at least) every member's rows.
    members
        Source ids of one dataset with the same ``value_type`` and ``negatives`` (and the
        same ``(absent)`` code, for implicit negatives).
    name
        The new source's name; its id is ``<dataset>:<name>``.
    precedence
        Members in order of precedence: an image judged by several members takes the rows
        of the first one listed (members not listed follow in ``members`` order). Without
        it, members must judge disjoint images.

    Returns
    -------
    dict
        ``sources``, ``annotations``, ``coverage`` and ``findings`` frames of the new source
        (kind ``derived``); its ``rule`` is JSON ``{"pooled", "precedence", "overlap",
        "images", "text"}``.

    Raises
    ------
    CatalogError
        A member is unknown or repeated, the members differ in dataset, value type,
        negatives or absent code, the new id is taken, or (without ``precedence``) two
        members judge the same image: the message names the image count.
    """
    members = [str(m) for m in members]
    where = f"pooled source '{name}'"
    if len(members) != len(set(members)) or not members:
        raise CatalogError(f"{where}: 'of' must list distinct source ids, got {members}")
    src = sources.filter(pl.col("source_id").is_in(members))
    missing = [m for m in members if m not in set(src["source_id"].to_list())]
    if missing:
        raise CatalogError(f"{where}: {missing} not in the sources table (pooled sources name "
                           f"sources of one dataset: medlake sql 'SELECT source_id FROM sources')")
    rows = {r["source_id"]: r for r in src.iter_rows(named=True)}
    for col in ("dataset_id", "value_type", "negatives"):
        vals = {m: rows[m].get(col) for m in members}
        if len(set(vals.values())) > 1:
            raise CatalogError(f"{where}: members differ in {col} ({vals}); pool sources of one "
                               f"dataset with the same {col}")

    def absent(m: str) -> Any:
        try:
            return (json.loads(rows[m].get("code_map") or "{}") or {}).get("(absent)")
        except ValueError:
            return None

    if len({json.dumps(absent(m), sort_keys=True) for m in members}) > 1:
        raise CatalogError(f"{where}: members read a missing row differently (code_map "
                           f"'(absent)': {({m: absent(m) for m in members})})")
    ds = rows[members[0]]["dataset_id"]
    new_id = f"{ds}:{name}"
    if new_id in set(sources["source_id"].to_list()):
        raise CatalogError(f"{where}: source id '{new_id}' is taken; choose another name")
    order = list(precedence or [])
    bad = [p for p in order if p not in members]
    if bad or len(order) != len(set(order)):
        raise CatalogError(f"{where}: precedence {order} must list members of 'of' "
                           f"({members}) at most once each")
    order += [m for m in members if m not in order]
    rank = {m: i for i, m in enumerate(order)}
    judged = pl.concat([
        coverage.filter(pl.col("source_id").is_in(members)).select("image_id", "source_id"),
        ann.filter(pl.col("source_id").is_in(members)).select("image_id", "source_id"),
    ]).unique().with_columns(pl.col("source_id").replace_strict(rank, return_dtype=pl.Int64)
                             .alias("_rank"))
    per_image = judged.group_by("image_id").agg(pl.len().alias("n"), pl.col("_rank").min())
    shared = per_image.filter(pl.col("n") > 1)
    if shared.height and precedence is None:
        counts = judged.join(shared.select("image_id"), on="image_id").group_by(
            "source_id").len().sort("source_id")
        first = shared["image_id"].sort()[0]
        raise CatalogError(
            f"{where}: {shared.height:,} images are judged by more than one member ("
            + ", ".join(f"{s}: {n:,}" for s, n in counts.iter_rows())
            + f"; first: {first}); pooled sources need disjoint images, or give "
            "precedence: [SOURCE, ...] to say whose labels count on shared images")
    owner = per_image.select("image_id", pl.col("_rank").replace_strict(
        dict(enumerate(order)), return_dtype=pl.String).alias("_owner"))
    annotations = (
        ann.filter(pl.col("source_id").is_in(members))
        .join(owner, on="image_id")
        .filter(pl.col("source_id") == pl.col("_owner"))
        .drop("_owner").with_columns(pl.lit(new_id).alias("source_id"))
        .sort(["image_id", "annotator", "finding"])
    )
    cov = owner.select("image_id", pl.lit(new_id).alias("source_id")).sort("image_id")
    fnd = findings.filter(pl.col("source_id").is_in(members)).with_columns(
        pl.lit(new_id).alias("source_id"))
    clash = fnd.group_by("finding").agg(pl.col("shared_finding").n_unique().alias("n")).filter(
        pl.col("n") > 1)
    if clash.height:
        raise CatalogError(f"{where}: members map finding '{clash['finding'][0]}' to different "
                           "shared names (findings.shared_finding); fix the vocabulary first")
    fnd = fnd.unique(subset=["source_id", "finding"], keep="first", maintain_order=True)
    n_img = {m: int((per_image["_rank"] == rank[m]).sum()) for m in order}
    text = (f"union of {', '.join(members)} over {cov.height:,} images ("
            + " + ".join(f"{n_img[m]:,} {m}" for m in members) + ")"
            + (f"; {shared.height:,} images judged by several members take the labels of the "
               f"first in precedence {order}" if shared.height else ""))
    first = rows[order[0]]
    srow = pl.DataFrame([{
        "source_id": new_id, "dataset_id": ds, "name": name, "kind": "derived",
        "exhaustive": all(bool(rows[m].get("exhaustive")) for m in members),
        "negatives": first["negatives"], "value_type": first["value_type"],
        "rule": json.dumps({"pooled": members, "precedence": list(precedence) if precedence
                            else None, "overlap": shared.height, "images": n_img,
                            "text": text}, sort_keys=True),
        "description": f"pooled source: {text}", "code_map": first.get("code_map"),
        "file": None,
    }])
    return {"sources": srow, "annotations": annotations, "coverage": cov, "findings": fnd}
