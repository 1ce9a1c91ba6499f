"""Label policies, pooled sources and the other comparison choices of the agreement stage.

``params.yaml: agreement`` keys parsed here (each function takes the raw YAML value and
returns frozen dataclasses, or raises :class:`medlake.catalog.CatalogError` naming the key,
the value and what is allowed):

``policies``
    ``{SOURCE or "SOURCE/FINDING": POLICY}``; POLICY is an alias (``U-Ignore``, ``U-Zeros``,
    ``U-Ones``, ``U-MultiClass``: what ``uncertain`` means) or a mapping ``{MEANING or VALUE:
    exclude|negative|positive|category}``, e.g. ``{0.5: category}`` or
    ``{annotators_disagree: category, not_mentioned: negative}``. FINDING is the source's own
    name or the shared one; its rules go on top of the source's.
``pooled``
    ``[{name, of: [SOURCE, ...], precedence?: [SOURCE, ...]}]``: derived source
    ``<dataset>:<name>``, the union of ``of`` over disjoint images
    (:func:`medlake.catalog.consensus.pool_sources`).
``kappa_ci``
    ``clip`` (default: the asymptotic 95% interval cut to [-1, 1], with a note on the row
    when it was cut) or ``asymptotic`` (statsmodels' interval as it is).
``positive_only_categories``
    ``skip`` (default) or ``compare``: two category-valued sources that are both
    positive-only (negatives ``none``) are compared on the images both labelled.

:func:`resolve` checks the policies against one dataset's sources (their ``code_map``) and
gives what the stage applies: per-row codes (:meth:`Resolved.codes`), the code a missing
row of an implicit-negative source stands for (:meth:`Resolved.absent`) and the JSON that
every agreement row records in its ``policy`` column (:meth:`Resolved.row_json`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import polars as pl

from medlake.catalog import CatalogError
from medlake.catalog.consensus import (
    ABSENT_MEANING,
    ACTIONS,
    UNCERTAIN,
    BinariseRule,
    CodePolicy,
    key_value,
    policy_key,
)

KAPPA_CI = ("clip", "asymptotic")
POSITIVE_ONLY_CATEGORIES = ("skip", "compare")
FAMILY = {"binary": "binary", "graded": "binary", "ordinal": "ordinal", "category": "category"}
# what a policy may do per value-type family (ordinal codes are scale steps: only exclusion)
FAMILY_ACTIONS = {"binary": ACTIONS, "ordinal": ("exclude",), "category": ("exclude", "category")}


@dataclass(frozen=True)
class PolicyEntry:
    """One ``policies`` entry: a source (and optionally one of its findings) and its policy."""

    source: str
    finding: str | None
    policy: CodePolicy

    @property
    def key(self) -> str:
        return self.source if self.finding is None else f"{self.source}/{self.finding}"


@dataclass(frozen=True)
class Policies:
    """Every ``policies`` entry, in file order."""

    entries: tuple[PolicyEntry, ...] = ()

    def sources(self) -> set[str]:
        return {e.source for e in self.entries}

    def lookup(self, source: str, names: tuple[str, ...] = ()) -> CodePolicy:
        """The policy of ``source`` on a finding known by ``names`` (own and shared name):
        the source's entry, then the finding's on top; ``names=()``: the source's only."""
        out = CodePolicy()
        for e in self.entries:
            if e.source == source and e.finding is None:
                out = out.merged(e.policy)
        for e in self.entries:
            if e.source == source and e.finding is not None and e.finding in names:
                out = out.merged(e.policy)
        return out

    def finding_entries(self, source: str) -> list[PolicyEntry]:
        return [e for e in self.entries if e.source == source and e.finding is not None]


@dataclass(frozen=True)
class Pool:
    """One ``pooled`` entry: derived source ``<dataset>:<name>`` = union of ``members``."""

    name: str
    members: tuple[str, ...]
    precedence: tuple[str, ...] | None = None

    @property
    def dataset_id(self) -> str:
        return self.members[0].split(":", 1)[0]

    @property
    def source_id(self) -> str:
        return f"{self.dataset_id}:{self.name}"


