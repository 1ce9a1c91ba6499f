"""``medlake diff A B``: a semantic diff of two dataset versions.

Either side is a version name (a root ``<dataset>@<scheme|release>`` from ingest or a
derived version from a recipe) or a version folder. The diff reports images added, removed,
moved between splits and relabelled, per label column and (when B was derived from A by a
recipe) per rule, plus which label sources were added, removed or renamed (a source whose
values are identical on every shared image under another name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from medlake.catalog import Catalog, CatalogError, write_parquet_atomic
from medlake.catalog.versions import label_sources, load_version

KEY_COLS = {"image_id", "native_id", "dataset_id", "split", "group_id", "unit", "width",
            "height", "sha256", "path"}


@dataclass(frozen=True)
class Side:
    """One side of a diff: ``frame`` has image_id, split and one column per label key."""

    name: str
    frame: pl.DataFrame
    labels: dict[str, str]  # label key (source base/finding) -> column name shown
    parent: str | None
    lineage: pl.DataFrame | None


@dataclass(frozen=True)
class DiffResult:
    """``changes``: one row per image and change; ``summary``: counts; ``sources``: changes."""

    a: str
    b: str
    changes: pl.DataFrame
    summary: pl.DataFrame
    sources: list[dict[str, str]]
    by_label: pl.DataFrame

    def counts(self) -> dict[str, int]:
        g = self.changes.group_by("change").agg(pl.col("image_id").n_unique())
        return dict(sorted(g.iter_rows()))


def _key(source_finding: str) -> str:
    """``ham10000:dx/dx`` -> ``dx/dx``; a release suffix (``label@2021-04-16``) is dropped."""
    src, _, fin = source_finding.partition("/")
    base = src.split(":", 1)[-1].split("@", 1)[0]
    return f"{base}/{fin}" if fin else base


def load_side(catalog: Catalog, ref: str) -> Side:
    """Resolve a version name or folder into a :class:`Side`.

    Raises
    ------
    CatalogError
        When ``ref`` is neither a known version nor a version folder.
    """
    p = Path(ref)
    v = catalog.read("versions", where=f"name = '{ref.replace(chr(39), '')}'")
    if v.height and v["kind"][0] == "root":
        return _root(catalog, v.row(0, named=True))
    folder = p if (p / "manifest.parquet").is_file() else catalog.ws.versions_dir / ref
    if not (folder / "manifest.parquet").is_file():
        names = catalog.read("versions", columns=["name"])["name"].to_list()
        raise CatalogError(f"'{ref}' is not a version of this workspace nor a version folder; "
                           f"versions: {sorted(names)}")
    m = load_version(folder)
    srcs = label_sources(folder)
    labels = {_key(s): col for col, s in srcs.items()}
    frame = m.select("image_id", "split", *[pl.col(c).alias(k) for k, c in labels.items()])
    lin = pl.read_parquet(folder / "lineage.parquet") if (folder / "lineage.parquet").is_file() else None
    meta = json.loads((folder / "version.json").read_text()) if (folder / "version.json").is_file() else {}
    return Side(folder.name, frame, labels, meta.get("parent"), lin)


def _root(catalog: Catalog, row: dict) -> Side:
    from medlake.catalog.recipes import LabelSpec
    from medlake.pipelines.materialize import load_label, root_members

    ds = row["dataset_id"].replace("'", "''")
    f = root_members(catalog, row)
    params = json.loads(row["params"]) if row.get("params") else {}
    sources = params.get("sources")
    if not sources:  # every single-reader source of the dataset that is not release-tagged
        s = catalog.read("sources", where=f"dataset_id = '{ds}'", columns=["source_id"])
        sources = [x for x in s["source_id"].to_list() if "@" not in x]
    labels = {}
    pairs = catalog.query(
        "SELECT DISTINCT source_id, finding FROM annotations WHERE annotator = '' AND "
        f"source_id IN ({', '.join(repr(x) for x in sources) or 'NULL'}) ORDER BY 1, 2")
    for src, fin in pairs.iter_rows():
        k = _key(f"{src}/{fin}")
        lab = load_label(catalog, row["dataset_id"], LabelSpec(k, src, fin))
        f = f.join(lab, on="image_id", how="left")
        labels[k] = k
    return Side(row["name"], f.sort("image_id"), labels, None, None)


def diff(catalog: Catalog, a: str, b: str) -> DiffResult:
    """Compare versions ``a`` and ``b``; see the module docstring.

    Returns
    -------
    DiffResult
        ``changes`` columns: image_id, change (added, removed, moved, relabelled), label,
        old, new, from_split, to_split, rule.
    """
    A, B = load_side(catalog, a), load_side(catalog, b)
    common = [k for k in B.labels if k in A.labels]
    only_a = [k for k in A.labels if k not in B.labels]
    only_b = [k for k in B.labels if k not in A.labels]
    j = A.frame.join(B.frame, on="image_id", how="full", suffix="__b", coalesce=True)
    ina = pl.col("image_id").is_in(A.frame["image_id"].implode())
    inb = pl.col("image_id").is_in(B.frame["image_id"].implode())
    sources: list[dict[str, str]] = []
    both = j.filter(ina & inb)
    for kb in list(only_b):
        for ka in list(only_a):
            ca, cb = ka, kb + ("__b" if kb in A.frame.columns else "")
            if both.height and both.select(pl.col(ca).eq_missing(pl.col(cb)).all()).item():
                sources.append({"change": "renamed", "a": ka, "b": kb,
                                "note": f"identical values on all {both.height:,} shared images"})
                only_a.remove(ka)
                only_b.remove(kb)
                break
    sources += [{"change": "added", "a": "", "b": k, "note": "label source only in B"} for k in only_b]
    sources += [{"change": "removed", "a": k, "b": "", "note": "label source only in A"} for k in only_a]
    rows = []
    primary = common[0] if common else None

    def val(col: str) -> pl.Expr:
        return pl.col(col).cast(pl.String) if col in j.columns else pl.lit(None, pl.String)

    added = j.filter(inb & ~ina).select(
        "image_id", pl.lit("added").alias("change"), pl.lit(primary).alias("label"),
        pl.lit(None, pl.String).alias("old"),
        val(primary + ("__b" if primary in A.frame.columns else "")) if primary else pl.lit(None, pl.String),
        pl.lit(None, pl.String).alias("from_split"), pl.col("split__b").alias("to_split"))
    rows.append(added.rename({added.columns[4]: "new"}))
    removed = j.filter(ina & ~inb).select(
        "image_id", pl.lit("removed").alias("change"), pl.lit(primary).alias("label"),
        (val(primary) if primary else pl.lit(None, pl.String)).alias("old"),
        pl.lit(None, pl.String).alias("new"), pl.col("split").alias("from_split"),
        pl.lit(None, pl.String).alias("to_split"))
    rows.append(removed)
    moved = both.filter(pl.col("split").ne_missing(pl.col("split__b"))).select(
        "image_id", pl.lit("moved").alias("change"), pl.lit(None, pl.String).alias("label"),
        pl.lit(None, pl.String).alias("old"), pl.lit(None, pl.String).alias("new"),
        pl.col("split").alias("from_split"), pl.col("split__b").alias("to_split"))
    rows.append(moved)
    for k in common:
        cb = k + "__b"
        rel = both.filter(pl.col(k).cast(pl.String).ne_missing(pl.col(cb).cast(pl.String))).select(
            "image_id", pl.lit("relabelled").alias("change"), pl.lit(k).alias("label"),
            pl.col(k).cast(pl.String).alias("old"), pl.col(cb).cast(pl.String).alias("new"),
            pl.col("split__b").alias("from_split"), pl.col("split__b").alias("to_split"))
        rows.append(rel)
    changes = pl.concat(rows, how="vertical_relaxed").sort("change", "image_id", "label",
                                                          nulls_last=True)
    changes = changes.join(_rules(A, B), on=["image_id", "change"], how="left")
    summary = (changes.with_columns(pl.col("rule").fill_null("")).group_by(
        "change", "rule", "label", "from_split", "to_split").len().rename({"len": "images"})
        .sort("change", "rule", "label", "from_split", "to_split", nulls_last=True))
    by_label = (changes.filter(pl.col("label").is_not_null()).with_columns(
        pl.when(pl.col("change") == "relabelled").then(pl.col("old") + " -> " + pl.col("new"))
        .otherwise(pl.coalesce("new", "old")).alias("value"), pl.col("rule").fill_null(""))
        .group_by("change", "rule", "label", "value").len().rename({"len": "images"})
        .sort("change", "rule", "label", "images", "value", descending=[False, False, False, True, False]))
    return DiffResult(A.name, B.name, changes, summary, sources, by_label)


def _rules(A: Side, B: Side) -> pl.DataFrame:
    """The rule behind each change when B's lineage starts from A (else empty)."""
    empty = pl.DataFrame(schema={"image_id": pl.String, "change": pl.String, "rule": pl.String})
    if B.lineage is None or B.parent != A.name:
        return empty
    lin = B.lineage.filter(pl.col("action") != "kept").with_columns(
        pl.col("action").replace({"merged": "removed"}).alias("change"))
    return (lin.sort("step").group_by("image_id", "change", maintain_order=True)
            .agg(pl.col("rule").str.join("+")).select("image_id", "change", "rule"))


