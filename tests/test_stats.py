"""catalog.stats against scikit-learn, statsmodels and krippendorff, plus invariants."""

from __future__ import annotations

import krippendorff
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import cohens_kappa as sm_kappa
from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss
from statsmodels.stats.proportion import proportion_confint

from medlake.catalog.stats import (
    cohen_kappa,
    confusion_tables,
    diagnostic,
    fleiss_kappa,
    kappa_from_tables,
    kappa_note,
    krippendorff_alpha,
    off_by_one,
    wilson,
)


def _random_groups(seed: int, g: int = 6, k: int = 6, n: int = 600):
    rng = np.random.default_rng(seed)
    grp = rng.integers(0, g, n)
    a = rng.integers(0, k, n)
    b = np.clip(a + rng.integers(-1, 2, n), 0, k - 1)
    flip = rng.random(n) < 0.3
    b[flip] = rng.integers(0, k, flip.sum())
    return grp, a, b


@pytest.mark.parametrize("weights", [None, "linear", "quadratic"])
def test_kappa_matches_sklearn_and_statsmodels(weights):
    grp, a, b = _random_groups(1)
    t = confusion_tables(grp, a, b, 6, 6)
    r = kappa_from_tables(t, weights=weights)
    for g in range(6):
        m = grp == g
        ref = cohen_kappa_score(a[m], b[m], weights=weights, labels=list(range(6)))
        sm = sm_kappa(t[g], wt=weights) if weights else sm_kappa(t[g])
        assert r.kappa[g] == pytest.approx(ref, abs=1e-12)
        assert r.se[g] == pytest.approx(sm.std_kappa, abs=1e-12)
        assert (r.lo[g], r.hi[g]) == pytest.approx((sm.kappa_low, sm.kappa_upp), abs=1e-12)
        if weights is None:
            assert r.observed[g] == pytest.approx(float(np.mean(a[m] == b[m])))


def test_binary_kappa_and_diagnostics_match_references():
    rng = np.random.default_rng(7)
    truth = rng.random(300) < 0.3
    test = np.where(rng.random(300) < 0.85, truth, ~truth).astype(int)
    t = confusion_tables(np.zeros(300, int), test, truth.astype(int), 1, 2)
    r = kappa_from_tables(t)
    assert r.kappa[0] == pytest.approx(cohen_kappa_score(test, truth))
    d = diagnostic(t, reference="b")
    tp = int(((test == 1) & truth).sum())
    for name, x, n in (("ppv", tp, int(test.sum())), ("sens", tp, int(truth.sum())),
                       ("spec", int(((test == 0) & ~truth).sum()), int((~truth).sum())),
                       ("npv", int(((test == 0) & ~truth).sum()), int((test == 0).sum()))):
        lo, hi = proportion_confint(x, n, alpha=0.05, method="wilson")
        assert d[name][0] == pytest.approx(x / n)
        assert (d[f"{name}_lo"][0], d[f"{name}_hi"][0]) == pytest.approx((lo, hi))
    # the reference side can be swapped: a's sensitivity against b is b's PPV against a
    assert diagnostic(t, reference="a")["ppv"][0] == pytest.approx(d["sens"][0])


def test_wilson_matches_statsmodels_and_is_undefined_without_items():
    x, n = np.array([0, 3, 10, 7]), np.array([5, 10, 10, 0])
    p, lo, hi = wilson(x, n)
    ref_lo, ref_hi = proportion_confint(x[:3], n[:3], alpha=0.05, method="wilson")
    assert lo[:3] == pytest.approx(ref_lo, abs=1e-12)
    assert hi[:3] == pytest.approx(ref_hi, abs=1e-12)
    assert np.isnan(p[3]) and np.isnan(lo[3]) and np.isnan(hi[3])


def test_fleiss_and_krippendorff_match_references():
    rng = np.random.default_rng(3)
    ratings = rng.integers(0, 3, (500, 3))
    ratings[:, 1] = np.where(rng.random(500) < 0.6, ratings[:, 0], ratings[:, 1])
    counts = np.stack([np.bincount(r, minlength=3) for r in ratings])
    grp = rng.integers(0, 4, 500)
    fk = fleiss_kappa(grp, counts, 4)
    for metric in ("nominal", "ordinal", "interval"):
        al = krippendorff_alpha(grp, counts, 4, metric=metric)
        for g in range(4):
            ref = krippendorff.alpha(value_counts=counts[grp == g], level_of_measurement=metric)
            assert al[g] == pytest.approx(ref, abs=1e-12)
    for g in range(4):
        assert fk[g] == pytest.approx(sm_fleiss(counts[grp == g]), abs=1e-12)
    # missing ratings (an item seen by 2 of 3 readers) are fine for alpha
    counts[::4, 0] = 0
    al = krippendorff_alpha(grp, counts, 4)
    assert al[0] == pytest.approx(krippendorff.alpha(value_counts=counts[grp == 0],
                                                     level_of_measurement="nominal"))


def test_off_by_one():
    a = np.array([0, 1, 2, 5, 3])
    b = np.array([1, 1, 4, 5, 0])
    t = confusion_tables(np.zeros(5, int), a, b, 1, 6)
    assert off_by_one(t)[0] == pytest.approx(3 / 5)