@dataclass(frozen=True)
class Choices:
    """The comparison choices of one run (defaults = today's behaviour)."""

    policies: Policies = field(default_factory=Policies)
    pooled: tuple[Pool, ...] = ()
    kappa_ci: str = "clip"
    positive_only_categories: str = "skip"


def parse_policies(raw: Any) -> Policies:
    """``params.yaml: agreement.policies`` -> :class:`Policies`.

    Example
    -------
    >>> p = parse_policies({"chexpert:report_nlp": "U-Ones",
    ...                     "padchest:tubes_raw": {0.5: "category"}})
    >>> [(e.key, e.policy.rules) for e in p.entries]  # doctest: +NORMALIZE_WHITESPACE
    [('chexpert:report_nlp', (('uncertain', 'positive'),)),
     ('padchest:tubes_raw', (('0.5', 'category'),))]
    """
    if raw is None or raw == {} or raw == []:
        return Policies()
    if not isinstance(raw, Mapping):
        raise CatalogError(
            "params.yaml agreement.policies: expected a mapping {SOURCE or 'SOURCE/FINDING': "
            f"POLICY}}, e.g. {{'chexpert:report_nlp': U-Ones}}, got {raw!r}")
    out = []
    for k, v in raw.items():
        where = f"params.yaml agreement.policies[{k!r}]"
        src, _, fin = str(k).partition("/")
        if ":" not in src or src.startswith(":") or src.endswith(":"):
            raise CatalogError(f"{where}: the key must be a source id '<dataset>:<source>' "
                               "(optionally '/FINDING'), e.g. 'chexpert:report_nlp/Edema'")
        out.append(PolicyEntry(src, fin or None, CodePolicy.parse(v, where=where)))
    return Policies(tuple(out))


def parse_pooled(raw: Any) -> tuple[Pool, ...]:
    """``params.yaml: agreement.pooled`` -> :class:`Pool` tuple.

    Example
    -------
    >>> pools = parse_pooled([{"name": "report_labels",
    ...                        "of": ["padchest:physician", "padchest:rnn"]}])
    >>> pools[0].source_id
    'padchest:report_labels'
    """
    if raw is None or raw == []:
        return ()
    if not isinstance(raw, list):
        raise CatalogError("params.yaml agreement.pooled: expected a list of {name: NAME, of: "
                           f"[SOURCE, SOURCE, ...], precedence?: [SOURCE, ...]}}, got {raw!r}")
    out: list[Pool] = []
    for i, item in enumerate(raw):
        where = f"params.yaml agreement.pooled[{i}]"
        if not isinstance(item, Mapping) or not {"name", "of"} <= set(item) or set(item) - {
                "name", "of", "precedence"}:
            raise CatalogError(f"{where}: expected {{name: NAME, of: [SOURCE, ...], "
                               f"precedence?: [SOURCE, ...]}}, got {item!r}")
        name = item["name"]
        if not isinstance(name, str) or not name or not name.replace("_", "").replace(
                "-", "").replace(".", "").isalnum():
            raise CatalogError(f"{where}: name {name!r} must be letters, digits, '_', '-' or "
                               "'.' (the source id is '<dataset>:<name>')")
        of = item["of"]
        if (not isinstance(of, list) or not of or not all(isinstance(s, str) and ":" in s
                                                          for s in of)):
            raise CatalogError(f"{where}: of must list source ids '<dataset>:<source>', "
                               f"got {of!r}")
        if len({s.split(":", 1)[0] for s in of}) > 1:
            raise CatalogError(f"{where}: of {of} names sources of several datasets; a pooled "
                               "source belongs to one dataset")
        if len(set(of)) != len(of):
            raise CatalogError(f"{where}: of {of} names a source twice")
        prec = item.get("precedence")
        if prec is not None and (not isinstance(prec, list) or not set(prec) <= set(of)
                                 or len(set(prec)) != len(prec)):
            raise CatalogError(f"{where}: precedence must list members of 'of' ({of}) once "
                               f"each, in order of precedence, got {prec!r}")
        pool = Pool(name, tuple(of), tuple(prec) if prec is not None else None)
        if pool.source_id in {p.source_id for p in out} or pool.source_id in of:
            raise CatalogError(f"{where}: source id '{pool.source_id}' is used twice")
        out.append(pool)
    return tuple(out)


