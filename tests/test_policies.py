"""Label policies, pooled sources, multi-category kappa, bounded kappa intervals and leakage
across all splits (issue 16).

Every published comparison of the seed audits is produced by ``params.yaml`` plus one
``pipelines.agreement.run`` / ``pipelines.leakage.run`` call, and its figures are recomputed
independently from the raw files in ../shared/data with pandas and scikit-learn (skipped
with a reason when the folder is absent). Small generated lakes cover the rest.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import cohens_kappa as sm_kappa

from medlake.catalog import Catalog, CatalogError, Workspace
from medlake.catalog.consensus import CodePolicy, consensus
from medlake.catalog.recipes import RecipeError, parse_recipe
from medlake.catalog.stats import bounded_ci, cohen_kappa
from medlake.pipelines import _agreement_policy as apol
from medlake.pipelines import agreement, ingest, leakage

FILES = {
    "padchest": "cxr/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz",
    "tubes-raw": "purrlab_tubes/Annotations_raw.csv",
    "tubes-aggregated": "purrlab_tubes/Annotations_aggregated.csv",
    "chexpert": "cxr/chexpert_train.csv.gz",
    "ham10000": "ham10000/HAM10000_metadata.csv",
    "dermamnist": "dermamnist/dermamnist_split_info.csv",
}
# shared finding -> (raw column stem, aggregated column, PadChest label)
TUBES = {"chest_drain": ("Chest_drain_tube", "Chest_drain", "chest drain tube"),
         "nsg_tube": ("NSG_tube", "NSG_tube", "NSG tube"),
         "endotracheal_tube": ("Endotracheal_tube", "Endotracheal_tube", "endotracheal tube"),
         "tracheostomy_tube": ("Tracheostomy_tube", "Tracheostomy_tube", "tracheostomy tube")}


# --- helpers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(shared_data, tmp_path_factory) -> Catalog:
    """One lake with PadChest + the purrlab tubes, CheXpert and HAM10000 + DermaMNIST."""
    root = tmp_path_factory.mktemp("policies") / "ws"
    (root / ".dvc").mkdir(parents=True)
    cat = Catalog(Workspace(root.resolve()))
    for fmt, path in FILES.items():
        ingest.run(cat, fmt, shared_data / path)
    return cat


def _params(cat: Catalog, text: str) -> None:
    (cat.ws.root / "params.yaml").write_text(text)


def _row(df: pl.DataFrame, a: str, b: str, finding: str, aa: str = "", ab: str = "") -> dict:
    r = df.filter((pl.col("source_a") == a) & (pl.col("source_b") == b)
                  & (pl.col("annotator_a") == aa) & (pl.col("annotator_b") == ab)
                  & (pl.col("finding") == finding) & (pl.col("subgroup") == ""))
    assert r.height == 1, (a, b, finding, r)
    return r.row(0, named=True)


def _has(labels: pd.Series, name: str) -> pd.Series:
    """Whether PadChest's list text (e.g. "['a', ' b']") holds ``name`` (items stripped)."""
    return labels.fillna("").apply(
        lambda t: name in {x.strip() for x in re.findall(r"'([^']*)'", t)})


def _three(grades: pd.Series) -> pd.Series:
    """A tube grade as the study reads it: absent (0, 0.25), present (0.75, 1), unsure (0.5)."""
    g = pd.to_numeric(grades, errors="coerce")
    return g.map(lambda v: None if pd.isna(v) else
                 "unsure" if v == 0.5 else "present" if v > 0.5 else "absent")


def _sm_interval(a: pd.Series, b: pd.Series) -> tuple[float, float]:
    """statsmodels' asymptotic 95% interval of Cohen's kappa on two label columns."""
    cats = sorted(set(a) | set(b))
    t = pd.crosstab(a, b).reindex(index=cats, columns=cats, fill_value=0).to_numpy()
    r = sm_kappa(t)
    return r.kappa_low, r.kappa_upp


# --- the seed audits, from params alone --------------------------------------------------------
def test_tube_annotators_with_unsure_as_its_own_category(real, shared_data):
    """NEATX: annotator 1 vs annotator 2 on graded answers, 0.5 ('unsure') its own category."""
    _params(real, "agreement:\n  subgroups: []\n"
                  "  policies:\n    'padchest:tubes_raw': {0.5: category}\n")
    agreement.run(real, "padchest")
    df = real.read("agreement")
    raw = pd.read_csv(shared_data / FILES["tubes-raw"])
    for shared, (col, _, _) in TUBES.items():
        a, b = _three(raw[f"{col}_a1"]), _three(raw[f"{col}_a2"])
        ok = a.notna() & b.notna()
        r = _row(df, "padchest:tubes_raw", "padchest:tubes_raw", shared, "a1", "a2")
        assert r["n_shared"] == ok.sum() == 1011
        assert r["kappa"] == pytest.approx(cohen_kappa_score(a[ok], b[ok]), abs=1e-12)
        lo, hi = _sm_interval(a[ok], b[ok])
        assert (r["kappa_lo"], r["kappa_hi"]) == pytest.approx((max(lo, -1), min(hi, 1)))
        assert json.loads(r["policy"])["sources"] == {"padchest:tubes_raw": {"0.5": "category"}}
        if (a[ok] == "unsure").any() or (b[ok] == "unsure").any():
            assert "kappa over 3 categories (negative, positive, unsure)" in r["note"]
    r = _row(df, "padchest:tubes_raw", "padchest:tubes_raw", "chest_drain", "a1", "a2")
    assert r["kappa"] == pytest.approx(0.7142, abs=5e-5)  # the figure docs/policies.md shows
    assert df.filter(pl.col("policy").is_null()).height == 0  # every row records its policy


