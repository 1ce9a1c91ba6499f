"""The recipe rules that ``materialize`` applies, one function per rule kind.

Each rule takes the working frame (one row per parent image: ``image_id, native_id,
group_id, split, width, height, removed`` and one column per label) and a :class:`Context`,
and returns the new frame plus lineage rows for the images it touched. Removed images stay
in the frame (``removed = True``) so that nothing can get lost.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from medlake.catalog import Catalog, CatalogError, Quarantine
from medlake.catalog.recipes import Recipe, Rule
from medlake.pipelines.leakage import SPLIT_ORDER, units

Lineage = list[dict[str, Any]]


@dataclass
class Context:
    """What rules need besides the frame: the catalog, recipe, duplicate links, quarantine."""

    catalog: Catalog
    recipe: Recipe
    links: pl.DataFrame
    quarantine: Quarantine
    files: dict[str, Path] = field(default_factory=dict)  # recipe path -> resolved file
    load_label: Callable[..., pl.DataFrame] | None = None


def _ev(**kw: Any) -> str:
    return json.dumps(kw, sort_keys=True, default=str)


def _row(rule: Rule, image_id: str, action: str, reason: str, **kw: Any) -> dict[str, Any]:
    return {"image_id": image_id, "rule": rule.name, "step": rule.step, "action": action,
            "reason": reason, **kw}


def _split_key(s: str) -> tuple[int, str]:
    return (SPLIT_ORDER.get(s, 9), s)


def fix_leakage(df: pl.DataFrame, rule: Rule, ctx: Context) -> tuple[pl.DataFrame, Lineage]:
    """Groups spanning splits go wholly to ``to``: train, the majority split, or are dropped."""
    to, use_dups = rule.params["to"], rule.params["grouping"] == "duplicates"
    kept = df.filter(~pl.col("removed") & pl.col("split").is_not_null())
    u = units(kept.select("image_id", "group_id"), ctx.links if use_dups else None)
    k = kept.select("image_id", "split").join(u.select("image_id", "unit"), on="image_id")
    per = k.group_by("unit", "split").len()
    spans = per.group_by("unit").agg(pl.len().alias("n_splits"), pl.col("split"), pl.col("len"))
    spans = spans.filter(pl.col("n_splits") > 1)
    rows: Lineage = []
    moves: dict[str, str] = {}
    drops: set[str] = set()
    members = k.filter(pl.col("unit").is_in(spans["unit"].implode()))
    by_unit = {u_: g for (u_,), g in members.group_by("unit")}
    for r in spans.sort("unit").iter_rows(named=True):
        counts = dict(zip(r["split"], r["len"]))
        ev = _ev(group=r["unit"], splits=dict(sorted(counts.items())))
        if to == "majority":
            target = min(counts, key=lambda s: (-counts[s], _split_key(s)))
        else:
            target = to
        for iid, sp in by_unit[r["unit"]].sort("image_id").select("image_id", "split").iter_rows():
            if to == "drop":
                drops.add(iid)
                rows.append(_row(rule, iid, "removed", "group spans splits (leakage); dropped",
                                 evidence=ev, from_split=sp))
            elif sp != target:
                moves[iid] = target
                rows.append(_row(rule, iid, "moved", f"group spans splits (leakage); moved "
                                 f"whole group to {target}", evidence=ev, from_split=sp,
                                 to_split=target))
    df = df.with_columns(
        pl.col("image_id").replace_strict(moves, default=pl.col("split"), return_dtype=pl.String)
        .alias("split"),
        (pl.col("removed") | pl.col("image_id").is_in(list(drops))).alias("removed"),
    )
    return df, rows


def duplicates(df: pl.DataFrame, rule: Rule, ctx: Context) -> tuple[pl.DataFrame, Lineage]:
    """Per duplicate cluster: keep the largest image when labels agree, else drop the cluster."""
    if rule.params["mode"] == "keep_all" or not ctx.links.height:
        return df, []
    labels = rule.params.get("labels") or ctx.recipe.label_names()
    kept = df.filter(~pl.col("removed"))
    u = units(kept.select("image_id", pl.lit(None, pl.String).alias("group_id")), ctx.links)
    sizes = u.group_by("unit").len().filter(pl.col("len") > 1)
    k = kept.join(u.select("image_id", "unit"), on="image_id").filter(
        pl.col("unit").is_in(sizes["unit"].implode()))
    rows: Lineage = []
    removed: set[str] = set()
    for (unit,), g in sorted(k.group_by("unit"), key=lambda x: x[0][0]):
        g = g.with_columns((pl.col("width").fill_null(0).cast(pl.Int64)
                            * pl.col("height").fill_null(0).cast(pl.Int64)).alias("_px"))
        cid = f"dup:{unit}"
        conflicts = {lab: sorted(map(str, g[lab].unique().to_list()))
                     for lab in labels if g[lab].n_unique() > 1}
        if conflicts:
            for iid in sorted(g["image_id"].to_list()):
                removed.add(iid)
                rows.append(_row(rule, iid, "removed", "duplicate cluster with conflicting labels",
                                 evidence=_ev(cluster=cid, conflicting=conflicts)))
            continue
        rep = g.sort(["_px", "image_id"], descending=[True, False])["image_id"][0]
        px_known = bool(g["_px"].max())
        for iid in sorted(g["image_id"].to_list()):
            if iid == rep:
                continue
            removed.add(iid)
            rows.append(_row(rule, iid, "merged", "duplicate of a kept image with the same labels",
                             evidence=_ev(cluster=cid, size=g.height, pixels_known=px_known),
                             into=rep))
    df = df.with_columns((pl.col("removed") | pl.col("image_id").is_in(list(removed))).alias("removed"))
    return df, rows


_HASH_TAIL = re.compile(r"_([0-9a-f]{8})$")


def match_names(entries: list[str], native_ids: list[str]) -> tuple[dict[str, str], list[str]]:
    """Match list entries to native ids: exactly, without extension, or by an 8-hex md5 tail.

    The Fitzpatrick17k audit names images ``<label>_f<type>_<n>_<md5[:8]>``; the tail is a
    prefix of the native id (the md5 hash). Returns ``(entry -> native id, unmatched)``.
    """
    exact = set(native_ids)
    stems = {n.rsplit(".", 1)[0]: n for n in native_ids}
    by_prefix: dict[str, list[str]] = {}
    for n in native_ids:
        by_prefix.setdefault(n[:8], []).append(n)
    found, missing = {}, []
    for e in entries:
        s = e.strip()
        stem = s.rsplit(".", 1)[0]
        m = _HASH_TAIL.search(stem)
        hit = (s if s in exact else stems.get(s) or stems.get(stem)
               or (by_prefix[m.group(1)][0] if m and len(by_prefix.get(m.group(1), [])) == 1 else None))
        if hit:
            found[s] = hit
        else:
            missing.append(s)
    return found, missing


def drop_outliers(df: pl.DataFrame, rule: Rule, ctx: Context) -> tuple[pl.DataFrame, Lineage]:
    """Drop images scoring above ``above`` in the outliers table and/or named in ``list``."""
    rows: Lineage = []
    drop: dict[str, tuple[str, str]] = {}
    kept = df.filter(~pl.col("removed"))
    above = rule.params.get("above")
    if above is not None:
        out = ctx.catalog.read("outliers", columns=["image_id", "score"], required=True,
                               hint="run 'medlake outliers' first, or use 'list:' instead")
        hit = kept.select("image_id").join(out, on="image_id").filter(pl.col("score") > above)
        for iid, sc in hit.sort("image_id").iter_rows():
            drop[iid] = (f"outlier score above {above}", _ev(outlier_score=sc, threshold=above))
    if rule.params.get("list"):
        raw = rule.params["list"]
        f = ctx.files[raw]
        entries = [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]
        found, missing = match_names(entries, df["native_id"].to_list())
        for i, e in enumerate(entries, start=1):
            if e in missing:
                ctx.quarantine.add(f.name, i, e, f"list entry matches no image of "
                                   f"'{ctx.recipe.dataset}' (rule {rule.name})")
        nat = dict(zip(kept["native_id"].to_list(), kept["image_id"].to_list()))
        for e, n in found.items():
            if n in nat and nat[n] not in drop:
                drop[nat[n]] = (f"named in {f.name}", _ev(list=f.name, entry=e))
    split = dict(zip(kept["image_id"].to_list(), kept["split"].to_list()))
    for iid in sorted(drop):
        rows.append(_row(rule, iid, "removed", drop[iid][0], evidence=drop[iid][1],
                         from_split=split.get(iid)))
    df = df.with_columns((pl.col("removed") | pl.col("image_id").is_in(list(drop))).alias("removed"))
    return df, rows


def drop_quality(df: pl.DataFrame, rule: Rule, ctx: Context) -> tuple[pl.DataFrame, Lineage]:
    """Drop images whose fingerprint carries any of ``flags`` (e.g. dark, blurry).

    The reason is the first matching flag in the order the recipe lists them; the evidence
    holds all the image's flags. Images without a fingerprint row are kept.
    """
    flags = list(rule.params["flags"])
    ds = ctx.recipe.dataset.replace("'", "''")
    fp = ctx.catalog.read("fingerprints", where=f"dataset_id = '{ds}'",
                          columns=["image_id", "flags"], required=True,
                          hint="run 'medlake fingerprint' first (drop_quality reads its flags)")
    kept = df.filter(~pl.col("removed")).select("image_id", "split")
    hit = kept.join(fp, on="image_id").filter(pl.col("flags").fill_null("") != "").sort("image_id")
    rows: Lineage = []
    for iid, sp, raw in hit.iter_rows():
        have = raw.split(",")
        if hits := [f for f in flags if f in have]:
            rows.append(_row(rule, iid, "removed", hits[0], from_split=sp,
                             evidence=_ev(flags=have, dropped_for=hits)))
    gone = [r["image_id"] for r in rows]
    df = df.with_columns((pl.col("removed") | pl.col("image_id").is_in(gone)).alias("removed"))
    return df, rows


def drop_unknown(df: pl.DataFrame, rule: Rule, ctx: Context) -> tuple[pl.DataFrame, Lineage]:
    """Drop images whose label is unknown (null, or one of ``values`` such as '-1')."""
    labels = rule.params.get("labels") or ctx.recipe.label_names()
    values = [str(v) for v in rule.params.get("values") or []]
    rows: Lineage = []
    drop: set[str] = set()
    kept = df.filter(~pl.col("removed")).sort("image_id")
    for lab in labels:
        bad = kept.filter(pl.col(lab).is_null() | pl.col(lab).is_in(values))
        for iid, v, sp in bad.select("image_id", lab, "split").iter_rows():
            if iid in drop:
                continue
            drop.add(iid)
            rows.append(_row(rule, iid, "removed", f"unknown {lab}", evidence=_ev(**{lab: v}),
                             label=lab, old_value=v, from_split=sp))
    df = df.with_columns((pl.col("removed") | pl.col("image_id").is_in(list(drop))).alias("removed"))
    return df, rows


def relabel(df: pl.DataFrame, rule: Rule, ctx: Context) -> tuple[pl.DataFrame, Lineage]:
    """Take label ``label`` from another source (e.g. a consensus source); log each change."""
    from medlake.catalog.recipes import LabelSpec

    lab = rule.params["label"]
    spec = LabelSpec(lab, rule.params["source"], rule.params.get("finding"),
                     str(rule.params.get("annotator") or ""))
    assert ctx.load_label is not None
    new = ctx.load_label(spec).rename({lab: "_new"})
    j = df.join(new, on="image_id", how="left")
    changed = j.filter(~pl.col("removed") & pl.col("_new").is_not_null()
                       & pl.col("_new").ne_missing(pl.col(lab)))
    rows = [_row(rule, iid, "relabelled", f"{lab} taken from {spec.source}", label=lab,
                 old_value=o, new_value=n, evidence=_ev(source=spec.source))
            for iid, o, n in changed.sort("image_id").select("image_id", lab, "_new").iter_rows()]
    df = j.with_columns(pl.when(pl.col("_new").is_not_null() & ~pl.col("removed"))
                        .then(pl.col("_new")).otherwise(pl.col(lab)).alias(lab)).drop("_new")
    return df, rows


def assign_splits(
    unit_sizes: pl.DataFrame, ratios: dict[str, float], seed: int
) -> dict[str, str]:
    """Group-aware stratified assignment: ``unit_sizes`` has unit, stratum, n.

    Within each stratum, units are shuffled (seeded), then taken largest first and given to
    the split furthest below its target count, so whole units stay together and each
    stratum's split shares approach ``ratios``.
    """
    rng = np.random.default_rng(seed)
    names = sorted(ratios, key=_split_key)
    out: dict[str, str] = {}
    for (stratum,), g in sorted(unit_sizes.group_by("stratum"), key=lambda x: str(x[0][0])):
        g = g.sort("unit")
        order = rng.permutation(g.height)
        g = g[order.tolist()].with_row_index("_r").sort(["n", "_r"], descending=[True, False])
        total = int(g["n"].sum())
        have = dict.fromkeys(names, 0)
        for unit, n in g.select("unit", "n").iter_rows():
            best = max(names, key=lambda s: (ratios[s] * total - have[s], ratios[s], -names.index(s)))
            out[unit] = best
            have[best] += n
    return out


def resplit(df: pl.DataFrame, rule: Rule, ctx: Context) -> tuple[pl.DataFrame, Lineage]:
    """A fresh split, stratified by a label and group-aware (whole groups/clusters together)."""
    p = rule.params
    kept = df.filter(~pl.col("removed"))
    if not kept.height:
        raise CatalogError(f"rule {rule.name}: no images left to split")
    u = units(kept.select("image_id", "group_id"),
              ctx.links if p["grouping"] == "duplicates" else None)
    strat = p.get("stratify")
    k = kept.join(u.select("image_id", "unit"), on="image_id")
    k = k.with_columns((pl.col(strat).fill_null("(unknown)") if strat else pl.lit("all"))
                       .cast(pl.String).alias("_s"))
    # a unit's stratum: its most common label (ties: smallest value)
    top = (k.group_by("unit", "_s").len().sort(["unit", "len", "_s"], descending=[False, True, False])
           .group_by("unit", maintain_order=True).first())
    sizes = k.group_by("unit").len().rename({"len": "n"}).join(
        top.select("unit", pl.col("_s").alias("stratum")), on="unit")
    assign = assign_splits(sizes, {str(a): float(b) for a, b in p["ratios"].items()}, p["seed"])
    new = k.select("image_id", "split", "unit").with_columns(
        pl.col("unit").replace_strict(assign).alias("_to"))
    moved = new.filter(pl.col("_to").ne_missing(pl.col("split"))).sort("image_id")
    rows = [_row(rule, iid, "moved", "re-split (stratified, group-aware)", from_split=a,
                 to_split=b, evidence=_ev(group=un, seed=p["seed"], stratify=strat))
            for iid, a, un, b in moved.select("image_id", "split", "unit", "_to").iter_rows()]
    df = df.join(new.select("image_id", "_to"), on="image_id", how="left").with_columns(
        pl.coalesce("_to", "split").alias("split")).drop("_to")
    return df, rows


def _review_rule(df: pl.DataFrame, rule: Rule, ctx: Context) -> tuple[pl.DataFrame, Lineage]:
    from medlake.pipelines.rules_reviews import relabel_from_reviews

    return relabel_from_reviews(df, rule, ctx)


RULE_FUNCS = {"fix_leakage": fix_leakage, "duplicates": duplicates, "drop_outliers": drop_outliers,
              "drop_unknown": drop_unknown, "relabel": relabel, "resplit": resplit,
              "drop_quality": drop_quality, "relabel_from_reviews": _review_rule}