def parse_choice(raw: Any, key: str, allowed: tuple[str, ...]) -> str:
    """A one-word setting such as ``kappa_ci: clip``; None = the first allowed value."""
    if raw is None:
        return allowed[0]
    if raw not in allowed:
        raise CatalogError(f"params.yaml agreement.{key}: {raw!r} is not allowed; use one of "
                           f"{', '.join(allowed)} (default {allowed[0]})")
    return str(raw)


def parse(cfg: Mapping[str, Any]) -> Choices:
    """The :class:`Choices` of a merged ``agreement`` settings mapping (missing keys: defaults)."""
    return Choices(
        policies=parse_policies(cfg.get("policies")),
        pooled=parse_pooled(cfg.get("pooled")),
        kappa_ci=parse_choice(cfg.get("kappa_ci"), "kappa_ci", KAPPA_CI),
        positive_only_categories=parse_choice(cfg.get("positive_only_categories"),
                                              "positive_only_categories",
                                              POSITIVE_ONLY_CATEGORIES),
    )


def _code_map(text: Any) -> dict[str, dict[str, Any]]:
    try:
        out = json.loads(text) if text else {}
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


@dataclass(frozen=True)
class SourceInfo:
    """What a source's ``code_map`` says: meanings, graded values, the absent meaning."""

    family: str
    negatives: str
    meanings: frozenset[str]
    values: dict[str, str]  # graded value key ('0.5') -> its meaning ('unsure')
    null_meanings: tuple[str, ...]  # meanings stored with value null: excluded by default
    absent_meaning: str | None  # implicit negatives: what a missing row means
    absent_code: int | None
    has_code_map: bool


def source_info(row: Mapping[str, Any]) -> SourceInfo:
    cm = _code_map(row.get("code_map"))
    meanings, values, nulls = set(), {}, []
    for raw, entry in cm.items():
        if not isinstance(entry, dict):
            continue
        m, v = entry.get("meaning"), entry.get("value")
        if m:
            meanings.add(str(m))
        if v is None and m and raw != "(absent)":
            nulls.append(str(m))
        if isinstance(v, (int, float)) and m:
            values.setdefault(policy_key(v), str(m))
    absent_meaning, absent_code = None, None
    if row.get("negatives") == "implicit":
        entry = cm.get("(absent)")
        if isinstance(entry, dict):
            absent_meaning = str(entry.get("meaning") or ABSENT_MEANING)
            v = entry.get("value")
            absent_code = None if v is None else int(float(v) >= 0.5)
            if v is None:
                nulls.append(absent_meaning)
        else:
            absent_meaning, absent_code = ABSENT_MEANING, 0
        meanings.add(absent_meaning)
    return SourceInfo(
        family=FAMILY.get(str(row.get("value_type")), "category"),
        negatives=str(row.get("negatives")), meanings=frozenset(meanings), values=values,
        null_meanings=tuple(sorted(set(nulls))), absent_meaning=absent_meaning,
        absent_code=absent_code, has_code_map=bool(cm),
    )