def test_pooled_report_labels_vs_consensus_with_disagree_as_a_category(real, shared_data):
    """NEATX: PadChest physician + RNN labels pooled (97 + 914 of the 1,011 images) against the
    tube consensus, whose 'annotators disagree' (-1) is a third category."""
    _params(real, "agreement:\n  subgroups: []\n"
                  "  policies:\n    'padchest:tubes_consensus': {annotators_disagree: category}\n"
                  "  pooled:\n"
                  "    - {name: report_labels, of: ['padchest:physician', 'padchest:rnn']}\n"
                  "  references:\n"
                  "    - {test: 'padchest:report_labels', reference: 'padchest:tubes_consensus'}\n")
    res = agreement.run(real, "padchest")
    assert res.derived == ("padchest:report_labels",)
    df = real.read("agreement")
    agg = pd.read_csv(shared_data / FILES["tubes-aggregated"])
    pad = pd.read_csv(shared_data / FILES["padchest"], usecols=["ImageID", "Labels", "MethodLabel"])
    m = agg.merge(pad.drop_duplicates("ImageID"), on="ImageID")
    assert len(m) == 1011 and m.MethodLabel.value_counts().to_dict() == {
        "RNN_model": 914, "Physician": 97}
    for shared, (_, col, label) in TUBES.items():
        rep = _has(m.Labels, label).astype(int).astype(str)
        con = m[col].map({1: "1", 0: "0", -1: "disagree"})
        r = _row(df, "padchest:report_labels", "padchest:tubes_consensus", shared)
        assert r["n_shared"] == 1011
        assert r["kappa"] == pytest.approx(cohen_kappa_score(rep, con), abs=1e-12)
        lo, hi = _sm_interval(rep, con)
        assert (r["kappa_lo"], r["kappa_hi"]) == pytest.approx((max(lo, -1), min(hi, 1)))
        # PPV of the report labels against the consensus: images the consensus decided
        decided = con != "disagree"
        tp = int(((rep == "1") & (con == "1") & decided).sum())
        assert r["reference"] == "padchest:tubes_consensus"
        assert r["ppv"] == pytest.approx(tp / int(((rep == "1") & decided).sum()))
        pol = json.loads(r["policy"])["sources"]
        assert pol["padchest:tubes_consensus"] == {"annotators_disagree": "category"}
    r = _row(df, "padchest:report_labels", "padchest:tubes_consensus", "chest_drain")
    assert r["kappa"] == pytest.approx(0.5886, abs=5e-5)  # the figure docs/policies.md shows
    # the pooled source is a source like any other: sources, coverage, findings, its rule
    src = real.read("sources").filter(pl.col("source_id") == "padchest:report_labels").row(
        0, named=True)
    rule = json.loads(src["rule"])
    assert src["kind"] == "derived" and rule["pooled"] == ["padchest:physician", "padchest:rnn"]
    cov = real.read("coverage")
    n = {s: cov.filter(pl.col("source_id") == s).height
         for s in ("padchest:physician", "padchest:rnn", "padchest:report_labels")}
    assert n["padchest:report_labels"] == n["padchest:physician"] + n["padchest:rnn"]
    assert rule["images"] == {"padchest:physician": n["padchest:physician"],
                              "padchest:rnn": n["padchest:rnn"]}
    # a pooled source is not compared with a member under the same policy (identical labels)
    assert df.filter((pl.col("source_a") == "padchest:physician")
                     & (pl.col("source_b") == "padchest:report_labels")).height == 0


def test_pooled_sources_must_be_disjoint_unless_precedence(real):
    n_phys = real.read("coverage").filter(pl.col("source_id") == "padchest:physician").height
    _params(real, "agreement:\n  subgroups: []\n  pooled:\n"
                  "    - {name: report_labels, of: ['padchest:physician', 'padchest:rnn']}\n"
                  "    - {name: overlap, of: ['padchest:physician', 'padchest:report_labels']}\n")
    with pytest.raises(CatalogError, match=(
            rf"pooled source 'overlap': {n_phys:,} images are judged by more than one member "
            rf"\(padchest:physician: {n_phys:,}, padchest:report_labels: {n_phys:,}; first: "
            r"padchest:.*\); pooled sources need disjoint images, or give precedence")):
        agreement.run(real, "padchest")
    _params(real, "agreement:\n  subgroups: []\n  pooled:\n"
                  "    - {name: mixed, of: ['padchest:physician', 'padchest:tubes_consensus']}\n")
    with pytest.raises(CatalogError, match="members differ in negatives"):
        agreement.run(real, "padchest")


