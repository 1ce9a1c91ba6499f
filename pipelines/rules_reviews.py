"""Recipe steps that use human review verdicts (``catalog.reviews``).

* ``duplicates: {exclude_verdict: different}`` (the recipe's duplicate-evidence block): pairs
  whose latest verdict is *different* (or *unclear*, if listed) are cut from the duplicate
  links before anything is clustered, so the ``duplicates`` rule does not merge them and
  ``fix_leakage`` / ``resplit`` do not tie them together. Each image that lost a link gets a
  lineage row (rule ``reviews``, step 0, action ``kept``) whose reason names the verdict.
* rule ``relabel_from_reviews``: images whose label the reviewers judged ``wrong`` (latest
  verdict per item) are dropped, get the other binary value (``flip``), or a fixed ``value``
  (``set``).

The verdict that counts is the newest one per item, whoever gave it
(``reviews.latest(per_reviewer=False)``).
"""

from __future__ import annotations

import polars as pl

from medlake.catalog import Catalog, CatalogError
from medlake.catalog import reviews as rv
from medlake.catalog.recipes import RecipeError, Rule
from medlake.pipelines.rules import Context, Lineage, _ev, _row

REVIEW_RULE = "reviews"


def _latest(catalog: Catalog, kind: str, dataset_id: str) -> pl.DataFrame:
    df = rv.latest(catalog, kind=kind, per_reviewer=False)
    return df.filter(pl.col("image_id").str.starts_with(dataset_id + ":"))


def exclude_pairs(
    catalog: Catalog, dataset_id: str, links: pl.DataFrame, verdicts: tuple[str, ...], *,
    use_clusters: bool,
) -> tuple[pl.DataFrame, Lineage]:
    """Remove duplicate links whose pair's latest verdict is in ``verdicts``.

    Cluster links (``evidence = 'cluster:...'``) join members to one representative, so a
    verdict on two other members would cut nothing; when the ``pairs`` table exists they are
    replaced by its verified pairs (the edges the clusters were built from) first.

    Returns
    -------
    (links, lineage rows)
        The remaining links, and one ``kept`` row per image that lost a link.
    """
    if not verdicts or not links.height:
        return links, []
    judged = _latest(catalog, "pair", dataset_id).filter(pl.col("verdict").is_in(list(verdicts)))
    if not judged.height:
        return links, []
    if use_clusters and catalog.tables.exists("pairs"):
        pre = dataset_id + ":"
        pairs = catalog.read("pairs", columns=["image_a", "image_b", "method", "score", "verified"])
        pairs = pairs.filter(pl.col("verified") & pl.col("image_a").str.starts_with(pre)
                             & pl.col("image_b").str.starts_with(pre))
        edges = pairs.select("image_a", "image_b", "score",
                             (pl.lit("pair:") + pl.col("method")).alias("evidence"))
        links = pl.concat([links.filter(~pl.col("evidence").str.starts_with("cluster:")), edges])
    key = pl.min_horizontal("image_a", "image_b") + "|" + pl.max_horizontal("image_a", "image_b")
    links = links.with_columns(key.alias("_item"))
    info = {r["item"]: r for r in judged.iter_rows(named=True)}
    cut = links.filter(pl.col("_item").is_in(list(info)))
    per_image: dict[str, list[dict[str, str]]] = {}
    for a, b, item in cut.unique("_item").sort("_item").select("image_a", "image_b", "_item").iter_rows():
        r = info[item]
        for me, other in ((a, b), (b, a)):
            per_image.setdefault(me, []).append(
                {"with": other, "verdict": r["verdict"], "reviewer": r["reviewer"],
                 "review_id": r["review_id"]})
    rows = []
    for iid in sorted(per_image):
        ev = per_image[iid]
        first = ev[0]
        more = f" (and {len(ev) - 1} more pairs)" if len(ev) > 1 else ""
        rows.append({"image_id": iid, "rule": REVIEW_RULE, "step": 0, "action": "kept",
                     "reason": f"duplicate pair with {first['with']} judged '{first['verdict']}' "
                               f"by {first['reviewer'] or 'a reviewer'}: not linked{more}",
                     "evidence": _ev(pairs=ev)})
    return links.filter(~pl.col("_item").is_in(list(info))).drop("_item"), rows


def _flip(v: str | None, iid: str, lab: str) -> str:
    table = {"0": "1", "1": "0", "0.0": "1", "1.0": "0", "false": "true", "true": "false"}
    if v is None or str(v).lower() not in table:
        raise RecipeError(f"relabel_from_reviews: action 'flip' needs a binary label (0/1); "
                          f"{iid} has {lab} = {v!r}; use action 'drop' or 'set'")
    return table[str(v).lower()]


def relabel_from_reviews(df: pl.DataFrame, rule: Rule, ctx: Context) -> tuple[pl.DataFrame, Lineage]:
    """Drop, flip or set the labels the reviewers judged ``verdict`` (default ``wrong``).

    A label review's item is ``<image>|<source>|<finding>``; the rule reads the verdicts on
    the label column's source (or ``source`` / ``finding`` given in the rule).
    """
    p = rule.params
    lab = p["label"]
    spec = next(s for s in ctx.recipe.labels if s.name == lab)
    source = p.get("source") or spec.source
    finding = p.get("finding") or spec.finding
    judged = _latest(ctx.catalog, "label", ctx.recipe.dataset).filter(
        pl.col("source_id") == source)
    if finding:
        judged = judged.filter(pl.col("finding") == finding)
    elif judged["finding"].n_unique() > 1:
        raise CatalogError(f"rule {rule.name}: reviews of '{source}' cover findings "
                           f"{sorted(judged['finding'].unique().to_list())}; name one with "
                           "'finding'")
    judged = judged.filter(pl.col("verdict") == p["verdict"])
    kept = df.filter(~pl.col("removed")).select("image_id", "split", lab)
    hit = kept.join(judged.select("image_id", "verdict", "reviewer", "review_id", "label"),
                    on="image_id").sort("image_id")
    rows: Lineage = []
    new: dict[str, str] = {}
    for r in hit.iter_rows(named=True):
        iid, old = r["image_id"], r[lab]
        reason = f"{lab} judged '{r['verdict']}' by {r['reviewer'] or 'a reviewer'} (latest verdict)"
        ev = _ev(review_id=r["review_id"], verdict=r["verdict"], reviewer=r["reviewer"],
                 source=source, label_shown=r["label"])
        if p["action"] == "drop":
            rows.append(_row(rule, iid, "removed", reason, evidence=ev, from_split=r["split"],
                             label=lab, old_value=old))
            continue
        val = _flip(old, iid, lab) if p["action"] == "flip" else str(p["value"])
        if val != old:
            new[iid] = val
            rows.append(_row(rule, iid, "relabelled", reason, evidence=ev, label=lab,
                             old_value=old, new_value=val))
    drop = [r["image_id"] for r in rows if r["action"] == "removed"]
    df = df.with_columns(
        (pl.col("removed") | pl.col("image_id").is_in(drop)).alias("removed"),
        pl.col("image_id").replace_strict(new, default=pl.col(lab), return_dtype=pl.String)
        .alias(lab),
    )
    return df, rows