@dataclass(frozen=True)
class Resolved:
    """The policies of one dataset's sources, checked against their code maps."""

    choices: Choices
    info: dict[str, SourceInfo]
    categories: dict[str, int]  # category name -> code (2 = 'uncertain', then by name)
    binarise: dict[str, dict[str, Any]]  # graded source -> its binarise rule (recorded)
    shared: dict[tuple[str, str], str]  # (source, own finding) -> shared finding

    @property
    def policies(self) -> Policies:
        return self.choices.policies

    def policy(self, source: str, finding: str | None = None, own: str | None = None) -> CodePolicy:
        """The explicit policy of ``source`` on a shared ``finding`` (own name ``own``)."""
        names = tuple(n for n in (finding, own) if n)
        if finding and not own:  # every own name of the source that maps to this shared one
            names += tuple(o for (s, o), sh in self.shared.items() if s == source and sh == finding)
        return self.policies.lookup(source, names)

    def effective(self, source: str, finding: str | None = None) -> dict[str, str]:
        """What is in effect for ``source`` on ``finding``: every meaning the source stores
        with a null value -> ``exclude`` (today's reading), the explicit policy on top."""
        inf = self.info.get(source)
        base = {m: "exclude" for m in (inf.null_meanings if inf else ())}
        return {**base, **self.policy(source, finding).as_dict()}

    def names(self, source: str) -> dict[str, str]:
        """Policy key -> category name: a graded value's meaning in the code map, else the key."""
        inf = self.info.get(source)
        return dict(inf.values) if inf else {}

    def codes(self, df: pl.DataFrame, base: pl.Expr) -> pl.Expr:
        """``base`` codes of label rows (``source_id, finding, finding_own, value`` and,
        when present, ``meaning``) with every explicit policy applied."""
        out = base.cast(pl.Int32)
        has_meaning = "meaning" in df.columns
        for sid in sorted(self.policies.sources() & set(self.info)):
            # a category-valued source keeps its category codes: only exclusions apply here
            keep = (lambda p: CodePolicy(tuple(r for r in p.rules if r[1] == "exclude"))) if (
                self.info[sid].family == "category") else (lambda p: p)
            src_pol = keep(self.policies.lookup(sid))
            names = self.names(sid)
            kw = {"categories": self.categories, "names": names, "meaning": has_meaning}
            if src_pol.rules:
                out = pl.when(pl.col("source_id") == sid).then(
                    src_pol.code_expr(out, **kw)).otherwise(out)
            for e in self.policies.finding_entries(sid):
                pol = keep(self.policies.lookup(sid).merged(e.policy))
                hit = (pl.col("source_id") == sid) & (
                    (pl.col("finding") == e.finding) | (pl.col("finding_own") == e.finding))
                out = pl.when(hit).then(pol.code_expr(base.cast(pl.Int32), **kw)).otherwise(out)
        return out

    def category_text(self, df: pl.DataFrame) -> pl.Expr:
        """The ``category`` of category-family rows, with rows whose answer a policy makes
        a category of its own given that name (others unchanged)."""
        out = pl.col("category")
        if "meaning" not in df.columns:
            return out
        for sid in sorted(self.policies.sources() & set(self.info)):
            if self.info[sid].family != "category":
                continue
            src_pol = self.policies.lookup(sid)
            scoped = [(pl.col("source_id") == sid, src_pol)] + [
                ((pl.col("source_id") == sid) & ((pl.col("finding") == e.finding)
                                                 | (pl.col("finding_own") == e.finding)),
                 src_pol.merged(e.policy)) for e in self.policies.finding_entries(sid)]
            for scope, pol in scoped:  # later (finding-level) scopes win
                for k, a in pol.meaning_rules():
                    hit = scope & (pl.col("meaning") == k) & pl.col("category").is_null()
                    name = pl.lit(k) if a == "category" else pl.lit(None, pl.String)
                    out = pl.when(hit).then(name).otherwise(out)
        return out

    def absent(self, defaults: dict[str, int | None]) -> tuple[
            dict[str, int | None], dict[str, dict[str, int | None]]]:
        """The code a missing row of each implicit-negative source stands for, with the
        policy on its absent meaning applied: ``(per source, {source: {shared finding:
        code}})`` (the second for finding-level policies only)."""
        out = dict(defaults)
        by_finding: dict[str, dict[str, int | None]] = {}

        def code(pol: CodePolicy, meaning: str, default: int | None) -> int | None:
            a = pol.as_dict().get(meaning)
            if a is None:
                return default
            return {"exclude": None, "negative": 0, "positive": 1}.get(
                a, self.categories.get(meaning, UNCERTAIN))

        for sid, inf in self.info.items():
            if inf.absent_meaning is None or sid not in self.policies.sources():
                continue
            out[sid] = code(self.policies.lookup(sid), inf.absent_meaning, defaults.get(sid, 0))
            for e in self.policies.finding_entries(sid):
                pol = self.policies.lookup(sid).merged(e.policy)
                shared = [sh for (s, o), sh in self.shared.items()
                          if s == sid and e.finding in (o, sh)] or [e.finding]
                for sh in shared:
                    by_finding.setdefault(sid, {})[sh] = code(pol, inf.absent_meaning, out[sid])
        return out, by_finding

    def row_json(self, source_a: str, source_b: str, finding: str, value_type: str) -> str:
        """The ``policy`` column of one agreement row: ``{"sources": {source: {key:
        action}}, "kappa_ci", "binarise"?, "positive_only_categories"?}``."""
        srcs = sorted({source_a, source_b})
        rec: dict[str, Any] = {"kappa_ci": self.choices.kappa_ci,
                               "sources": {s: self.effective(s, finding) for s in srcs}}
        bins = {s: self.binarise[s] for s in srcs if s in self.binarise}
        if bins:
            rec["binarise"] = bins
        if value_type == "category":
            rec["positive_only_categories"] = self.choices.positive_only_categories
        return json.dumps(rec, sort_keys=True)


