"""Facts for a version's ``DATASHEET.md`` (rendered by :func:`catalog.versions.render_datasheet`)."""

from __future__ import annotations

from typing import Any

import polars as pl

from medlake.catalog import Catalog
from medlake.catalog.recipes import Recipe
from medlake.pipelines.leakage import SPLIT_ORDER


def _order(s: Any) -> tuple[int, str]:
    return (SPLIT_ORDER.get(s, 9), str(s))


def datasheet_info(
    catalog: Catalog, rec: Recipe, manifest: pl.DataFrame, st: dict[str, Any],
    dsinfo: dict[str, Any], has_images: bool, inputs: dict[str, str],
) -> dict[str, Any]:
    """Gather counts, per-rule changes, leakage, agreement, sources and limitations."""
    splits = sorted(manifest["split"].fill_null("(none)").unique().to_list(), key=_order)
    counts = {s: manifest.filter(pl.col("split").fill_null("(none)") == s).height for s in splits}
    label_counts, label_totals = {}, {}
    for lab in rec.label_names():
        per = {}
        for s in splits:
            g = manifest.filter(pl.col("split").fill_null("(none)") == s)[lab].fill_null("(unknown)")
            per[s] = dict(sorted(g.value_counts().iter_rows(), key=lambda kv: str(kv[0])))
        label_counts[lab] = per
        tot = manifest[lab].fill_null("(unknown)").value_counts().iter_rows()
        label_totals[lab] = dict(sorted(tot, key=lambda kv: str(kv[0])))
    lin = pl.DataFrame(st["lineage"], infer_schema_length=None)
    rules = (lin.filter(pl.col("step") > 0).group_by("step", "rule", "action", "reason").len()
             .sort("step", "action", "reason"))
    rule_rows = [{"step": r["step"], "rule": r["rule"], "action": r["action"], "n": r["len"],
                  "reason": r["reason"]} for r in rules.iter_rows(named=True)]
    agreement = _agreement_lines(catalog, rec.dataset)
    src = catalog.read("sources", where=f"dataset_id = '{rec.dataset.replace(chr(39), '')}'",
                       columns=["source_id", "kind", "rule"]).sort("source_id")
    limitations = []
    if not has_images:
        limitations.append("Metadata only: no image files are available to medlake for this "
                           "dataset, so the version carries the manifest and labels, not pixels.")
    if any(r.kind == "duplicates" for r in rec.rules) and not manifest["width"].drop_nulls().len():
        limitations.append("Image sizes are unknown, so the image kept per duplicate cluster is "
                           "the first by image id, not the largest.")
    if not st["links"].height:
        limitations.append("No duplicate evidence (clusters table or pair list) was available: "
                           "groups are patients/lesions only.")
    q = st["quarantine"].count()
    if q:
        limitations.append(f"{q:,} entries of the recipe's lists matched no image and are in the "
                           "quarantine table (stage materialize).")
    for lab in rec.label_names():
        n = manifest[lab].null_count()
        if n:
            limitations.append(f"{n:,} images have an unknown `{lab}`.")
    phi = manifest.filter(pl.col("image_id").is_in(
        st["df"].filter(pl.col("phi_tags").fill_null("") != "")["image_id"].implode())).height
    if phi:
        limitations.append(f"{phi:,} images carry identifying DICOM tags (images.phi_tags): "
                           "check before pushing this version anywhere public.")
    return {
        "name": rec.name, "dataset": dsinfo, "parent": rec.parent, "recipe_file": rec.file,
        "recipe_hash": rec.hash, "description": rec.description, "counts": counts,
        "label_counts": label_counts, "label_totals": label_totals, "rules": rule_rows,
        "leakage_before": st["leak_before"], "leakage_after": st["leak_after"],
        "agreement": agreement, "sources": src.to_dicts(), "limitations": limitations,
        "inputs": {k[5:]: v for k, v in inputs.items() if k.startswith("file:")},
        "images": has_images,
        "privacy": {"identifying": phi, "acknowledged": rec.privacy_ack},
        "environment": environment(),
    }


def environment() -> dict[str, str]:
    """The medlake version and the sha256 of the lock file it was installed from (when the
    workspace is medlake's own checkout or ``MEDLAKE_LOCK`` names one); deterministic."""
    import hashlib
    import os
    from pathlib import Path

    from medlake import __version__

    out = {"medlake_version": __version__}
    lock = os.environ.get("MEDLAKE_LOCK")
    cand = Path(lock) if lock else Path(__file__).resolve().parent.parent / "requirements.lock"
    if cand.is_file():
        out["lock_sha256"] = hashlib.sha256(cand.read_bytes()).hexdigest()
    return out


def _agreement_lines(catalog: Catalog, dataset_id: str) -> list[str]:
    if not catalog.tables.exists("agreement"):
        return []
    ag = catalog.read("agreement").filter(pl.col("dataset_id") == dataset_id)
    if not ag.height or "kappa" not in ag.columns:
        return []
    g = (ag.filter(pl.col("kappa").is_not_null()).group_by("finding")
         .agg(pl.len().alias("pairs"), pl.col("kappa").min().alias("lo"),
              pl.col("kappa").max().alias("hi")).sort("finding"))
    lines = [f"Cohen's kappa between label sources (from the agreement table, {ag.height:,} rows):", ""]
    lines += [f"- {r['finding']}: {r['pairs']} source pair(s), kappa {r['lo']:.2f} to {r['hi']:.2f}"
              for r in g.iter_rows(named=True)]
    return lines