def test_pool_precedence_picks_whose_labels_count():
    from medlake.catalog.consensus import pool_sources

    src = pl.DataFrame([_src("t:a"), _src("t:b")])
    ann = pl.DataFrame({"image_id": ["t:1", "t:2", "t:2", "t:3"],
                        "source_id": ["t:a", "t:a", "t:b", "t:b"], "annotator": "",
                        "finding": "f", "value": [1.0, 1.0, 0.0, 0.0]})
    fnd = pl.DataFrame({"source_id": ["t:a", "t:b"], "finding": "f", "shared_finding": "f",
                        "value_type": "binary"})
    cov = ann.select("image_id", "source_id")
    with pytest.raises(CatalogError, match=r"1 images are judged by more than one member "
                                           r"\(t:a: 1, t:b: 1; first: t:2\)"):
        pool_sources(src, ann, fnd, cov, members=["t:a", "t:b"], name="ab")
    d = pool_sources(src, ann, fnd, cov, members=["t:a", "t:b"], name="ab", precedence=["t:b"])
    got = dict(d["annotations"].select("image_id", "value").iter_rows())
    assert got == {"t:1": 1.0, "t:2": 0.0, "t:3": 0.0}  # t:2 from t:b, which comes first
    assert d["coverage"].height == 3 and d["sources"]["source_id"][0] == "t:ab"
    rule = json.loads(d["sources"]["rule"][0])
    assert rule["precedence"] == ["t:b"] and rule["overlap"] == 1


def test_chexpert_uncertainty_policies(real, shared_data):
    """CheXpert's U-Zeros vs U-Ones on one finding, and U-MultiClass (3 categories) vs U-Ones
    on another: the source under one policy, a one-member pool of it under the other."""
    _params(real, "agreement:\n  subgroups: []\n"
                  "  pooled: [{name: report_nlp_u_ones, of: ['chexpert:report_nlp']}]\n"
                  "  policies:\n"
                  "    'chexpert:report_nlp': U-Zeros\n"
                  "    'chexpert:report_nlp/Edema': U-MultiClass\n"
                  "    'chexpert:report_nlp_u_ones': U-Ones\n")
    agreement.run(real, "chexpert")
    df = real.read("agreement").filter(pl.col("dataset_id") == "chexpert")
    cx = pd.read_csv(shared_data / FILES["chexpert"], usecols=["Path", "Edema", "Pleural Effusion"])
    pe = cx["Pleural Effusion"].dropna()  # blank = not mentioned: excluded (default)
    zeros = pe.replace(-1.0, 0.0).astype(int)
    ones = pe.replace(-1.0, 1.0).astype(int)
    r = _row(df, "chexpert:report_nlp", "chexpert:report_nlp_u_ones", "pleural_effusion")
    assert r["n_shared"] == len(pe)
    assert r["kappa"] == pytest.approx(cohen_kappa_score(zeros, ones), abs=1e-12)
    assert (r["pos_a"], r["pos_b"]) == (zeros.sum(), ones.sum())
    assert json.loads(r["policy"])["sources"] == {
        "chexpert:report_nlp": {"not_mentioned": "exclude", "uncertain": "negative"},
        "chexpert:report_nlp_u_ones": {"not_mentioned": "exclude", "uncertain": "positive"}}
    ed = cx["Edema"].dropna()
    multi = ed.map({1.0: "1", 0.0: "0", -1.0: "uncertain"})
    ones = ed.replace(-1.0, 1.0).astype(int).astype(str)
    r = _row(df, "chexpert:report_nlp", "chexpert:report_nlp_u_ones", "edema")
    assert r["n_shared"] == len(ed)
    assert r["kappa"] == pytest.approx(cohen_kappa_score(multi, ones), abs=1e-12)
    assert "kappa over 3 categories (negative, positive, uncertain)" in r["note"]
    assert json.loads(r["policy"])["sources"]["chexpert:report_nlp"]["uncertain"] == "category"
    assert r["kappa"] == pytest.approx(0.6857, abs=5e-5)  # the figure docs/policies.md shows