def test_edge_cases_are_undefined_with_a_reason():
    # group 0: no items; 1: one shared image; 2: all identical labels; 3: no positives on
    # one side but not the other (kappa defined and 0)
    grp = np.array([1, 2, 2, 2, 3, 3, 3, 3])
    a = np.array([1, 0, 0, 0, 0, 0, 0, 0])
    b = np.array([1, 0, 0, 0, 0, 1, 0, 1])
    r = kappa_from_tables(confusion_tables(grp, a, b, 4, 2))
    assert np.isnan(r.kappa[:3]).all()
    assert r.kappa[3] == pytest.approx(cohen_kappa_score(a[grp == 3], b[grp == 3]))
    notes = kappa_note(r)
    assert notes[0] == "kappa undefined: no shared rated items"
    assert "same label to all 1 shared" in notes[1] and "all 3 shared" in notes[2]
    assert notes[3] is None
    d = diagnostic(confusion_tables(grp, a, b, 4, 2), reference="b")
    assert np.isnan(d["ppv"][3])  # rater a has no positives in group 3
    assert np.isnan(fleiss_kappa(np.array([0]), np.array([[3, 0]]), 2)).all()
    assert np.isnan(krippendorff_alpha(np.array([0]), np.array([[3, 0]]), 1))[0]


labels = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=2, max_size=60)


@settings(max_examples=60, deadline=None)
@given(labels, st.sampled_from([None, "linear", "quadratic"]))
def test_kappa_invariants(pairs, weights):
    a = np.array([p[0] for p in pairs])
    b = np.array([p[1] for p in pairs])
    one = np.zeros(len(a), int)
    k_ab = kappa_from_tables(confusion_tables(one, a, b, 1, 4), weights=weights)
    k_ba = kappa_from_tables(confusion_tables(one, b, a, 1, 4), weights=weights)
    perm = np.random.default_rng(len(a)).permutation(len(a))
    k_perm = kappa_from_tables(confusion_tables(one, a[perm], b[perm], 1, 4), weights=weights)
    k_self = kappa_from_tables(confusion_tables(one, a, a, 1, 4), weights=weights)
    # symmetric, invariant to row order
    np.testing.assert_allclose(k_ab.kappa, k_ba.kappa, equal_nan=True, atol=1e-12)
    np.testing.assert_allclose(k_ab.se, k_ba.se, equal_nan=True, atol=1e-6)  # sqrt of ~0
    np.testing.assert_allclose(k_ab.kappa, k_perm.kappa, equal_nan=True, atol=1e-12)
    # bounded, and matching scikit-learn wherever it is defined
    if not np.isnan(k_ab.kappa[0]):
        assert -1 - 1e-9 <= k_ab.kappa[0] <= 1 + 1e-9
        assert k_ab.lo[0] <= k_ab.kappa[0] <= k_ab.hi[0]
        ref = cohen_kappa_score(a, b, weights=weights, labels=[0, 1, 2, 3])
        assert k_ab.kappa[0] == pytest.approx(ref, abs=1e-9)
    # with itself: 1, unless every label is the same (then undefined, not 0)
    if len(set(a.tolist())) > 1:
        assert k_self.kappa[0] == pytest.approx(1.0)
    else:
        assert np.isnan(k_self.kappa[0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), min_size=3, max_size=3), min_size=2, max_size=40))
def test_multi_rater_invariants(rows):
    ratings = np.array(rows)
    counts = np.stack([np.bincount(r, minlength=3) for r in ratings])
    one = np.zeros(len(counts), int)
    fk = fleiss_kappa(one, counts, 1)[0]
    al = krippendorff_alpha(one, counts, 1)[0]
    perm = np.random.default_rng(1).permutation(len(counts))
    assert np.allclose(fk, fleiss_kappa(one, counts[perm], 1)[0], equal_nan=True)
    if np.isnan(al):
        assert len(np.unique(ratings)) == 1
    else:
        assert al == pytest.approx(krippendorff.alpha(value_counts=counts,
                                                      level_of_measurement="nominal"))
        assert fk == pytest.approx(sm_fleiss(counts))


def test_cohen_kappa_convenience_and_bad_input():
    r = cohen_kappa(["x", "y", "x", "y"], ["x", "y", "y", "y"])
    assert r["kappa"] == pytest.approx(cohen_kappa_score(["x", "y", "x", "y"], ["x", "y", "y", "y"]))
    with pytest.raises(ValueError, match="same length"):
        cohen_kappa([1, 0], [1])
    with pytest.raises(ValueError, match="weights must be"):
        kappa_from_tables(np.ones((1, 2, 2)), weights="cubic")  # type: ignore[arg-type]


def test_multiclass_category_kappa_matches_sklearn_and_statsmodels():
    """Unweighted kappa over text categories (e.g. two sources' diagnoses)."""
    rng = np.random.default_rng(23)
    dx = np.array(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"])
    a = rng.choice(dx, 500)
    b = np.where(rng.random(500) < 0.6, a, rng.choice(dx, 500))
    r = cohen_kappa(a, b)
    assert r["kappa"] == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)
    assert r["observed"] == pytest.approx(float(np.mean(a == b)))
    table = np.array([[np.sum((a == x) & (b == y)) for y in dx] for x in dx])
    sm = sm_kappa(table)
    assert (r["se"], r["lo"], r["hi"]) == pytest.approx(
        (sm.std_kappa, sm.kappa_low, sm.kappa_upp), abs=1e-12)
