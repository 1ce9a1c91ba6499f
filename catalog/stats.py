"""Agreement statistics, vectorised over many groups at once.

Every function takes *all* groups in one call (a group is, say, one (source pair, finding,
subgroup)) so that thousands of kappas cost a few NumPy passes instead of a Python loop.
Each result equals its reference implementation on the same data:

=====================================  =========================================================
:func:`kappa_from_tables`              ``statsmodels.stats.inter_rater.cohens_kappa`` (kappa,
                                       asymptotic SE and 95% CI; ``wt='linear'/'quadratic'``)
                                       and ``sklearn.metrics.cohen_kappa_score``
:func:`fleiss_kappa`                   ``statsmodels.stats.inter_rater.fleiss_kappa``
:func:`krippendorff_alpha`             ``krippendorff.alpha(value_counts=...)``
:func:`wilson`                         ``statsmodels...proportion_confint(method='wilson')``
=====================================  =========================================================

:func:`bounded_ci` cuts a kappa interval to [-1, 1] (the agreement stage's default,
``params.yaml: agreement.kappa_ci: clip``, with a note on each row it cut).

Undefined results are ``nan`` here, with a reason from :func:`kappa_note`; the agreement
stage stores them as null plus that note, never as 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl

Z95 = 1.959963984540054  # scipy.stats.norm.isf(0.025)
Weights = Literal["linear", "quadratic"] | None
Metric = Literal["nominal", "ordinal", "interval"]


def confusion_tables(
    group: np.ndarray, a: np.ndarray, b: np.ndarray, n_groups: int, k: int
) -> np.ndarray:
    """Count tables of two raters' codes for many groups at once.

    Parameters
    ----------
    group, a, b
        Integer arrays of one length: the group of each rated item and the two raters'
        codes in ``0..k-1``.
    n_groups, k
        Number of groups and of categories.

    Returns
    -------
    numpy.ndarray
        Shape ``(n_groups, k, k)``; ``tables[g, i, j]`` counts items of group ``g`` that
        rater a put in category ``i`` and rater b in ``j``.

    Example
    -------
    >>> confusion_tables(np.array([0, 0]), np.array([1, 0]), np.array([1, 1]), 1, 2)[0]
    array([[0., 1.],
           [0., 1.]])
    """
    idx = (np.asarray(group, np.int64) * k + np.asarray(a, np.int64)) * k + np.asarray(b, np.int64)
    return np.bincount(idx, minlength=n_groups * k * k).reshape(n_groups, k, k).astype(float)


@dataclass(frozen=True)
class KappaArrays:
    """Per-group kappa results; every field has shape ``(n_groups,)``; ``nan`` = undefined."""

    n: np.ndarray
    observed: np.ndarray  # share of items on which the raters agree exactly
    expected: np.ndarray  # chance agreement from the marginals (weighted when weights)
    kappa: np.ndarray
    se: np.ndarray  # asymptotic standard error (statsmodels' std_kappa)
    lo: np.ndarray
    hi: np.ndarray


def _disagreement_weights(k: int, weights: Weights) -> np.ndarray:
    v = np.arange(k, dtype=float)
    if weights is None:
        return 1.0 - np.eye(k)
    d = np.abs(v[:, None] - v[None, :]) / max(k - 1, 1)
    if weights == "linear":
        return d
    if weights == "quadratic":
        return d**2
    raise ValueError(f"weights must be None, 'linear' or 'quadratic', not {weights!r}")


def kappa_from_tables(tables: np.ndarray, *, weights: Weights = None) -> KappaArrays:
    """Cohen's kappa (optionally weighted) with its asymptotic 95% CI, per table.

    Parameters
    ----------
    tables
        ``(G, k, k)`` count tables from :func:`confusion_tables` (categories in scale order
        for weighted kappa).
    weights
        None for Cohen's kappa; ``'linear'`` or ``'quadratic'`` for weighted kappa with
        disagreement weights ``|i-j|`` or ``(i-j)**2`` over the full ``0..k-1`` scale.

    Returns
    -------
    KappaArrays
        ``nan`` where undefined: no items, or expected agreement of 1 (both raters give
        one and the same category to everything, e.g. a single shared image).

    Notes
    -----
    The variance is the large-sample formula statsmodels uses (Fleiss, Cohen and Everitt
    1969; SAS's for weighted kappa); the CI is ``kappa +- 1.96 * se``.
    """
    t = np.asarray(tables, float)
    if t.ndim != 3 or t.shape[1] != t.shape[2]:
        raise ValueError(f"tables must have shape (groups, k, k), got {t.shape}")
    k = t.shape[1]
    n = t.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = t / n[:, None, None]
        fr = p.sum(2)  # rater a's marginals (rows)
        fc = p.sum(1)  # rater b's marginals (columns)
        dis = _disagreement_weights(k, weights)
        w = 1.0 - dis  # agreement weights
        pexp = fr[:, :, None] * fc[:, None, :]
        observed = np.trace(p, axis1=1, axis2=2)
        ew = (pexp * w).sum(axis=(1, 2))  # expected (weighted) agreement
        ow = (p * w).sum(axis=(1, 2))
        kappa = (ow - ew) / (1.0 - ew)
        w_row = (fc[:, None, :] * w).sum(2)  # [g, i] = sum_j fc_j w_ij
        w_col = (fr[:, :, None] * w).sum(1)  # [g, j] = sum_i fr_i w_ij
        inner = w[None] - (w_col[:, None, :] + w_row[:, :, None]) * (1.0 - kappa)[:, None, None]
        term_a = (p * inner**2).sum(axis=(1, 2))
        var = (term_a - (kappa - ew * (1.0 - kappa)) ** 2) / ((1.0 - ew) ** 2 * n)
    undefined = (n == 0) | ~np.isfinite(kappa) | np.isclose(ew, 1.0, rtol=0, atol=1e-12)
    kappa = np.where(undefined, np.nan, kappa)
    se = np.where(undefined, np.nan, np.sqrt(np.clip(var, 0.0, None)))
    observed = np.where(n == 0, np.nan, observed)
    return KappaArrays(
        n=n, observed=observed, expected=np.where(n == 0, np.nan, ew), kappa=kappa, se=se,
        lo=kappa - Z95 * se, hi=kappa + Z95 * se,
    )


def bounded_ci(
    lo: Any, hi: Any, *, lower: float = -1.0, upper: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An interval cut to ``[lower, upper]`` (kappa's range), and where it was cut.

    The asymptotic interval ``kappa +- 1.96 se`` can leave [-1, 1] on small samples (e.g.
    0.739 +- 0.348 on 91 images gives an upper bound of 1.086); no kappa lies there.

    Returns
    -------
    (lo, hi, clipped)
        ``clipped`` is True where either bound was cut; ``nan`` stays ``nan``.

    Example
    -------
    >>> lo, hi, cut = bounded_ci([0.39], [1.086])
    >>> float(hi[0]), bool(cut[0])
    (1.0, True)
    """
    a, b = np.asarray(lo, float), np.asarray(hi, float)
    with np.errstate(invalid="ignore"):
        cut = (a < lower) | (b > upper)
    return np.clip(a, lower, upper), np.clip(b, lower, upper), cut


def kappa_note(k: KappaArrays) -> list[str | None]:
    """A reason per group where ``k.kappa`` is undefined (None where it is defined)."""
    out: list[str | None] = []
    for n, kap in zip(k.n, k.kappa):
        if n == 0:
            out.append("kappa undefined: no shared rated items")
        elif np.isnan(kap):
            out.append(
                "kappa undefined: both sides give one and the same label to all "
                f"{int(n)} shared items (chance agreement is 1)"
            )
        else:
            out.append(None)
    return out


def off_by_one(tables: np.ndarray) -> np.ndarray:
    """Share of items whose two codes differ by at most one step (ordinal scales)."""
    t = np.asarray(tables, float)
    k = t.shape[1]
    near = np.abs(np.arange(k)[:, None] - np.arange(k)[None, :]) <= 1
    n = t.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n == 0, np.nan, (t * near).sum(axis=(1, 2)) / n)