def test_dermamnist_lesions_in_all_three_splits(real, shared_data):
    """The DermaMNIST audit's lesions with images in train, val and test at once."""
    _params(real, "leakage:\n  all_splits: true\n")
    df = leakage.run(real, "ham10000", scheme="dermamnist")
    h = pd.read_csv(shared_data / FILES["ham10000"])
    s = pd.read_csv(shared_data / FILES["dermamnist"])
    per = h.merge(s, on="image_id").groupby(["lesion_id", "split"]).size().unstack(fill_value=0)
    every = per[(per > 0).all(axis=1)]
    r = df.filter((pl.col("grouping") == "group_id") & (pl.col("split_a") == "all")).row(
        0, named=True)
    assert r["split_b"] == "all" and r["n_groups"] == len(every) == 40
    d = json.loads(r["by_split"])
    assert d["splits"] == ["train", "val", "test"]
    assert d["images"] == {k: int(every[k].sum()) for k in ("train", "val", "test")}
    assert r["n_images"] == int(every.to_numpy().sum()) == 130
    pairs = {f"{a}-{b}": int((every[a] * every[b]).sum())
             for a, b in (("train", "val"), ("train", "test"), ("val", "test"))}
    assert d["pairs"] == pairs and r["n_pairs"] == sum(pairs.values()) == 141
    # the existing rows are unchanged: 1,006 lesions span splits; both groupings get the row
    star = df.filter((pl.col("grouping") == "group_id") & (pl.col("split_a") == "*"))
    assert star["n_groups"][0] == 1006 and star["by_split"][0] is None
    assert df.filter(pl.col("split_a") == "all")["grouping"].sort().to_list() == [
        "group_id", "group_id+duplicates"]
    assert "in every split (train, val, test): 40 groups" in leakage.summary(df)
    _params(real, "")
    assert leakage.run(real, "ham10000", scheme="dermamnist").filter(
        pl.col("split_a") == "all").height == 0  # off by default


def test_kappa_interval_is_clipped_on_small_n(real, shared_data):
    """PadChest physician vs the tube consensus, chest drain, n 91: the asymptotic upper
    bound is 1.086; the row says 1.0 and why. ``kappa_ci: asymptotic`` keeps 1.086."""
    agg = pd.read_csv(shared_data / FILES["tubes-aggregated"])
    pad = pd.read_csv(shared_data / FILES["padchest"], usecols=["ImageID", "Labels", "MethodLabel"])
    m = agg.merge(pad.drop_duplicates("ImageID"), on="ImageID")
    m = m[(m.MethodLabel == "Physician") & (m.Chest_drain != -1)]
    rep = _has(m.Labels, "chest drain tube").astype(int)
    lo, hi = _sm_interval(rep, m.Chest_drain.astype(int))
    assert len(m) == 91 and hi == pytest.approx(1.0863, abs=1e-4)
    for ci, want in (("clip", 1.0), ("asymptotic", hi)):
        _params(real, f"agreement:\n  subgroups: []\n  kappa_ci: {ci}\n")
        agreement.run(real, "padchest")
        r = _row(real.read("agreement"), "padchest:physician", "padchest:tubes_consensus",
                 "chest_drain")
        assert r["n_shared"] == 91 and r["kappa"] == pytest.approx(
            cohen_kappa_score(rep, m.Chest_drain.astype(int)))
        assert (r["kappa_lo"], r["kappa_hi"]) == pytest.approx((lo, want))
        assert json.loads(r["policy"])["kappa_ci"] == ci
        clipped = "kappa 95% CI clipped to [-1, 1] (asymptotic 0.391 to 1.086"
        assert (clipped in (r["note"] or "")) == (ci == "clip")


# --- generated lakes -------------------------------------------------------------------------
def _lake(cat: Catalog, sources: list[dict], ann: list[tuple], findings: list[dict],
          images: list[str], coverage: list[tuple] | None = None) -> Catalog:
    with cat.transaction() as tx:
        tx.write("datasets", [{"dataset_id": "t", "name": "t"}], stage="ingest", partition="t")
        tx.write("images", pl.DataFrame({"image_id": images, "dataset_id": "t"}),
                 stage="ingest", partition="t")
        tx.write("sources", sources, stage="ingest", partition="t")
        tx.write("annotations", pl.DataFrame(
            ann, schema=["image_id", "source_id", "annotator", "finding", "value", "category",
                         "meaning"], orient="row"), stage="ingest", partition="t")
        tx.write("findings", findings, stage="ingest", partition="t")
        cov = coverage or sorted({(a[0], a[1]) for a in ann})
        tx.write("coverage", pl.DataFrame(cov, schema=["image_id", "source_id"], orient="row"),
                 stage="ingest", partition="t")
    return cat


def _src(sid: str, value_type: str = "binary", negatives: str = "explicit",
         code_map: dict | None = None) -> dict:
    return {"source_id": sid, "dataset_id": "t", "name": sid.split(":")[1], "kind": "expert",
            "negatives": negatives, "value_type": value_type,
            "code_map": json.dumps(code_map) if code_map else None}


UNCERTAIN_MAP = {"1": {"value": 1.0, "meaning": "positive"},
                 "0": {"value": 0.0, "meaning": "negative"},
                 "-1": {"value": None, "meaning": "uncertain"}}


