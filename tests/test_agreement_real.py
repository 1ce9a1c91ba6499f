"""Stage ``agreement`` on the real public metadata (../shared/data), each figure recomputed
independently from the CSV files with pandas and checked against scikit-learn, statsmodels
and the krippendorff package."""

from __future__ import annotations

import re

import krippendorff
import numpy as np
import pandas as pd
import polars as pl
import pytest
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import cohens_kappa as sm_kappa
from statsmodels.stats.inter_rater import fleiss_kappa
from statsmodels.stats.proportion import proportion_confint

from medlake.catalog import Catalog, Workspace
from medlake.pipelines import agreement, ingest

FILES = {
    "nih-cxr14": "cxr/Data_Entry_2017_v2020.csv.gz",
    "nih-bbox": "cxr/BBox_List_2017.csv.gz",
    "google2019": "cxr/google2019_nih-chest-xray-labels.csv.gz",
    "padchest": "cxr/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz",
    "tubes-raw": "purrlab_tubes/Annotations_raw.csv",
    "tubes-aggregated": "purrlab_tubes/Annotations_aggregated.csv",
    "vindr-cxr": "cxr/vinbigdata-train.csv.gz",
    "fitzpatrick17k": "fitzpatrick17k/fitzpatrick17k.csv",
    "fitzpatrick17k-2021": "fitzpatrick17k/fitzpatrick17k_2021-04-16.csv",
}
TUBES = {"chest_drain": ("Chest_drain_tube", "Chest_drain", "chest drain tube"),
         "nsg_tube": ("NSG_tube", "NSG_tube", "NSG tube"),
         "endotracheal_tube": ("Endotracheal_tube", "Endotracheal_tube", "endotracheal tube")}