def wilson(
    successes: Any, n: Any, *, z: float = Z95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Proportion and Wilson score interval, vectorised; ``nan`` where ``n == 0``.

    Example
    -------
    >>> p, lo, hi = wilson([8], [10])
    >>> round(float(lo[0]), 3), round(float(hi[0]), 3)
    (0.49, 0.943)
    """
    x = np.asarray(successes, float)
    m = np.asarray(n, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = x / m
        z2 = z * z
        denom = 1.0 + z2 / m
        center = (q + z2 / (2.0 * m)) / denom
        dist = z * np.sqrt(q * (1.0 - q) / m + z2 / (4.0 * m * m)) / denom
    bad = m <= 0
    return (np.where(bad, np.nan, q), np.where(bad, np.nan, center - dist),
            np.where(bad, np.nan, center + dist))


def diagnostic(tables: np.ndarray, *, reference: Literal["a", "b"] = "b") -> dict[str, np.ndarray]:
    """PPV, NPV, sensitivity and specificity of one rater against the other, with Wilson CIs.

    Parameters
    ----------
    tables
        ``(G, 2, 2)`` tables (code 1 = positive); rows are rater a, columns rater b.
    reference
        Which side is the truth; the other side is the test.

    Returns
    -------
    dict
        ``ppv, ppv_lo, ppv_hi, npv..., sens..., spec...`` arrays; ``nan`` when the
        denominator is 0 (e.g. no test positives for PPV).
    """
    t = np.asarray(tables, float)
    if t.shape[1:] != (2, 2):
        raise ValueError(f"diagnostic statistics need 2x2 tables, got {t.shape[1:]}")
    if reference == "a":
        t = np.transpose(t, (0, 2, 1))
    tp, fp, fn, tn = t[:, 1, 1], t[:, 1, 0], t[:, 0, 1], t[:, 0, 0]
    out: dict[str, np.ndarray] = {}
    for name, x, m in (("ppv", tp, tp + fp), ("npv", tn, tn + fn),
                       ("sens", tp, tp + fn), ("spec", tn, tn + fp)):
        out[name], out[f"{name}_lo"], out[f"{name}_hi"] = wilson(x, m)
    return out


def fleiss_kappa(group: np.ndarray, counts: np.ndarray, n_groups: int) -> np.ndarray:
    """Fleiss' kappa per group from per-item category counts.

    Parameters
    ----------
    group
        ``(N,)`` group of each rated item.
    counts
        ``(N, k)`` how many raters put the item in each category. Items with fewer than
        two ratings are ignored; with a constant number of raters this equals statsmodels'
        ``fleiss_kappa(counts, method='fleiss')`` per group.

    Returns
    -------
    numpy.ndarray
        ``(n_groups,)``; ``nan`` where there is no item with two ratings or chance
        agreement is 1.
    """
    c = np.asarray(counts, float)
    g = np.asarray(group, np.int64)
    m = c.sum(1)
    keep = m >= 2
    c, g, m = c[keep], g[keep], m[keep]
    with np.errstate(divide="ignore", invalid="ignore"):
        p_item = ((c * c).sum(1) - m) / (m * (m - 1.0))
        n_items = np.bincount(g, minlength=n_groups).astype(float)
        p_mean = np.bincount(g, weights=p_item, minlength=n_groups) / n_items
        tot = np.bincount(g, weights=m, minlength=n_groups)
        cat = np.stack([np.bincount(g, weights=c[:, j], minlength=n_groups)
                        for j in range(c.shape[1])], axis=1) / tot[:, None]
        pe = (cat * cat).sum(1)
        kap = (p_mean - pe) / (1.0 - pe)
    return np.where((n_items == 0) | np.isclose(pe, 1.0, rtol=0, atol=1e-12), np.nan, kap)


def krippendorff_alpha(
    group: np.ndarray, counts: np.ndarray, n_groups: int, *, metric: Metric = "nominal",
    values: np.ndarray | None = None,
) -> np.ndarray:
    """Krippendorff's alpha per group from per-item value counts (missing ratings allowed).

    Parameters
    ----------
    group, counts
        As for :func:`fleiss_kappa`; ``counts[u, c]`` raters giving item ``u`` value ``c``.
    metric
        ``'nominal'``, ``'ordinal'`` or ``'interval'`` (then ``values`` gives the numeric
        value of each category; default ``0..k-1``).

    Returns
    -------
    numpy.ndarray
        ``(n_groups,)``; equals ``krippendorff.alpha(value_counts=..., value_domain=...,
        level_of_measurement=metric)`` per group; ``nan`` where there is no pairable value
        or all pairable values are equal.
    """
    c = np.asarray(counts, float)
    g = np.asarray(group, np.int64)
    k = c.shape[1]
    m = c.sum(1)
    keep = m >= 2
    c, g, m = c[keep], g[keep], m[keep]
    outer = (c[:, :, None] * c[:, None, :] - c[:, :, None] * np.eye(k)[None]) / (m - 1.0)[:, None, None]
    flat = outer.reshape(len(c), k * k)
    o = np.stack([np.bincount(g, weights=flat[:, j], minlength=n_groups) for j in range(k * k)],
                 axis=1).reshape(n_groups, k, k)
    nc = o.sum(2)
    n = nc.sum(1)
    if metric == "nominal":
        d2 = np.broadcast_to(1.0 - np.eye(k), (n_groups, k, k))
    elif metric == "interval":
        v = np.arange(k, dtype=float) if values is None else np.asarray(values, float)
        d2 = np.broadcast_to((v[:, None] - v[None, :]) ** 2, (n_groups, k, k))
    elif metric == "ordinal":
        cs = np.cumsum(nc, axis=1)
        lo_i = np.minimum.outer(np.arange(k), np.arange(k))
        hi_i = np.maximum.outer(np.arange(k), np.arange(k))
        between = cs[:, hi_i] - cs[:, lo_i] + nc[:, lo_i]
        d2 = (between - (nc[:, :, None] + nc[:, None, :]) / 2.0) ** 2
    else:
        raise ValueError(f"metric must be nominal, ordinal or interval, not {metric!r}")
    with np.errstate(divide="ignore", invalid="ignore"):
        do = (o * d2).sum(axis=(1, 2))
        de = (nc[:, :, None] * nc[:, None, :] * d2).sum(axis=(1, 2))
        alpha = 1.0 - (n - 1.0) * do / de
    return np.where((n < 2) | (de == 0), np.nan, alpha)


def cohen_kappa(
    a: Any, b: Any, *, weights: Weights = None, labels: Any = None, clip: bool = True,
) -> dict[str, float]:
    """Kappa of two equal-length label sequences (a convenience for small data and the UI).

    Returns ``{'n', 'observed', 'kappa', 'se', 'lo', 'hi', 'clipped'}`` (``nan`` where
    undefined); with ``clip`` (default) the interval is cut to [-1, 1] (:func:`bounded_ci`)
    and ``clipped`` is 1.0 where it was cut, else 0.0.
    """
    a_, b_ = np.asarray(a), np.asarray(b)
    if a_.shape != b_.shape:
        raise ValueError(f"a and b must have the same length ({a_.shape} vs {b_.shape})")
    cats = np.unique(np.concatenate([a_, b_])) if labels is None else np.asarray(labels)
    ia, ib = np.searchsorted(cats, a_), np.searchsorted(cats, b_)
    r = kappa_from_tables(
        confusion_tables(np.zeros(len(a_), int), ia, ib, 1, max(len(cats), 1)), weights=weights
    )
    out = {f: float(getattr(r, f)[0]) for f in ("n", "observed", "kappa", "se", "lo", "hi")}
    if clip:
        lo, hi, cut = bounded_ci(r.lo, r.hi)
        out.update(lo=float(lo[0]), hi=float(hi[0]), clipped=float(cut[0]))
    else:
        out["clipped"] = 0.0
    return out


def agreement_summary(catalog: Any, dataset_id: str) -> pl.DataFrame:
    """The agreement figures of one dataset for its profile: one row per pair and finding.

    Overall rows only (no subgroups), sorted by finding. Empty (with these columns) when
    the agreement stage has not run for the dataset.

    Returns
    -------
    polars.DataFrame
        ``finding, source_a, annotator_a, source_b, annotator_b, kind, n_shared, pos_a,
        pos_b, observed, kappa, kappa_lo, kappa_hi, ppv, ppv_lo, ppv_hi, note``.
    """
    cols = ["finding", "source_a", "annotator_a", "source_b", "annotator_b", "kind",
            "n_shared", "pos_a", "pos_b", "observed", "kappa", "kappa_lo", "kappa_hi",
            "ppv", "ppv_lo", "ppv_hi", "note"]
    df = catalog.read("agreement")
    df = df.filter((pl.col("dataset_id") == dataset_id) & (pl.col("subgroup") == ""))
    return df.select(cols).sort(["finding", "source_a", "annotator_a", "source_b", "annotator_b"])