def test_small_n_interval_bounds():
    lo, hi, cut = bounded_ci(np.array([-1.2, 0.1, np.nan]), np.array([0.5, 1.3, np.nan]))
    assert lo.tolist()[:2] == [-1.0, 0.1] and hi.tolist()[:2] == [0.5, 1.0]
    assert cut.tolist() == [True, True, False] and np.isnan(lo[2])
    r = cohen_kappa([1, 1, 0, 0, 1], [1, 1, 0, 0, 0])
    raw = cohen_kappa([1, 1, 0, 0, 1], [1, 1, 0, 0, 0], clip=False)
    assert raw["hi"] > 1 and r["hi"] == 1.0 and r["clipped"] == 1.0
    assert r["kappa"] == pytest.approx(cohen_kappa_score([1, 1, 0, 0, 1], [1, 1, 0, 0, 0]))


def test_small_n_stage_rows_stay_within_bounds(catalog):
    """Eight images, one disagreement: every kappa bound (plain, linear, quadratic) in [-1, 1]."""
    img = [f"t:{i}" for i in range(8)]
    a = [0, 0, 0, 0, 1, 1, 1, 1]
    b = [0, 0, 0, 0, 1, 1, 1, 0]
    ann = [(i, "t:a", "", "f", float(x), None, None) for i, x in zip(img, a)]
    ann += [(i, "t:b", "", "f", float(x), None, None) for i, x in zip(img, b)]
    ann += [(i, "t:s1", "", "s", float(x + 1), None, None) for i, x in zip(img, a)]
    ann += [(i, "t:s2", "", "s", float(x + 1), None, None) for i, x in zip(img, b)]
    fnd = [{"source_id": s, "finding": f, "shared_finding": f, "value_type": vt}
           for s, f, vt in (("t:a", "f", "binary"), ("t:b", "f", "binary"),
                            ("t:s1", "s", "ordinal"), ("t:s2", "s", "ordinal"))]
    _lake(catalog, [_src("t:a"), _src("t:b"), _src("t:s1", "ordinal"), _src("t:s2", "ordinal")],
          ann, fnd, img)
    (catalog.ws.root / "params.yaml").write_text("agreement: {subgroups: []}\n")
    agreement.run(catalog, "t")
    df = catalog.read("agreement")
    for col in ("kappa_lo", "kappa_hi", "kappa_linear_lo", "kappa_linear_hi",
                "kappa_quadratic_lo", "kappa_quadratic_hi"):
        v = df[col].drop_nulls()
        assert v.len() and v.min() >= -1 and v.max() <= 1, col
    r = _row(df, "t:a", "t:b", "f")
    raw = sm_kappa(np.array([[4, 0], [1, 3]]))
    assert raw.kappa_upp > 1 and r["kappa_hi"] == 1.0
    assert r["kappa_lo"] == pytest.approx(raw.kappa_low)
    assert "clipped to [-1, 1]" in r["note"]
    s = _row(df, "t:s1", "t:s2", "s")
    assert "kappa_quadratic 95% CI clipped" in s["note"]


def test_policies_on_explicit_sources_and_the_discrepancies_view(catalog):
    """A source with 'uncertain' answers under U-Ignore (default), U-Zeros, U-Ones and
    U-MultiClass against a certain source: kappa as scikit-learn's on the same labels, and
    the discrepancies view follows the policy."""
    rng = np.random.default_rng(3)
    n = 120
    img = [f"t:{i:03d}" for i in range(n)]
    truth = rng.integers(0, 2, n)
    u = rng.choice(["0", "1", "u"], n, p=[0.4, 0.4, 0.2])
    ann = [(i, "t:ref", "", "f", float(x), None, "positive" if x else "negative")
           for i, x in zip(img, truth)]
    ann += [(i, "t:nlp", "", "F", None if x == "u" else float(x), None,
             {"u": "uncertain", "1": "positive", "0": "negative"}[x]) for i, x in zip(img, u)]
    fnd = [{"source_id": "t:ref", "finding": "f", "shared_finding": "f", "value_type": "binary"},
           {"source_id": "t:nlp", "finding": "F", "shared_finding": "f", "value_type": "binary"}]
    _lake(catalog, [_src("t:ref"), _src("t:nlp", code_map=UNCERTAIN_MAP)], ann, fnd, img)
    ref = truth.astype(str)
    for alias, as_ in (("U-Ignore", None), ("U-Zeros", "0"), ("U-Ones", "1"),
                       ("U-MultiClass", "uncertain")):
        (catalog.ws.root / "params.yaml").write_text(
            f"agreement:\n  subgroups: []\n  policies: {{'t:nlp': {alias}}}\n")
        agreement.run(catalog, "t")
        r = _row(catalog.read("agreement"), "t:nlp", "t:ref", "f")
        keep = (u != "u") if as_ is None else np.ones(n, bool)
        lab = np.where(u == "u", as_ or "x", u)[keep]
        assert r["n_shared"] == keep.sum()
        assert r["kappa"] == pytest.approx(cohen_kappa_score(lab, ref[keep]), abs=1e-12)
        want = {"U-Ignore": "exclude", "U-Zeros": "negative", "U-Ones": "positive",
                "U-MultiClass": "category"}[alias]
        assert json.loads(r["policy"])["sources"]["t:nlp"] == {"uncertain": want}
        dis = pl.from_arrow(catalog.sql("SELECT * FROM discrepancies ORDER BY image_id"))
        shown = {"0": "0.0", "1": "1.0", "uncertain": "uncertain"}
        expect = sum(1 for x, t in zip(np.where(u == "u", as_ or "", u), ref)
                     if x and shown.get(x, x) != f"{float(t):.1f}")
        assert dis.height == expect, alias
        if alias == "U-MultiClass":
            assert any("t:nlp=uncertain" in x for x in dis["labels"])


