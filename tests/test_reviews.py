"""The reviews table: append-only verdicts, latest per item, PPV/kappa, concurrent writers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.proportion import proportion_confint

from medlake.catalog import Catalog, Workspace
from medlake.catalog import reviews as rv

REPO = Path(__file__).resolve().parents[1]


def test_record_read_back_and_survive_restart(catalog):
    v = rv.pair_verdict("d:2", "d:1", "different", "ana", note="other patient")
    assert rv.record(catalog, v) == 1
    again = Catalog(Workspace(catalog.ws.root))  # a new process/server sees the same rows
    df = rv.read(again)
    assert df.height == 1
    row = df.row(0, named=True)
    assert (row["item"], row["image_id"], row["image_b"]) == ("d:1|d:2", "d:1", "d:2")
    assert (row["kind"], row["verdict"], row["reviewer"], row["note"]) == (
        "pair", "different", "ana", "other patient")
    assert row["created_at"] is not None
    # the SQL view sees it too
    assert catalog.sql("SELECT count(*) AS n FROM reviews").column("n")[0].as_py() == 1


def test_change_of_mind_latest_counts_history_stays(catalog):
    rv.record(catalog, rv.label_verdict("d:1", "d:nlp", "Effusion", "correct", "ana"))
    rv.record(catalog, rv.label_verdict("d:1", "d:nlp", "Effusion", "wrong", "bob"))
    rv.record(catalog, rv.label_verdict("d:1", "d:nlp", "Effusion", "wrong", "ana"))
    assert rv.read(catalog).height == 3
    per_reviewer = rv.latest(catalog, kind="label")
    assert dict(zip(per_reviewer["reviewer"], per_reviewer["verdict"])) == {
        "ana": "wrong", "bob": "wrong"}
    overall = rv.latest(catalog, kind="label", per_reviewer=False)
    assert overall.height == 1 and overall["reviewer"][0] == "ana"


@pytest.mark.parametrize("kw, msg", [
    ({"verdict": "maybe"}, "not a verdict for a pair"),
    ({"reviewer": "  "}, "no reviewer name"),
])
def test_bad_verdicts_are_refused_and_nothing_is_written(catalog, kw, msg):
    args = {"verdict": "duplicate", "reviewer": "ana"} | kw
    with pytest.raises(rv.ReviewError, match=msg):
        rv.record(catalog, [rv.pair_verdict("d:1", "d:3", "duplicate", "ana"),
                            rv.pair_verdict("d:1", "d:2", args["verdict"], args["reviewer"])])
    assert rv.read(catalog).height == 0
    assert not rv.folder(catalog).exists() or not list(rv.folder(catalog).iterdir())


def test_ppv_matches_statsmodels_wilson(catalog):
    rng = np.random.default_rng(1)
    batch = []
    for f, p in (("Effusion", 0.8), ("Nodule", 0.4)):
        for i in range(60):
            v = rng.choice(["correct", "wrong", "unsure"], p=[p * 0.9, (1 - p) * 0.9, 0.1])
            batch.append(rv.label_verdict(f"d:{i}", "d:nlp", f, str(v), "ana"))
    rv.record(catalog, batch)
    ppv = rv.ppv_by_class(catalog)
    for r in ppv.iter_rows(named=True):
        sub = [b.verdict for b in batch if b.finding == r["finding"]]
        k, n = sub.count("correct"), sub.count("correct") + sub.count("wrong")
        assert (r["n_correct"], r["n"], r["n_unsure"]) == (k, n, sub.count("unsure"))
        lo, hi = proportion_confint(k, n, alpha=0.05, method="wilson")
        assert r["ppv"] == pytest.approx(k / n)
        assert (r["ppv_lo"], r["ppv_hi"]) == pytest.approx((lo, hi), abs=1e-6)


def test_reviewer_kappa_matches_sklearn(catalog):
    rng = np.random.default_rng(2)
    a = rng.choice(rv.VERDICTS["label"], 80, p=[0.6, 0.3, 0.1])
    b = np.where(rng.random(80) < 0.75, a, rng.choice(rv.VERDICTS["label"], 80))
    rv.record(catalog, [rv.label_verdict(f"d:{i}", "d:s", "F", str(v), "ana")
                        for i, v in enumerate(a)])
    # bob judges only 70 of the 80 items plus 5 that ana did not see
    rv.record(catalog, [rv.label_verdict(f"d:{i}", "d:s", "F", str(v), "bob")
                        for i, v in enumerate(b[:70])])
    rv.record(catalog, [rv.label_verdict(f"d:x{i}", "d:s", "F", "wrong", "bob") for i in range(5)])
    k = rv.reviewer_kappa(catalog).row(0, named=True)
    assert (k["reviewer_a"], k["reviewer_b"], k["n_shared"]) == ("ana", "bob", 70)
    assert k["kappa"] == pytest.approx(cohen_kappa_score(a[:70], b[:70]))
    assert k["kappa_lo"] < k["kappa"] < k["kappa_hi"]


def test_compact_keeps_history(catalog):
    for i in range(30):
        rv.record(catalog, rv.pair_verdict("d:1", f"d:{i + 2}", "unclear", "ana"))
    before = rv.read(catalog)
    assert rv.compact(catalog) == 30
    assert len(catalog.tables.files("reviews")) == 1
    after = rv.read(catalog)
    assert after.equals(before)
    rv.record(catalog, rv.pair_verdict("d:1", "d:2", "duplicate", "ana"))
    assert rv.latest(catalog, per_reviewer=False).filter(
        pl.col("item") == "d:1|d:2")["verdict"][0] == "duplicate"


WRITER = textwrap.dedent("""
    import sys
    from medlake.catalog import Catalog, Workspace
    from medlake.catalog import reviews as rv
    root, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cat = Catalog(Workspace(__import__("pathlib").Path(root)))
    for i in range(n):
        rv.record(cat, rv.pair_verdict(f"d:{i}", f"d:{i + 1}", "duplicate", who))
""")


def _nih_csv(path: Path, n: int) -> Path:
    rows = [{"Image Index": f"{i:08d}_000.png", "Finding Labels": "Effusion|Mass" if i % 3 else
             "No Finding", "Follow-up #": "0", "Patient ID": str(i // 2), "Patient Age": "50",
             "Patient Gender": "F", "View Position": "PA"} for i in range(n)]
    pl.DataFrame(rows).write_csv(path)
    return path


def test_two_writers_and_a_pipeline_stage_lose_nothing(catalog, tmp_path):
    from medlake.pipelines import ingest

    csv = _nih_csv(tmp_path / "Data_Entry_2017_v2020.csv", 300)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(catalog.ws.root), who, "500"],
                              cwd=REPO) for who in ("ana", "bob")]
    stage_runs = compactions = 0
    while any(p.poll() is None for p in procs):
        ingest.run(catalog, "nih-cxr14", csv)  # a pipeline stage writing tables meanwhile
        stage_runs += 1
        compactions += rv.compact(catalog) > 0
    assert [p.wait() for p in procs] == [0, 0]
    assert stage_runs >= 1
    df = rv.read(catalog)
    assert df.height == 1000
    assert df["review_id"].n_unique() == 1000
    assert df.group_by("reviewer").len().sort("reviewer")["len"].to_list() == [500, 500]
    assert catalog.sql("SELECT count(*) AS n FROM reviews").column("n")[0].as_py() == 1000
    assert catalog.read("images").height == 300  # the stage's own output is whole
