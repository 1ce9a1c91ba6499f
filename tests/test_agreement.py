"""Stage ``agreement`` on a generated lake, checked against scikit-learn and statsmodels."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import cohens_kappa as sm_kappa
from statsmodels.stats.proportion import proportion_confint

from medlake.catalog import Catalog, CatalogError
from medlake.catalog.consensus import BinariseRule, consensus
from medlake.catalog.stats import agreement_summary
from medlake.pipelines import agreement

N = 300
GRADES = [0.0, 0.25, 0.5, 0.75, 1.0]


def _src(sid, negatives="explicit", value_type="binary", kind="expert"):
    return {"source_id": sid, "dataset_id": "toy", "name": sid.split(":")[1], "kind": kind,
            "exhaustive": negatives != "none", "negatives": negatives, "value_type": value_type,
            "rule": f"rule of {sid}"}


@pytest.fixture
def toy(catalog: Catalog):
    """A lake with every kind of source, random but seeded labels; returns (catalog, truth)."""
    rng = np.random.default_rng(42)
    img = [f"toy:{i:04d}" for i in range(N)]
    a = (rng.random((N, 2)) < 0.3).astype(float)  # findings f1, f2 from source A
    b = np.where(rng.random((N, 2)) < 0.85, a, 1 - a)  # source B mostly agrees
    cov_c = rng.random(N) < 0.7  # implicit source C covers 70% of images
    c = np.where(rng.random((N, 2)) < 0.8, a, 1 - a)
    d_pos = (a[:, 0] == 1) & (rng.random(N) < 0.5)  # positive-only source D, finding f1
    g1 = rng.choice(GRADES, N)
    g2 = np.clip(g1 + rng.choice([-0.25, 0, 0.25], N), 0, 1)
    s1 = rng.integers(1, 7, N).astype(float)
    s2 = np.clip(s1 + rng.integers(-1, 2, N), 1, 6)
    s1[:15] = np.nan  # unknown skin type (-1 in the source)
    view = np.where(rng.random(N) < 0.5, "PA", "AP")
    ann = []
    for i in range(N):
        for j, f in enumerate(["f1", "f2"]):
            ann.append((img[i], "toy:A", "", f, a[i, j], None))
            ann.append((img[i], "toy:B", "", f.upper(), b[i, j], None))
            if cov_c[i] and c[i, j] == 1:
                ann.append((img[i], "toy:C", "", f, 1.0, None))
        ann.append((img[i], "toy:A", "", "f3", 0.0, None))  # no positives at all
        ann.append((img[i], "toy:B", "", "F3", 0.0, None))
        if d_pos[i]:
            ann.append((img[i], "toy:D", "", "f1", 1.0, None))
        ann.append((img[i], "toy:E", "a1", "tube", None if i == 7 else g1[i], "INVALID" if i == 7 else None))
        ann.append((img[i], "toy:E", "a2", "tube", g2[i], None))
        ann.append((img[i], "toy:S1", "", "skin", None if np.isnan(s1[i]) else s1[i], None))
        ann.append((img[i], "toy:S2", "", "skin", s2[i], None))
    annotations = pl.DataFrame(
        ann, schema=["image_id", "source_id", "annotator", "finding", "value", "raw_value"],
        orient="row",
    ).with_columns(pl.col("value").cast(pl.Float64), pl.lit(False).alias("is_invalid"))
    sources = [_src("toy:A"), _src("toy:B", kind="report_nlp"), _src("toy:C", "implicit"),
               _src("toy:D", "none"), _src("toy:E", value_type="graded", kind="non_expert"),
               _src("toy:S1", value_type="ordinal"), _src("toy:S2", value_type="ordinal")]
    findings = [{"source_id": s, "finding": f, "shared_finding": f.lower(), "value_type": "binary"}
                for s, fs in {"toy:A": ["f1", "f2", "f3"], "toy:B": ["F1", "F2", "F3"],
                              "toy:C": ["f1", "f2"], "toy:D": ["f1"]}.items() for f in fs]
    findings += [{"source_id": "toy:E", "finding": "tube", "shared_finding": "tube",
                  "value_type": "graded"},
                 {"source_id": "toy:S1", "finding": "skin", "shared_finding": "skin_type",
                  "value_type": "ordinal"},
                 {"source_id": "toy:S2", "finding": "skin", "shared_finding": "skin_type",
                  "value_type": "ordinal"}]
    with catalog.transaction() as tx:
        tx.write("datasets", [{"dataset_id": "toy", "name": "toy"}], stage="ingest", partition="toy")
        tx.write("images", pl.DataFrame({"image_id": img, "dataset_id": "toy", "view": view}),
                 stage="ingest", partition="toy")
        tx.write("sources", sources, stage="ingest", partition="toy")
        tx.write("annotations", annotations, stage="ingest", partition="toy")
        tx.write("findings", findings, stage="ingest", partition="toy")
        tx.write("coverage", pl.DataFrame({"image_id": [x for x, k in zip(img, cov_c) if k],
                                           "source_id": "toy:C"}), stage="ingest", partition="toy")
    (catalog.ws.root / "params.yaml").write_text(
        "agreement:\n"
        "  references: [{test: 'toy:B', reference: 'toy:A'}]\n"
        "  consensus: [{source: 'toy:E', rule: all_certain_agree, name: e_strict}]\n"
        "  subgroups: [view]\n"
    )
    truth = {"a": a, "b": b, "c": c, "cov_c": cov_c, "d_pos": d_pos, "g1": g1, "g2": g2,
             "s1": s1, "s2": s2, "view": view}
    return catalog, truth


def _row(df, a, b, finding, subgroup="", value="", aa="", ab=""):
    r = df.filter((pl.col("source_a") == a) & (pl.col("source_b") == b)
                  & (pl.col("annotator_a") == aa) & (pl.col("annotator_b") == ab)
                  & (pl.col("finding") == finding) & (pl.col("subgroup") == subgroup)
                  & (pl.col("subgroup_value") == value))
    assert r.height == 1, (a, b, finding, subgroup, value, r)
    return r.row(0, named=True)


def test_binary_pair_kappa_ci_and_reference_statistics(toy):
    cat, t = toy
    res = agreement.run(cat, "toy")
    df = cat.read("agreement")
    assert res.rows["toy"] == df.height > 0
    for j, f in enumerate(["f1", "f2"]):
        r = _row(df, "toy:A", "toy:B", f)
        a, b = t["a"][:, j], t["b"][:, j]
        table = np.array([[np.sum((a == x) & (b == y)) for y in (0, 1)] for x in (0, 1)])
        sm = sm_kappa(table)
        assert r["kind"] == "pair" and r["n_shared"] == N
        assert r["kappa"] == pytest.approx(cohen_kappa_score(a, b))
        assert (r["kappa_lo"], r["kappa_hi"]) == pytest.approx((sm.kappa_low, sm.kappa_upp))
        assert (r["pos_a"], r["pos_b"]) == (a.sum(), b.sum())
        # B is the test, A the reference (params.yaml)
        assert r["reference"] == "toy:A"
        tp = int(((a == 1) & (b == 1)).sum())
        lo, hi = proportion_confint(tp, int(b.sum()), method="wilson")
        assert r["ppv"] == pytest.approx(tp / b.sum())
        assert (r["ppv_lo"], r["ppv_hi"]) == pytest.approx((lo, hi))
        assert r["sens"] == pytest.approx(tp / a.sum())


def test_undefined_kappa_is_null_with_a_reason(toy):
    cat, _ = toy
    agreement.run(cat, "toy")
    r = _row(cat.read("agreement"), "toy:A", "toy:B", "f3")
    assert r["kappa"] is None and r["kappa_lo"] is None
    assert r["observed"] == 1.0 and r["pos_a"] == 0
    assert "kappa undefined" in r["note"] and "ppv undefined: no test positives" in r["note"]


def test_implicit_negatives_are_densified_over_covered_images(toy):
    cat, t = toy
    agreement.run(cat, "toy")
    r = _row(cat.read("agreement"), "toy:A", "toy:C", "f1")
    cov = t["cov_c"]
    a, c = t["a"][cov, 0], t["c"][cov, 0]
    assert r["n_shared"] == cov.sum()
    assert r["kappa"] == pytest.approx(cohen_kappa_score(a, c))


def test_positive_only_source_gets_only_valid_statistics(toy):
    cat, t = toy
    agreement.run(cat, "toy")
    df = cat.read("agreement")
    r = _row(df, "toy:D", "toy:A", "f1")
    assert r["kind"] == "positive_only"
    assert r["kappa"] is None and r["ppv"] is None
    assert "positive-only" in r["note"]
    d = t["d_pos"]
    assert r["n_shared"] == d.sum()
    assert r["pos_confirmed"] == pytest.approx(t["a"][d, 0].mean())


def test_graded_annotators_binarised_weighted_and_consensus(toy):
    cat, t = toy
    res = agreement.run(cat, "toy")
    df = cat.read("agreement")
    r = _row(df, "toy:E", "toy:E", "tube", aa="a1", ab="a2")
    g1, g2 = t["g1"].copy(), t["g2"]
    ok = (np.arange(N) != 7) & (g1 != 0.5) & (g2 != 0.5)  # invalid and middle excluded
    assert r["n_shared"] == ok.sum()
    assert r["n_excluded_a"] == int((np.arange(N) == 7).sum() + (g1[np.arange(N) != 7] == 0.5).sum())
    assert r["kappa"] == pytest.approx(cohen_kappa_score(g1[ok] >= 0.5, g2[ok] >= 0.5))
    keep = np.arange(N) != 7
    lab = lambda g: np.searchsorted(GRADES, g)
    for w in ("linear", "quadratic"):
        ref = cohen_kappa_score(lab(g1[keep]), lab(g2[keep]), weights=w, labels=range(5))
        assert r[f"kappa_{w}"] == pytest.approx(ref)
    # the derived source: written, its rule recorded, one row per (image, finding), compared
    assert res.derived == ("toy:e_strict",)
    src = cat.read("sources").filter(pl.col("source_id") == "toy:e_strict").row(0, named=True)
    assert src["kind"] == "derived" and json.loads(src["rule"])["consensus"] == "all_certain_agree"
    ann = cat.read("annotations").filter(pl.col("source_id") == "toy:e_strict")
    assert ann.height == N
    both_pos = ((g1 >= 0.5) & (g1 != 0.5) & (g2 >= 0.5) & (g2 != 0.5) & keep).sum()
    assert ann.filter(pl.col("value") == 1).height == both_pos
    raters = _row(df, "toy:E", "toy:E", "tube", aa="*", ab="*")
    assert raters["kind"] == "raters" and raters["n_raters"] == 2
    assert raters["fleiss"] is not None


def test_ordinal_sources_weighted_kappa_off_by_one_and_unknowns(toy):
    cat, t = toy
    agreement.run(cat, "toy")
    r = _row(cat.read("agreement"), "toy:S1", "toy:S2", "skin_type")
    ok = ~np.isnan(t["s1"])
    s1, s2 = t["s1"][ok].astype(int), t["s2"][ok].astype(int)
    assert r["n_shared"] == ok.sum() and r["n_excluded_a"] == 15
    assert r["kappa"] == pytest.approx(cohen_kappa_score(s1, s2))
    for w in ("linear", "quadratic"):
        assert r[f"kappa_{w}"] == pytest.approx(
            cohen_kappa_score(s1, s2, weights=w, labels=range(1, 7)))
    assert r["off_by_one"] == pytest.approx(np.mean(np.abs(s1 - s2) <= 1))


def test_subgroups_show_sizes_and_match_the_subset(toy):
    cat, t = toy
    agreement.run(cat, "toy")
    df = cat.read("agreement")
    for v in ("AP", "PA"):
        m = t["view"] == v
        r = _row(df, "toy:A", "toy:B", "f1", "view", v)
        assert r["n_subgroup"] == m.sum() == r["n_shared"]
        assert r["kappa"] == pytest.approx(cohen_kappa_score(t["a"][m, 0], t["b"][m, 0]))
    assert _row(df, "toy:A", "toy:B", "f1")["n_subgroup"] == N


def test_rerun_is_identical_and_summary_and_discrepancies(toy):
    cat, t = toy
    agreement.run(cat, "toy")
    files = {p: p.read_bytes() for p in cat.tables.files("agreement")}
    agreement.run(cat, "toy")
    assert {p: p.read_bytes() for p in cat.tables.files("agreement")} == files
    assert cat.read("sources").filter(pl.col("kind") == "derived").height == 1
    s = agreement_summary(cat, "toy")
    assert s.height == cat.read("agreement").filter(pl.col("subgroup") == "").height
    dis = pl.from_arrow(cat.sql(
        "SELECT * FROM discrepancies WHERE finding = 'f1' ORDER BY image_id"))
    a, b = t["a"][:, 0], t["b"][:, 0]
    c = np.where(t["cov_c"], t["c"][:, 0], np.nan)
    d = np.where(t["d_pos"], 1.0, np.nan)
    stacked = np.stack([a, b, c, d], 1)
    expect = sum(len(set(x[~np.isnan(x)].tolist())) > 1 for x in stacked)
    assert dis.height == expect
    row = dis.row(0, named=True)
    assert "toy:A=" in row["labels"] and "toy:B=" in row["labels"]


def test_consensus_rules():
    df = pl.DataFrame({"image_id": ["i"] * 3 + ["j"] * 3 + ["k"] * 2,
                       "finding": ["f"] * 8, "annotator": ["a", "b", "c"] * 2 + ["a", "b"],
                       "value": [1.0, 0.75, 0.25, 0.5, 0.0, 0.0, None, 1.0]})
    maj = consensus(df, rule="majority").sort("image_id")["value"].to_list()
    assert maj == [1.0, 0.0, 1.0]
    strict = consensus(df, rule="all_certain_agree").sort("image_id")["value"].to_list()
    assert strict == [None, None, None]
    anyp = consensus(df, rule="any_positive", binarise=BinariseRule(middle_as="positive"))
    assert anyp.sort("image_id")["value"].to_list() == [1.0, 1.0, 1.0]
    unc = consensus(df, rule="majority", binarise=BinariseRule(middle_as="uncertain"))
    assert unc.sort("image_id")["n_unc"].to_list() == [0, 1, 0]
    with pytest.raises(CatalogError, match="unknown consensus rule"):
        consensus(df, rule="vote")  # type: ignore[arg-type]
    with pytest.raises(CatalogError, match="middle_as"):
        BinariseRule(middle_as="maybe")  # type: ignore[arg-type]


def test_bad_input_errors(toy, catalog):
    cat, _ = toy
    with pytest.raises(CatalogError, match="no label sources"):
        agreement.run(cat, "nope")
    (cat.ws.root / "params.yaml").write_text("agreement:\n  refrences: []\n")
    with pytest.raises(CatalogError, match=r"agreement\.refrences: unknown key \(did you mean 'references'\?\)"):
        agreement.run(cat, "toy")
    (cat.ws.root / "params.yaml").write_text(
        "agreement:\n  consensus: [{source: 'toy:missing', rule: majority}]\n")
    with pytest.raises(CatalogError, match="not in the sources table"):
        agreement.run(cat, "toy")


def test_cli_writes_table_and_plot(toy, tmp_path):
    from medlake.cli.main import main

    cat, _ = toy
    out = tmp_path / "agreement.png"
    res = CliRunner().invoke(main, ["agreement", "toy", "--plot", str(out),
                                    "--workspace", str(cat.ws.root)])
    assert res.exit_code == 0, res.output
    assert "toy: " in res.output and "agreement rows" in res.output
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    bad = CliRunner().invoke(main, ["agreement", "nope", "--workspace", str(cat.ws.root)])
    assert bad.exit_code == 1 and "no label sources" in bad.output


def test_dataset_with_only_category_sources_gives_empty_table(catalog):
    """Nothing comparable (category labels only): an empty table, not a crash."""
    import polars as pl

    from medlake.pipelines import agreement as stage

    with catalog.transaction() as tx:
        tx.write("datasets", [{"dataset_id": "c"}], stage="ingest", partition="c")
        tx.write("images", pl.DataFrame({"image_id": ["c:1", "c:2"], "dataset_id": ["c", "c"]}),
                 stage="ingest", partition="c")
        tx.write("sources", [{"source_id": "c:dx", "dataset_id": "c", "kind": "expert",
                              "value_type": "category", "negatives": "none"}],
                 stage="ingest", partition="c")
        tx.write("annotations", pl.DataFrame({
            "image_id": ["c:1", "c:2"], "source_id": ["c:dx"] * 2, "annotator": ["", ""],
            "finding": ["dx", "dx"], "category": ["nevus", "melanoma"]}), stage="ingest", partition="c")
        tx.write("findings", [{"source_id": "c:dx", "finding": "dx", "shared_finding": "diagnosis",
                               "value_type": "category"}], stage="ingest", partition="c")
        tx.write("coverage", pl.DataFrame({"image_id": ["c:1", "c:2"], "source_id": ["c:dx"] * 2}),
                 stage="ingest", partition="c")
    stage.run(catalog, "c")
    assert catalog.read("agreement").height == 0


def _add_sources(cat: Catalog, partition: str, sources, annotations, findings, coverage=None):
    """Extra label sources for the toy dataset, in their own ingest partition."""
    with cat.transaction() as tx:
        tx.write("sources", sources, stage="ingest", partition=partition)
        tx.write("annotations", pl.DataFrame(annotations), stage="ingest", partition=partition)
        tx.write("findings", findings, stage="ingest", partition=partition)
        if coverage is not None:
            tx.write("coverage", pl.DataFrame(coverage), stage="ingest", partition=partition)


def test_combined_finding_is_the_or_of_its_parts(toy):
    """A source labelling 'f1 or f2' once is compared with the OR of the others' f1 and f2."""
    cat, t = toy
    rng = np.random.default_rng(3)
    union = np.maximum(t["a"][:, 0], t["a"][:, 1])
    g = np.where(rng.random(N) < 0.9, union, 1 - union)
    img = [f"toy:{i:04d}" for i in range(N)]
    _add_sources(cat, "toy--g", [_src("toy:G")],
                 {"image_id": img, "source_id": ["toy:G"] * N, "annotator": [""] * N,
                  "finding": ["f1 or f2"] * N, "value": g},
                 [{"source_id": "toy:G", "finding": "f1 or f2", "shared_finding": "f1_or_f2",
                   "value_type": "binary"}])
    agreement.run(cat, "toy", combined=[{"finding": "f1_or_f2", "of": ["f1", "f2"]}])
    df = cat.read("agreement")
    r = _row(df, "toy:A", "toy:G", "f1_or_f2")
    assert r["finding_a"] == "f1 OR f2" and r["finding_b"] == "f1 or f2"
    assert r["n_shared"] == N and r["kappa"] == pytest.approx(cohen_kappa_score(union, g))
    # the implicit source C: OR over its covered images (a missing part is negative)
    cov = t["cov_c"]
    c_union = np.maximum(t["c"][cov, 0], t["c"][cov, 1])
    rc = _row(df, "toy:C", "toy:G", "f1_or_f2")
    assert rc["n_shared"] == cov.sum() and rc["pos_a"] == c_union.sum()
    assert rc["kappa"] == pytest.approx(cohen_kappa_score(c_union, g[cov]))
    # a source that has the combined finding itself is not given a second one
    assert df.filter((pl.col("source_a") == "toy:G") & (pl.col("source_b") == "toy:G")).height == 0
    with pytest.raises(CatalogError, match="agreement.combined"):
        agreement.run(cat, "toy", combined=[{"finding": "x", "of": ["f1"]}])