def test_graded_value_policy_and_consensus_honour_it(catalog):
    """Two annotators' grades: 0.5 as its own category in kappa; the majority consensus
    counts it as a usable uncertain answer (n_unc), and records the policy in its rule."""
    grades = [(0.0, 0.0), (0.5, 0.0), (0.5, 1.0), (1.0, 1.0), (0.75, 0.5), (0.25, 0.0),
              (0.5, 0.5), (1.0, 0.75)]
    img = [f"t:{i}" for i in range(len(grades))]
    gm = {str(g): {"value": g, "meaning": m} for g, m in
          ((0.0, "absent"), (0.25, "probably_absent"), (0.5, "unsure"),
           (0.75, "probably_present"), (1.0, "present"))}
    meaning = {v["value"]: v["meaning"] for v in gm.values()}
    ann = [(i, "t:g", ann_, "tube", g, None, meaning[g])
           for i, pair in zip(img, grades) for ann_, g in zip(("a1", "a2"), pair)]
    fnd = [{"source_id": "t:g", "finding": "tube", "shared_finding": "tube",
            "value_type": "graded"}]
    _lake(catalog, [_src("t:g", "graded", code_map=gm)], ann, fnd, img)
    (catalog.ws.root / "params.yaml").write_text(
        "agreement:\n  subgroups: []\n  policies: {'t:g': {0.5: category}}\n"
        "  consensus: [{source: 't:g', rule: majority}]\n")
    agreement.run(catalog, "t")
    r = _row(catalog.read("agreement"), "t:g", "t:g", "tube", "a1", "a2")
    three = lambda g: "unsure" if g == 0.5 else "pos" if g > 0.5 else "neg"
    a, b = [three(x) for x, _ in grades], [three(y) for _, y in grades]
    assert r["kappa"] == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)
    assert r["n_shared"] == len(grades)
    # consensus: the derived source and its rule
    got = catalog.read("annotations").filter(pl.col("source_id") == "t:g_majority").sort("image_id")
    rows = pl.DataFrame({"image_id": [x[0] for x in ann], "finding": "tube",
                         "annotator": [x[2] for x in ann], "value": [x[4] for x in ann],
                         "meaning": [x[6] for x in ann]})
    want = consensus(rows, rule="majority", policy={None: CodePolicy((("0.5", "category"),))})
    assert got["value"].to_list() == want.sort("image_id")["value"].to_list()
    assert int(want["n_unc"].sum()) == sum(g == 0.5 for pair in grades for g in pair)
    # 0.5 + 0.0 is no majority when 0.5 is a usable (uncertain) answer; excluded, it would be
    plain = consensus(rows, rule="majority")
    assert want.filter(pl.col("image_id") == "t:1")["value"][0] is None
    assert plain.filter(pl.col("image_id") == "t:1")["value"][0] == 0.0
    rule = json.loads(catalog.read("sources").filter(
        pl.col("source_id") == "t:g_majority")["rule"][0])
    assert rule["policy"] == {"*": {"0.5": "category"}} and "0.5 -> category" in rule["text"]


def test_category_sources_both_positive_only_say_so_or_compare(catalog):
    """The demo's clinic and histopathology diagnoses: both positive-only category sources.
    The stage names the real reason; ``positive_only_categories: compare`` compares them."""
    img = [f"t:{i}" for i in range(12)]
    dx = ["nv", "mel", "bkl", "nv", "nv", "mel", "bcc", "nv", "mel", "nv", "bkl", "nv"]
    histo = {i: d for i, d in zip(img[:8], ["nv", "mel", "nv", "nv", "bcc", "mel", "bcc", "nv"])}
    ann = [(i, "t:clinic", "", "diagnosis", None, d, None) for i, d in zip(img, dx)]
    ann += [(i, "t:histo", "", "diagnosis", None, d, None) for i, d in histo.items()]
    fnd = [{"source_id": s, "finding": "diagnosis", "shared_finding": "diagnosis",
            "value_type": "category"} for s in ("t:clinic", "t:histo")]
    _lake(catalog, [_src("t:clinic", "category", "none"), _src("t:histo", "category", "none")],
          ann, fnd, img)
    (catalog.ws.root / "params.yaml").write_text("agreement: {subgroups: []}\n")
    said: list[str] = []
    agreement.run(catalog, "t", echo=said.append)
    assert catalog.read("agreement").height == 0
    assert "no two sources share a finding of the same value type" not in said[0]
    assert ("t:clinic and t:histo share finding 'diagnosis' (category) and 8 images, but both "
            "are positive-only (negatives 'none')") in said[0]
    assert "positive_only_categories: compare" in said[0]
    (catalog.ws.root / "params.yaml").write_text(
        "agreement: {subgroups: [], positive_only_categories: compare}\n")
    agreement.run(catalog, "t")
    r = _row(catalog.read("agreement"), "t:clinic", "t:histo", "diagnosis")
    assert r["kind"] == "pair" and r["n_shared"] == 8
    assert r["kappa"] == pytest.approx(cohen_kappa_score(dx[:8], list(histo.values())))
    assert json.loads(r["policy"])["positive_only_categories"] == "compare"