def resolve(
    choices: Choices, sources: pl.DataFrame, findings: pl.DataFrame, dataset_id: str,
    binarise: BinariseRule,
) -> Resolved:
    """Check ``choices.policies`` against the sources of ``dataset_id`` (derived ones included).

    Raises
    ------
    CatalogError
        A policy names a source of the dataset that does not exist, a meaning or graded
        value the source never stores (per its ``code_map``), or an action its value type
        cannot take (ordinal: exclude; category: exclude or category).
    """
    rows = {r["source_id"]: r for r in sources.iter_rows(named=True)}
    info = {sid: source_info(r) for sid, r in rows.items()}
    for e in choices.policies.entries:
        if not e.source.startswith(dataset_id + ":"):
            continue
        where = f"params.yaml agreement.policies[{e.key!r}]"
        if e.source not in info:
            raise CatalogError(f"{where}: no source '{e.source}' in dataset '{dataset_id}' "
                               f"(sources: {', '.join(sorted(info))})")
        inf = info[e.source]
        for k, a in e.policy.rules:
            if a not in FAMILY_ACTIONS[inf.family]:
                raise CatalogError(
                    f"{where}: {k!r}: {a!r} is not possible for '{e.source}' (value type "
                    f"{inf.family}); use {' or '.join(FAMILY_ACTIONS[inf.family])}")
            if not inf.has_code_map:
                continue
            known = k in inf.values if key_value(k) is not None else k in inf.meanings
            if not known:
                raise CatalogError(
                    f"{where}: '{e.source}' never stores {k!r} (meanings: "
                    f"{', '.join(sorted(inf.meanings)) or 'none'}; graded values: "
                    f"{', '.join(sorted(inf.values, key=float)) or 'none'}); keys are "
                    f"meanings or graded values from the source's code_map")
    names = {"uncertain"}
    for e in choices.policies.entries:
        if e.source in info:
            for k, a in e.policy.rules:
                if a == "category":
                    names.add(info[e.source].values.get(k, k))
    if binarise.middle_as == "uncertain":
        names.add("uncertain")
    cats = {"uncertain": UNCERTAIN}
    for n in sorted(names - {"uncertain"}):
        cats[n] = UNCERTAIN + len(cats)
    bins = {sid: asdict(binarise) for sid, r in rows.items() if r.get("value_type") == "graded"}
    shared = {(s, f): sh for s, f, sh in findings.select(
        "source_id", "finding", "shared_finding").iter_rows() if s in rows}
    return Resolved(choices, info, cats, bins, shared)


def consensus_policy(choices: Choices, source_id: str,
                     findings: pl.DataFrame) -> dict[str | None, CodePolicy]:
    """The policies a consensus over ``source_id`` honours, by the source's own finding name
    (None = every finding without an entry of its own), for
    :func:`medlake.catalog.consensus.derive_source`."""
    pol = choices.policies
    if source_id not in pol.sources():
        return {}
    out: dict[str | None, CodePolicy] = {}
    base = pol.lookup(source_id)
    if base.rules:
        out[None] = base
    own = findings.filter(pl.col("source_id") == source_id).select("finding", "shared_finding")
    for e in pol.finding_entries(source_id):
        for f, sh in own.iter_rows():
            if e.finding in (f, sh):
                out[f] = pol.lookup(source_id, (f, sh))
    return out