def test_weighted_kappa_intervals_match_statsmodels(toy):
    cat, t = toy
    agreement.run(cat, "toy")
    r = _row(cat.read("agreement"), "toy:S1", "toy:S2", "skin_type")
    ok = ~np.isnan(t["s1"])
    s1, s2 = t["s1"][ok].astype(int), t["s2"][ok].astype(int)
    table = np.array([[np.sum((s1 == i) & (s2 == j)) for j in range(1, 7)] for i in range(1, 7)])
    for w in ("linear", "quadratic"):
        sm = sm_kappa(table, wt=w)
        assert r[f"kappa_{w}"] == pytest.approx(sm.kappa)
        assert (r[f"kappa_{w}_lo"], r[f"kappa_{w}_hi"]) == pytest.approx(
            (sm.kappa_low, sm.kappa_upp))


def test_category_sources_multiclass_kappa_and_confusions(toy):
    """Clinic vs histopathology diagnoses: unweighted multi-class kappa as scikit-learn."""
    cat, _ = toy
    rng = np.random.default_rng(5)
    dx = np.array(["melanoma", "nevus", "bcc", "akiec"])
    clinic = rng.choice(dx, N, p=[0.2, 0.5, 0.2, 0.1]).astype(object)
    histo = np.where(rng.random(N) < 0.75, clinic, rng.choice(dx, N))
    histo[:10] = "nevus"
    clinic[:10] = "melanoma"  # the most frequent confusion: melanoma -> nevus
    clinic[10] = None  # not judged: excluded and counted
    img = [f"toy:{i:04d}" for i in range(N)]
    ann = {"image_id": img * 2, "source_id": ["toy:clinic"] * N + ["toy:histo"] * N,
           "annotator": [""] * (2 * N), "finding": ["dx"] * (2 * N),
           "category": list(clinic) + list(histo)}
    _add_sources(cat, "toy--dx", [_src("toy:clinic", value_type="category"),
                                  _src("toy:histo", value_type="category")], ann,
                 [{"source_id": s, "finding": "dx", "shared_finding": "diagnosis",
                   "value_type": "category"} for s in ("toy:clinic", "toy:histo")])
    agreement.run(cat, "toy")
    r = _row(cat.read("agreement"), "toy:clinic", "toy:histo", "diagnosis")
    ok = np.array([c is not None for c in clinic])
    assert r["value_type"] == "category" and r["n_shared"] == ok.sum()
    assert r["n_excluded_a"] == 1
    assert r["kappa"] == pytest.approx(cohen_kappa_score(clinic[ok], histo[ok]))
    assert r["observed"] == pytest.approx(np.mean(clinic[ok] == histo[ok]))
    pairs = {}
    for a, b in zip(clinic[ok], histo[ok]):
        if a != b:
            pairs[(a, b)] = pairs.get((a, b), 0) + 1
    (top_a, top_b), n = max(pairs.items(), key=lambda kv: kv[1])
    assert r["confusion"].startswith(f"{top_a} -> {top_b}: {n}")
    assert r["kappa_linear"] is None  # categories have no order: no weighted kappa