def test_implicit_source_not_mentioned_policy(catalog):
    """An implicit-negative source whose missing row means 'not mentioned' (excluded by
    default, as CheXpert's blanks): ``not_mentioned: negative`` makes those rows negative,
    finding by finding, while its stored 'uncertain' rows stay excluded."""
    img = [f"t:{i}" for i in range(6)]
    cm = {**UNCERTAIN_MAP, "(absent)": {"value": None, "meaning": "not_mentioned"}}
    ann = [("t:0", "t:nlp", "", "A", 1.0, None, "positive"),
           ("t:1", "t:nlp", "", "A", None, None, "uncertain"),
           ("t:2", "t:nlp", "", "A", 0.0, None, "negative"),
           ("t:0", "t:nlp", "", "B", 1.0, None, "positive")]
    ann += [(i, "t:ref", "", f, float(v), None, None)
            for f, vals in (("a", [1, 1, 0, 0, 0, 1]), ("b", [1, 0, 0, 0, 1, 0]))
            for i, v in zip(img, vals)]
    fnd = [{"source_id": "t:nlp", "finding": f, "shared_finding": f.lower(), "value_type": "binary"}
           for f in ("A", "B")]
    fnd += [{"source_id": "t:ref", "finding": f, "shared_finding": f, "value_type": "binary"}
            for f in ("a", "b")]
    cov = [(i, s) for i in img for s in ("t:nlp", "t:ref")]
    _lake(catalog, [_src("t:nlp", negatives="implicit", code_map=cm), _src("t:ref")], ann, fnd,
          img, cov)
    (catalog.ws.root / "params.yaml").write_text("agreement: {subgroups: []}\n")
    agreement.run(catalog, "t")
    df = catalog.read("agreement")
    assert _row(df, "t:nlp", "t:ref", "a")["n_shared"] == 2  # t:0 and t:2 only
    (catalog.ws.root / "params.yaml").write_text(
        "agreement:\n  subgroups: []\n  policies: {'t:nlp/B': {not_mentioned: negative}}\n")
    agreement.run(catalog, "t")
    df = catalog.read("agreement")
    assert _row(df, "t:nlp", "t:ref", "a")["n_shared"] == 2  # finding A keeps the default
    r = _row(df, "t:nlp", "t:ref", "b")
    assert r["n_shared"] == 6 and r["pos_a"] == 1
    assert r["kappa"] == pytest.approx(cohen_kappa_score([1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 1, 0]))
    assert json.loads(r["policy"])["sources"]["t:nlp"] == {
        "not_mentioned": "negative", "uncertain": "exclude"}


# --- settings: parsing and errors ------------------------------------------------------------
def test_policy_settings_are_parsed_and_errors_name_key_value_and_choices():
    p = apol.parse_policies({"chexpert:report_nlp": "U-Ones",
                             "chexpert:report_nlp/Edema": {"uncertain": "U-MultiClass",
                                                          "not_mentioned": "negative"},
                             "padchest:tubes_raw": {0.5: "category", "0.25": "exclude"}})
    assert p.lookup("chexpert:report_nlp", ("edema", "Edema")).as_dict() == {
        "uncertain": "category", "not_mentioned": "negative"}
    assert p.lookup("chexpert:report_nlp", ("pleural_effusion",)).as_dict() == {
        "uncertain": "positive"}
    assert p.lookup("padchest:tubes_raw").as_dict() == {"0.25": "exclude", "0.5": "category"}
    with pytest.raises(CatalogError, match=r"policies\['chexpert:report_nlp'\]: 'U-Twos' is not "
                                           r"a policy alias; use one of U-Ignore, U-Zeros"):
        apol.parse_policies({"chexpert:report_nlp": "U-Twos"})
    with pytest.raises(CatalogError, match=r"'uncertain': 'maybe' is not an action; use one of "
                                           r"exclude, negative, positive, category"):
        apol.parse_policies({"chexpert:report_nlp": {"uncertain": "maybe"}})
    with pytest.raises(CatalogError, match="must be a source id"):
        apol.parse_policies({"report_nlp": "U-Ones"})
    with pytest.raises(CatalogError, match=r"pooled\[0\]: of must list source ids"):
        apol.parse_pooled([{"name": "x", "of": "padchest:rnn"}])
    with pytest.raises(CatalogError, match="names sources of several datasets"):
        apol.parse_pooled([{"name": "x", "of": ["a:b", "c:d"]}])
    with pytest.raises(CatalogError, match=r"precedence must list members"):
        apol.parse_pooled([{"name": "x", "of": ["a:b", "a:c"], "precedence": ["a:z"]}])
    with pytest.raises(CatalogError, match=r"kappa_ci: 'wide' is not allowed; use one of clip, "
                                           r"asymptotic"):
        apol.parse({"kappa_ci": "wide"})
    assert apol.parse({}) == apol.Choices()  # defaults: today's behaviour, CI clipped


