"""``profile``: what a dataset holds, in a few tables.

Images, groups (patients or lesions) and studies; how concentrated images are per group;
finding prevalence per source; which images each source covers and how sources overlap;
split schemes; quarantined rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from medlake.catalog.core import Catalog
from medlake.catalog.errors import CatalogError
from medlake.catalog.sql import render

THRESHOLDS = (1, 5, 10, 50, 100)


@dataclass(frozen=True)
class Profile:
    """A dataset profile. Every attribute but ``summary`` is a Polars frame."""

    dataset_id: str
    summary: dict[str, Any]
    group_sizes: pl.DataFrame
    prevalence: pl.DataFrame
    coverage: pl.DataFrame
    overlap: pl.DataFrame
    splits: pl.DataFrame
    quarantine: pl.DataFrame
    extra: dict[str, pl.DataFrame] = field(default_factory=dict)

    def render(self) -> str:
        """Plain-text report for the terminal."""
        s = self.summary
        lines = [
            (f"dataset {self.dataset_id}: {s['images']:,} images, {s['groups']:,} groups "
             f"(patients/lesions), {s['studies']:,} studies, {s['sources']} label sources, "
             f"{s['quarantined']:,} quarantined rows"),
            "",
            "groups with more than N images (and the images they hold):",
            _table(self.group_sizes),
        ]
        for title, df in (
            ("finding prevalence per source:", self.prevalence),
            ("source coverage:", self.coverage),
            ("images shared between sources:", self.overlap),
            ("splits:", self.splits),
            ("quarantine:", self.quarantine),
            *((f"{k}:", v) for k, v in self.extra.items()),
        ):
            if df.height:
                lines += ["", title, _table(df)]
        return "\n".join(lines)


def _table(df: pl.DataFrame, rows: int = 40) -> str:
    return render(df, "table", max_rows=rows, more="query them with medlake sql")


def _agreement(catalog: Catalog, dataset_id: str) -> pl.DataFrame | None:
    from medlake.catalog.stats import agreement_summary

    df = agreement_summary(catalog, dataset_id)
    if df is None or not df.height:
        return None
    keep = [c for c in ("finding", "source_a", "annotator_a", "source_b", "annotator_b",
                        "n_shared", "kappa", "kappa_lo", "kappa_hi", "ppv", "note") if c in df.columns]
    return df.select(keep).head(30)


# Sections from later stages: name -> function(catalog, dataset_id) -> frame (or None).
SECTIONS: dict[str, Callable[[Catalog, str], pl.DataFrame | None]] = {
    "agreement between sources (medlake agreement)": _agreement,
}


def profile(catalog: Catalog, dataset_id: str, *, max_findings: int = 25) -> Profile:
    """Profile one ingested dataset.

    Parameters
    ----------
    dataset_id
        A dataset id as in the ``datasets`` table.
    max_findings
        Per source, the most prevalent findings to list.

    Raises
    ------
    CatalogError
        When the dataset is not ingested (the message lists those that are).
    """
    known = catalog.dataset_ids()
    if dataset_id not in known:
        raise CatalogError(
            f"dataset '{dataset_id}' is not in this workspace; ingested datasets: "
            f"{', '.join(known) or 'none yet (run medlake ingest)'}"
        )
    con = catalog.connect()
    try:
        def q(sql: str) -> pl.DataFrame:
            return con.sql(sql, params={"ds": dataset_id}).pl()

        head = q("""
            SELECT count(*) AS images, count(DISTINCT group_id) AS groups,
                   count(DISTINCT study_id) AS studies
            FROM images WHERE dataset_id = $ds""").row(0, named=True)
        n_sources = q("SELECT count(*) AS n FROM sources WHERE dataset_id = $ds")["n"][0]
        n_quar = q("SELECT count(*) AS n FROM quarantine WHERE dataset_id = $ds")["n"][0]
        per_group = q("""
            SELECT group_id, count(*) AS n FROM images
            WHERE dataset_id = $ds AND group_id IS NOT NULL GROUP BY group_id""")
        group_sizes = pl.DataFrame([
            {"more_than": t,
             "groups": int((per_group["n"] > t).sum()),
             "images": int(per_group.filter(pl.col("n") > t)["n"].sum())}
            for t in THRESHOLDS
        ], schema={"more_than": pl.Int64, "groups": pl.Int64, "images": pl.Int64})
        coverage = q("""
            SELECT s.source_id, s.kind, s.negatives, count(c.image_id) AS images
            FROM sources s LEFT JOIN coverage c USING (source_id)
            WHERE s.dataset_id = $ds GROUP BY ALL ORDER BY s.source_id""")
        overlap = q("""
            WITH c AS (SELECT c.* FROM coverage c JOIN sources s USING (source_id)
                       WHERE s.dataset_id = $ds)
            SELECT a.source_id AS source_a, b.source_id AS source_b, count(*) AS shared_images
            FROM c a JOIN c b ON a.image_id = b.image_id AND a.source_id < b.source_id
            GROUP BY ALL ORDER BY ALL""")
        # prevalence: positives over judged images; implicit-negative sources are judged on
        # every covered image, positive-only sources have no denominator
        prevalence = q(f"""
            WITH src AS (SELECT * FROM sources WHERE dataset_id = $ds),
            cov AS (SELECT source_id, count(*) AS covered FROM coverage
                    WHERE source_id IN (SELECT source_id FROM src) GROUP BY ALL),
            a AS (
              SELECT a.source_id, a.finding,
                     count(DISTINCT a.image_id) FILTER (WHERE a.value IS NOT NULL) AS judged_rows,
                     count(DISTINCT a.image_id) FILTER (WHERE a.value > 0) AS positive
              FROM annotations a JOIN src USING (source_id)
              WHERE src.value_type IN ('binary', 'graded')
              GROUP BY ALL)
            SELECT a.source_id, a.finding, a.positive,
                   CASE src.negatives WHEN 'implicit' THEN cov.covered
                        WHEN 'none' THEN NULL ELSE a.judged_rows END AS judged,
                   round(a.positive / NULLIF(judged, 0), 4) AS prevalence
            FROM a JOIN src USING (source_id) LEFT JOIN cov USING (source_id)
            QUALIFY row_number() OVER (PARTITION BY a.source_id ORDER BY a.positive DESC,
                                                     a.finding) <= {int(max_findings)}
            ORDER BY a.source_id, a.positive DESC, a.finding""")
        categories = q("""
            SELECT a.source_id, a.finding, a.category, count(*) AS images
            FROM annotations a JOIN sources s USING (source_id)
            WHERE s.dataset_id = $ds AND s.value_type = 'category' AND a.category IS NOT NULL
            GROUP BY ALL ORDER BY a.source_id, a.finding, images DESC""")
        splits = q("""
            SELECT scheme, split, count(*) AS images, count(DISTINCT i.group_id) AS groups
            FROM splits s JOIN images i USING (image_id)
            WHERE s.dataset_id = $ds GROUP BY ALL ORDER BY scheme, split""")
        quarantine = q("""
            SELECT stage, file, reason, count(*) AS rows FROM quarantine
            WHERE dataset_id = $ds GROUP BY ALL ORDER BY rows DESC LIMIT 20""")
    finally:
        con.close()
    extra: dict[str, pl.DataFrame] = {}
    if categories.height:
        extra["categories per source"] = categories
    for name, fn in SECTIONS.items():
        df = fn(catalog, dataset_id)
        if df is not None and df.height:
            extra[name] = df
    return Profile(
        dataset_id=dataset_id,
        summary={**head, "sources": int(n_sources), "quarantined": int(n_quar)},
        group_sizes=group_sizes, prevalence=prevalence, coverage=coverage, overlap=overlap,
        splits=splits, quarantine=quarantine, extra=extra,
    )