def test_implicit_storage_of_several_readers_gives_identical_figures(catalog):
    """Readers stored dense (explicit) or as positives + coverage (implicit) agree exactly."""
    rng = np.random.default_rng(11)
    n, readers, finds = 120, ["r1", "r2", "r3"], ["x", "y"]
    truth = rng.random((n, 2)) < 0.3
    labels = {r: np.where(rng.random((n, 2)) < 0.85, truth, ~truth) for r in readers}
    results = {}
    for ds, neg in (("d", "explicit"), ("i", "implicit")):
        img = [f"{ds}:{k}" for k in range(n)]
        rows = [(img[k], f"{ds}:rad", r, f, float(labels[r][k, j]))
                for k in range(n) for r in readers for j, f in enumerate(finds)
                if neg == "explicit" or labels[r][k, j] or (j == 0 and not labels[r][k].any())]
        ann = pl.DataFrame(rows, schema=["image_id", "source_id", "annotator", "finding", "value"],
                           orient="row")
        if neg == "implicit":  # a reader with no positive on an image keeps one negative row
            ann = ann.with_columns(pl.col("value").cast(pl.Float64))
        with catalog.transaction() as tx:
            tx.write("datasets", [{"dataset_id": ds}], stage="ingest", partition=ds)
            tx.write("images", pl.DataFrame({"image_id": img, "dataset_id": ds}),
                     stage="ingest", partition=ds)
            tx.write("sources", [{"source_id": f"{ds}:rad", "dataset_id": ds, "kind": "expert",
                                  "value_type": "binary", "negatives": neg}],
                     stage="ingest", partition=ds)
            tx.write("annotations", ann, stage="ingest", partition=ds)
            tx.write("findings", [{"source_id": f"{ds}:rad", "finding": f, "shared_finding": f,
                                   "value_type": "binary"} for f in finds],
                     stage="ingest", partition=ds)
            tx.write("coverage", pl.DataFrame({"image_id": img, "source_id": f"{ds}:rad"}),
                     stage="ingest", partition=ds)
        agreement.run(catalog, ds, subgroups=[])
        results[ds] = catalog.read("agreement").filter(pl.col("dataset_id") == ds).sort(
            "kind", "finding", "annotator_a", "annotator_b")
    cols = ["kind", "finding", "annotator_a", "annotator_b", "n_shared", "kappa", "fleiss", "alpha"]
    assert results["d"].height == 2 * 3 + 2  # 3 reader pairs and the 3 readers, per finding
    assert_frame_equal(results["d"].select(cols), results["i"].select(cols), rel_tol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 1, None]), st.sampled_from([0, 1, None])),
                min_size=1, max_size=30))