@pytest.fixture(scope="module")
def lake(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("real") / "ws"
    (root / ".dvc").mkdir(parents=True)
    cat = Catalog(Workspace(root.resolve()))
    for fmt, path in FILES.items():
        ingest.run(cat, fmt, shared_data / path)
    (root / "params.yaml").write_text(
        "agreement:\n"
        "  references:\n"
        "    - {test: 'nih-cxr14:report_nlp', reference: 'nih-cxr14:google2019_expert'}\n"
        "  consensus: [{source: 'padchest:tubes_raw', rule: all_certain_agree}]\n"
        "  subgroups: [view]\n"
    )
    res = agreement.run(cat)
    return cat, cat.read("agreement"), res


def _row(df, a, b, finding, aa="", ab="", subgroup=""):
    r = df.filter((pl.col("source_a") == a) & (pl.col("source_b") == b)
                  & (pl.col("annotator_a") == aa) & (pl.col("annotator_b") == ab)
                  & (pl.col("finding") == finding) & (pl.col("subgroup") == subgroup))
    assert r.height == 1, (a, b, finding, r)
    return r.row(0, named=True)


def test_nih_report_vs_google_experts_on_4376_images(lake, shared_data):
    _, df, _ = lake
    g = pd.read_csv(shared_data / FILES["google2019"])
    n = pd.read_csv(shared_data / FILES["nih-cxr14"], usecols=["Image Index", "Finding Labels"])
    m = g.merge(n, on="Image Index", suffixes=("_g", ""))
    expert = (m["Pneumothorax"] == "YES").astype(int)
    report = m["Finding Labels"].str.split("|").apply(lambda x: "Pneumothorax" in x).astype(int)
    r = _row(df, "nih-cxr14:google2019_expert", "nih-cxr14:report_nlp", "pneumothorax")
    assert r["n_shared"] == len(m) == 4376
    assert r["kappa"] == pytest.approx(cohen_kappa_score(expert, report))
    table = pd.crosstab(expert, report).to_numpy()
    sm = sm_kappa(table)
    assert (r["kappa_lo"], r["kappa_hi"]) == pytest.approx((sm.kappa_low, sm.kappa_upp))
    # report_nlp is the test, the Google experts the reference
    tp = int(((expert == 1) & (report == 1)).sum())
    assert r["reference"] == "nih-cxr14:google2019_expert"
    assert r["ppv"] == pytest.approx(tp / report.sum())
    lo, hi = proportion_confint(tp, int(expert.sum()), method="wilson")
    assert (r["sens_lo"], r["sens_hi"]) == pytest.approx((lo, hi))
    # per view position: the subgroup sizes add up to the shared images
    views = df.filter((pl.col("source_a") == "nih-cxr14:google2019_expert")
                      & (pl.col("finding") == "pneumothorax") & (pl.col("subgroup") == "view"))
    assert views["n_shared"].sum() == 4376
    pa = m["View Position"] == "PA"
    assert views.filter(pl.col("subgroup_value") == "PA")["kappa"][0] == pytest.approx(
        cohen_kappa_score(expert[pa], report[pa]))


def test_nih_bounding_boxes_are_positive_only(lake, shared_data):
    _, df, _ = lake
    bb = pd.read_csv(shared_data / FILES["nih-bbox"], usecols=[0, 1])
    bb.columns = ["image", "label"]
    r = _row(df, "nih-cxr14:bbox_expert", "nih-cxr14:report_nlp", "pneumothorax")
    assert r["kind"] == "positive_only" and r["kappa"] is None
    assert "positive-only" in r["note"]
    assert r["n_shared"] == bb[bb.label == "Pneumothorax"].image.nunique()
    assert 0 < r["pos_confirmed"] <= 1


def _has(labels: pd.Series, name: str) -> pd.Series:
    """Whether PadChest's list text (e.g. "['a', ' b']") holds ``name`` (items stripped)."""
    return labels.fillna("").apply(
        lambda t: name in {x.strip() for x in re.findall(r"'([^']*)'", t)})


def _grade(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s, errors="coerce")


def test_tube_annotators_and_report_labels_vs_consensus(lake, shared_data):
    _, df, _ = lake
    raw = pd.read_csv(shared_data / FILES["tubes-raw"])
    agg = pd.read_csv(shared_data / FILES["tubes-aggregated"])
    pad = pd.read_csv(shared_data / FILES["padchest"], usecols=["ImageID", "Labels", "MethodLabel"])
    cols = [f"{r}_{a}" for r, _, _ in TUBES.values() for a in ("a1", "a2")] + [
        "Tracheostomy_tube_a1", "Tracheostomy_tube_a2"]
    scale = sorted(set(np.concatenate([_grade(raw[c]).dropna().to_numpy() for c in cols])))
    for shared, (rawcol, aggcol, padlabel) in TUBES.items():
        g1, g2 = _grade(raw[f"{rawcol}_a1"]), _grade(raw[f"{rawcol}_a2"])
        ok = g1.notna() & g2.notna() & (g1 != 0.5) & (g2 != 0.5)
        r = _row(df, "padchest:tubes_raw", "padchest:tubes_raw", shared, "a1", "a2")
        assert r["n_shared"] == ok.sum()
        assert r["kappa"] == pytest.approx(cohen_kappa_score(g1[ok] > 0.5, g2[ok] > 0.5))
        both = g1.notna() & g2.notna()
        grades = scale  # the source's whole grade scale, not only the grades of this finding
        ia, ib = np.searchsorted(grades, g1[both]), np.searchsorted(grades, g2[both])
        assert r["kappa_quadratic"] == pytest.approx(cohen_kappa_score(
            ia, ib, weights="quadratic", labels=range(len(grades))))
        # report-derived labels (RNN) vs the annotators' consensus on the shared images
        m = agg[["ImageID", aggcol]].merge(pad, on="ImageID")
        m = m[(m[aggcol] != -1) & (m.MethodLabel == "RNN_model")]
        rep = _has(m.Labels, padlabel).astype(int)
        r2 = _row(df, "padchest:rnn", "padchest:tubes_consensus", shared)
        assert r2["n_shared"] == len(m)
        assert r2["kappa"] == pytest.approx(cohen_kappa_score(rep, m[aggcol].astype(int)))


def test_physician_and_rnn_share_no_image_so_prevalence(lake, shared_data):
    _, df, _ = lake
    pad = pd.read_csv(shared_data / FILES["padchest"], usecols=["ImageID", "Labels", "MethodLabel"])
    pad = pad.drop_duplicates("ImageID")
    r = _row(df, "padchest:physician", "padchest:rnn", "pneumothorax")
    assert r["kind"] == "prevalence" and r["kappa"] is None and "no shared images" in r["note"]
    for side, method in (("a", "Physician"), ("b", "RNN_model")):
        sub = pad[pad.MethodLabel == method]
        pos = int(_has(sub.Labels, "pneumothorax").sum())
        assert r[f"pos_{side}"] == pos
        lo, hi = proportion_confint(pos, r[f"n_{side}"], method="wilson")
        assert (r[f"prev_{side}_lo"], r[f"prev_{side}_hi"]) == pytest.approx((lo, hi))
        assert abs(r[f"n_{side}"] - len(sub)) <= len(sub) * 0.01  # a few rows quarantined


def test_fitzpatrick_skin_type_sources(lake, shared_data):
    _, df, _ = lake
    f = pd.read_csv(shared_data / FILES["fitzpatrick17k"])
    ok = (f.fitzpatrick_scale > 0) & (f.fitzpatrick_centaur > 0)
    a, b = f.fitzpatrick_centaur[ok], f.fitzpatrick_scale[ok]
    r = _row(df, "fitzpatrick17k:fitzpatrick_centaur", "fitzpatrick17k:fitzpatrick_scale",
             "skin_type")
    assert r["n_shared"] == ok.sum()
    assert r["n_excluded_a"] + r["n_excluded_b"] >= (~ok).sum()
    assert r["kappa"] == pytest.approx(cohen_kappa_score(a, b))
    for w in ("linear", "quadratic"):
        assert r[f"kappa_{w}"] == pytest.approx(
            cohen_kappa_score(a, b, weights=w, labels=range(1, 7)))
    assert r["off_by_one"] == pytest.approx(np.mean(np.abs(a - b) <= 1))


def test_vindr_three_readers_fleiss_and_alpha(lake, shared_data):
    _, df, _ = lake
    v = pd.read_csv(shared_data / FILES["vindr-cxr"], usecols=["image_id", "class_name", "rad_id"])
    readers = v.groupby("image_id").rad_id.nunique()
    assert (readers == 3).all()
    for cls in ("Aortic enlargement", "Pleural effusion"):
        pos = v[v.class_name == cls].groupby("image_id").rad_id.nunique()
        pos = pos.reindex(readers.index, fill_value=0).to_numpy()
        counts = np.stack([3 - pos, pos], 1)
        row = df.filter((pl.col("kind") == "raters") & (pl.col("finding_a") == cls)
                        & (pl.col("subgroup") == "")).row(0, named=True)
        assert row["n_raters"] == 3 and row["n_shared"] == len(readers)
        assert row["fleiss"] == pytest.approx(fleiss_kappa(counts))
        assert row["alpha"] == pytest.approx(krippendorff.alpha(
            value_counts=counts, level_of_measurement="nominal"))


def test_profile_summary_and_discrepancies(lake):
    from medlake.catalog.stats import agreement_summary

    cat, df, res = lake
    s = agreement_summary(cat, "nih-cxr14")
    assert set(s["kind"]) == {"pair", "positive_only"}
    assert res.derived == ("padchest:tubes_raw_all_certain_agree",)
    d = pl.from_arrow(cat.sql(
        "SELECT count(*) AS n FROM discrepancies WHERE dataset_id = 'nih-cxr14' "
        "AND finding = 'pneumothorax' AND labels LIKE '%google2019%'"))
    r = _row(df, "nih-cxr14:google2019_expert", "nih-cxr14:report_nlp", "pneumothorax")
    # every image where the two disagree is a discrepancy
    assert d["n"][0] >= round(r["n_shared"] * (1 - r["observed"]))


def test_nih_nodule_or_mass_is_the_or_of_nodule_and_mass(lake, shared_data):
    """Google's single "Nodule or mass" label against NIH's Nodule OR Mass report labels
    (params.yaml agreement.combined), recomputed with pandas and scikit-learn."""
    _, df, _ = lake
    g = pd.read_csv(shared_data / FILES["google2019"])
    n = pd.read_csv(shared_data / FILES["nih-cxr14"], usecols=["Image Index", "Finding Labels"])
    m = g.merge(n, on="Image Index", suffixes=("_g", ""))
    expert = (m["Nodule or mass"] == "YES").astype(int)
    labels = m["Finding Labels"].str.split("|")
    report = labels.apply(lambda x: "Nodule" in x or "Mass" in x).astype(int)
    r = _row(df, "nih-cxr14:google2019_expert", "nih-cxr14:report_nlp", "nodule_or_mass")
    assert r["finding_a"] == "Nodule or mass" and r["finding_b"] == "Nodule OR Mass"
    assert r["n_shared"] == 4376 and (r["pos_a"], r["pos_b"]) == (expert.sum(), report.sum())
    assert r["kappa"] == pytest.approx(cohen_kappa_score(expert, report))
    sm = sm_kappa(pd.crosstab(expert, report).to_numpy())
    assert (r["kappa_lo"], r["kappa_hi"]) == pytest.approx((sm.kappa_low, sm.kappa_upp))
    tp = int(((expert == 1) & (report == 1)).sum())
    assert r["ppv"] == pytest.approx(tp / report.sum())


def test_fitzpatrick_weighted_kappa_intervals_match_statsmodels(lake, shared_data):
    _, df, _ = lake
    f = pd.read_csv(shared_data / FILES["fitzpatrick17k"])
    ok = (f.fitzpatrick_scale > 0) & (f.fitzpatrick_centaur > 0)
    table = pd.crosstab(f.fitzpatrick_centaur[ok], f.fitzpatrick_scale[ok]).reindex(
        index=range(1, 7), columns=range(1, 7), fill_value=0).to_numpy()
    r = _row(df, "fitzpatrick17k:fitzpatrick_centaur", "fitzpatrick17k:fitzpatrick_scale",
             "skin_type")
    for w in ("linear", "quadratic"):
        sm = sm_kappa(table, wt=w)
        assert r[f"kappa_{w}"] == pytest.approx(sm.kappa)
        assert (r[f"kappa_{w}_lo"], r[f"kappa_{w}_hi"]) == pytest.approx(
            (sm.kappa_low, sm.kappa_upp))
        assert r[f"kappa_{w}_lo"] < r[f"kappa_{w}"] < r[f"kappa_{w}_hi"]


def test_fitzpatrick_diagnosis_releases_compared_as_categories(lake, shared_data):
    """The 2022 and 2021 releases' diagnosis labels: multi-class kappa vs scikit-learn."""
    _, df, _ = lake
    a = pd.read_csv(shared_data / FILES["fitzpatrick17k"])
    b = pd.read_csv(shared_data / FILES["fitzpatrick17k-2021"])
    m = a.merge(b, on="md5hash", suffixes=("", "_21"))
    cat = df.filter((pl.col("value_type") == "category") & (pl.col("subgroup") == ""))
    assert cat.height >= 3
    for own in ("label", "nine_partition_label", "three_partition_label"):
        r = cat.filter(pl.col("finding_a") == own).row(0, named=True)
        ok = m[own].notna() & m[f"{own}_21"].notna()
        assert r["n_shared"] == ok.sum()
        assert r["observed"] == pytest.approx(float((m[own][ok] == m[f"{own}_21"][ok]).mean()))
        assert r["kappa"] == pytest.approx(cohen_kappa_score(m[own][ok], m[f"{own}_21"][ok]))
        assert r["confusion"] is None  # the releases agree on every image


def test_physician_vs_rnn_prevalence_per_view(lake, shared_data):
    _, df, _ = lake
    pad = pd.read_csv(shared_data / FILES["padchest"],
                      usecols=["ImageID", "Labels", "MethodLabel", "Projection"])
    pad = pad.drop_duplicates("ImageID")
    rows = df.filter((pl.col("kind") == "prevalence") & (pl.col("finding") == "pneumothorax")
                     & (pl.col("source_a") == "padchest:physician")
                     & (pl.col("subgroup") == "view"))
    assert rows.height >= 2
    for r in rows.iter_rows(named=True):
        sub = pad[pad.Projection == r["subgroup_value"]]
        assert r["n_subgroup"] >= r["n_a"] + r["n_b"]  # the two sources share no image
        for side, method in (("a", "Physician"), ("b", "RNN_model")):
            s = sub[sub.MethodLabel == method]
            assert r[f"pos_{side}"] == sum(bool(x) for x in _has(s.Labels, "pneumothorax"))
            assert abs(r[f"n_{side}"] - len(s)) <= max(len(s) * 0.01, 2)
            if r[f"n_{side}"]:
                lo, hi = proportion_confint(r[f"pos_{side}"], r[f"n_{side}"], method="wilson")
                assert (r[f"prev_{side}_lo"], r[f"prev_{side}_hi"]) == pytest.approx((lo, hi))
    whole = _row(df, "padchest:physician", "padchest:rnn", "pneumothorax")
    assert rows["pos_a"].sum() <= whole["pos_a"] and rows["n_a"].sum() <= whole["n_a"]