def add_pooled(
    choices: Choices, dataset_id: str, tabs: dict[str, pl.DataFrame],
    derived: dict[str, pl.DataFrame],
) -> tuple[dict[str, pl.DataFrame], dict[str, pl.DataFrame]]:
    """Append the pooled sources of ``dataset_id`` (``choices.pooled``, in order, so a pool
    may pool an earlier one or a consensus source) to ``tabs`` (``sources, annotations,
    findings, coverage``) and to the derived tables ``derived``."""
    from medlake.catalog.consensus import pool_sources

    for pool in choices.pooled:
        if pool.dataset_id != dataset_id:
            continue
        d = pool_sources(tabs["sources"], tabs["annotations"], tabs["findings"],
                         tabs["coverage"], members=pool.members, name=pool.name,
                         precedence=pool.precedence)
        for k, v in d.items():
            tabs[k] = pl.concat([tabs[k], v], how="diagonal_relaxed")
            derived[k] = pl.concat([derived[k], v], how="diagonal_relaxed") if k in derived else v
    return tabs, derived


def pool_skips(choices: Choices, resolved: Resolved, dataset_id: str) -> set[frozenset[str]]:
    """Pairs (pooled source, member) not worth comparing: the same policy on both, so the
    pool's labels on the member's images are the member's own (kappa 1 by construction)."""
    out = set()
    for pool in choices.pooled:
        if pool.dataset_id != dataset_id:
            continue
        for m in pool.members:
            same = (resolved.effective(pool.source_id) == resolved.effective(m)
                    and not choices.policies.finding_entries(pool.source_id)
                    and not choices.policies.finding_entries(m))
            if same:
                out.add(frozenset((pool.source_id, m)))
    return out


def with_policy_column(out: pl.DataFrame, resolved: Resolved) -> pl.DataFrame:
    """``out`` (agreement rows) with the ``policy`` JSON of each row (see
    :meth:`Resolved.row_json`), computed once per (source pair, finding, value type)."""
    keys = ["source_a", "source_b", "finding", "value_type"]
    combos = out.select(keys).unique()
    js = [resolved.row_json(a, b, f, vt) for a, b, f, vt in combos.iter_rows()]
    return out.join(combos.with_columns(pl.Series("policy", js, dtype=pl.String)), on=keys,
                    how="left", nulls_equal=True)


def explain_empty(sources: pl.DataFrame, findings: pl.DataFrame, annotations: pl.DataFrame,
                  choices: Choices) -> str:
    """Why two or more label sources of a dataset gave no agreement row, in words."""
    src = {r["source_id"]: r for r in sources.iter_rows(named=True)}
    vocab: dict[str, set[str]] = {s: set() for s in src}
    for s, sh in findings.select("source_id", "shared_finding").iter_rows():
        if s in vocab and sh:
            vocab[s].add(sh)
    imgs = {s: set(annotations.filter(pl.col("source_id") == s)["image_id"].to_list())
            for s in src} if "image_id" in annotations.columns else {s: set() for s in src}
    ids = sorted(src)
    pairs = [(a, b, sorted(vocab[a] & vocab[b])) for i, a in enumerate(ids) for b in ids[i + 1:]]
    sharing = [(a, b, f) for a, b, f in pairs if f]
    if not sharing:
        return "no two sources share a finding (findings.shared_finding)"
    fam = {s: FAMILY.get(str(src[s]["value_type"]), "category") for s in src}
    for a, b, f in sharing:
        if fam[a] != fam[b]:
            continue
        if src[a]["negatives"] == "none" and src[b]["negatives"] == "none":
            n = len(imgs[a] & imgs[b])
            hint = ("set agreement.positive_only_categories: compare to compare their "
                    "categories on those images" if fam[a] == "category"
                    else "a missing label means 'not judged' on both sides, so no negative "
                         "can be compared")
            if fam[a] == "category" and choices.positive_only_categories == "compare":
                hint = "and no image has a usable label from both"
            return (f"{a} and {b} share finding '{f[0]}' ({fam[a]}) and {n:,} images, but "
                    f"both are positive-only (negatives 'none'); {hint}")
        return f"{a} and {b} share finding '{f[0]}' but no image with a usable label from both"
    a, b, f = sharing[0]
    return (f"sources sharing a finding differ in value type ({a}: {src[a]['value_type']}, "
            f"{b}: {src[b]['value_type']} on '{f[0]}'); only binary/graded, ordinal and "
            "category sources are compared within their kind")