def test_combined_codes_are_the_or_of_the_parts(parts):
    """Positive if any part is, negative only if every part is a usable negative."""
    from medlake.pipelines._agreement_labels import combine_findings

    n = len(parts)
    img = pl.Series(list(range(n)) * 2, dtype=pl.UInt64)
    c = pl.Series([p[0] for p in parts] + [p[1] for p in parts], dtype=pl.Int32)
    labels = pl.DataFrame({
        "source_id": "s", "annotator": "", "img": img, "finding": ["x"] * n + ["y"] * n,
        "finding_own": ["X"] * n + ["Y"] * n, "c": c, "o": pl.Series([None] * 2 * n, dtype=pl.Int32),
        "family": "binary", "negatives": "explicit", "value": c.cast(pl.Float64),
        "category": pl.Series([None] * 2 * n, dtype=pl.String)})
    fnd = pl.DataFrame({"source_id": ["s", "s"], "finding": ["X", "Y"], "shared_finding": ["x", "y"],
                        "value_type": ["binary"] * 2})
    out, f2 = combine_findings(labels, fnd, [("x_or_y", ["x", "y"])], {})
    got = dict(out.filter(pl.col("finding") == "x_or_y").select("img", "c").iter_rows())
    for i, (x, y) in enumerate(parts):
        want = 1 if 1 in (x, y) else 0 if (x, y) == (0, 0) else None
        assert got[i] == want
    assert f2.filter(pl.col("shared_finding") == "x_or_y")["finding"].to_list() == ["X OR Y"]