def test_policy_errors_checked_against_the_sources(catalog):
    img = ["t:1", "t:2"]
    ann = [(i, s, "", "f", 1.0, None, "positive") for i in img for s in ("t:a", "t:b")]
    ann += [(i, "t:o", "", "s", 2.0, None, None) for i in img]
    fnd = [{"source_id": s, "finding": f, "shared_finding": f, "value_type": "binary"}
           for s, f in (("t:a", "f"), ("t:b", "f"), ("t:o", "s"))]
    _lake(catalog, [_src("t:a", code_map=UNCERTAIN_MAP), _src("t:b"),
                    _src("t:o", "ordinal", code_map={"2": {"value": 2.0, "meaning": "two"},
                                                     "-1": {"value": None, "meaning": "unknown"}})],
          ann, fnd, img)
    for text, msg in (
        ("{'t:a': {uncertian: positive}}", (r"'t:a' never stores 'uncertian' \(meanings: "
                                            r"negative, positive, uncertain")),
        ("{'t:zz': U-Ones}", r"no source 't:zz' in dataset 't'"),
        ("{'t:o': {unknown: category}}", (r"'category' is not possible for 't:o' \(value type "
                                          r"ordinal\); use exclude")),
    ):
        (catalog.ws.root / "params.yaml").write_text(f"agreement:\n  policies: {text}\n")
        with pytest.raises(CatalogError, match=msg):
            agreement.run(catalog, "t")


def test_recipe_labels_take_a_policy(catalog):
    from medlake.catalog.recipes import LabelSpec
    from medlake.pipelines.materialize import load_label

    rec = parse_recipe({"dataset": "t", "parent": "t@s", "labels": {
        "pe": {"source": "t:nlp", "finding": "A", "policy": "U-Ones"},
        "plain": "t:nlp/A"}})
    assert rec.labels[0].policy == (("uncertain", "positive"),) and rec.labels[1].policy == ()
    with pytest.raises(RecipeError, match=r"labels.pe.policy: 'maybe' is not a policy alias"):
        parse_recipe({"dataset": "t", "parent": "t@s",
                      "labels": {"pe": {"source": "t:nlp", "policy": "maybe"}}})
    img = [f"t:{i}" for i in range(4)]
    cm = {**UNCERTAIN_MAP, "(absent)": {"value": None, "meaning": "not_mentioned"}}
    ann = [("t:0", "t:nlp", "", "A", 1.0, None, "positive"),
           ("t:1", "t:nlp", "", "A", None, None, "uncertain"),
           ("t:2", "t:nlp", "", "A", 0.0, None, "negative")]
    fnd = [{"source_id": "t:nlp", "finding": "A", "shared_finding": "a", "value_type": "binary"}]
    _lake(catalog, [_src("t:nlp", negatives="implicit", code_map=cm)], ann, fnd, img,
          [(i, "t:nlp") for i in img])

    def lab(policy: tuple) -> dict:
        df = load_label(catalog, "t", LabelSpec("pe", "t:nlp", "A", "", policy))
        return dict(df.sort("image_id").iter_rows())

    assert lab(()) == {"t:0": "1", "t:1": None, "t:2": "0"}
    assert lab((("uncertain", "positive"),)) == {"t:0": "1", "t:1": "1", "t:2": "0"}
    assert lab((("not_mentioned", "negative"), ("uncertain", "category"))) == {
        "t:0": "1", "t:1": "uncertain", "t:2": "0", "t:3": "0"}


def test_docs_show_the_worked_examples():
    """docs/policies.md holds one worked example per seed audit, with the figures tested above."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "policies.md").read_text()
    for needle in ("'padchest:tubes_raw': {0.5: category}", "report_labels",
                   "annotators_disagree: category", "U-Ones", "all_splits: true",
                   "kappa_ci", "positive_only_categories", "0.7142", "0.5886", "0.6857",
                   "40 groups"):
        assert needle in text, needle