def run(catalog: Catalog, a: str, b: str, *, out: Path | str | None = None) -> DiffResult:
    """:func:`diff`, and write its changes as Parquet to ``out`` when given."""
    res = diff(catalog, a, b)
    if out is not None:
        meta = {b"medlake.diff": json.dumps({"a": res.a, "b": res.b, "sources": res.sources},
                                            sort_keys=True).encode()}
        at = res.changes.to_arrow()
        write_parquet_atomic(at.replace_schema_metadata(meta), Path(out))
    return res


def render(res: DiffResult) -> str:
    """Text for the CLI: counts per change, the summary table and source changes."""
    lines = [f"diff {res.a} -> {res.b}"]
    c = res.counts()
    lines.append("images: " + ", ".join(f"{k} {c.get(k, 0):,}"
                                        for k in ("added", "removed", "moved", "relabelled")))
    rel = res.changes.filter(pl.col("change") == "relabelled")
    if not rel.height:
        lines.append("no label changed on the images both versions hold")
    for s in res.sources:
        lines.append(f"label source {s['change']}: {s['a'] or '-'} -> {s['b'] or '-'} ({s['note']})")
    if res.summary.height:
        from medlake.catalog import render as render_table

        lines.append(render_table(res.summary.to_arrow(), "table", max_rows=60).rstrip("\n"))
    if res.by_label.height:
        lines.append("per label value (first 20; all in the Parquet output):")
        lines.append(render_table(res.by_label.head(20).to_arrow(), "table", max_rows=20).rstrip("\n"))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    from medlake.cli.main import run_stage

    run_stage("diff")
