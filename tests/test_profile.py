"""`medlake profile` on real NIH metadata: counts checked against the file itself."""

from __future__ import annotations

import csv
import gzip
from collections import Counter

import pytest
from click.testing import CliRunner

from medlake.catalog import Catalog, CatalogError
from medlake.catalog.profile import profile
from medlake.cli.main import main
from medlake.pipelines import agreement, ingest


@pytest.fixture(scope="module")
def nih(shared_data, tmp_path_factory):
    from medlake.catalog import Workspace

    root = tmp_path_factory.mktemp("prof") / "ws"
    (root / ".dvc").mkdir(parents=True)
    cat = Catalog(Workspace(root))
    ingest.run(cat, "nih-cxr14", shared_data / "cxr" / "Data_Entry_2017_v2020.csv.gz")
    ingest.run(cat, "google2019", shared_data / "cxr" / "google2019_nih-chest-xray-labels.csv.gz")
    with gzip.open(shared_data / "cxr" / "Data_Entry_2017_v2020.csv.gz", "rt", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return cat, rows


def test_profile_counts_match_the_file(nih):
    cat, rows = nih
    p = profile(cat, "nih-cxr14")
    per_patient = Counter(r["Patient ID"] for r in rows)
    assert p.summary["images"] == len(rows)
    assert p.summary["groups"] == len(per_patient)
    for t in (1, 5, 10, 50, 100):
        row = p.group_sizes.filter(p.group_sizes["more_than"] == t).row(0, named=True)
        assert row["groups"] == sum(1 for n in per_patient.values() if n > t)
        assert row["images"] == sum(n for n in per_patient.values() if n > t)
    prev = {(r["source_id"], r["finding"]): r for r in p.prevalence.iter_rows(named=True)}
    eff = prev[("nih-cxr14:report_nlp", "Effusion")]
    n_eff = sum("Effusion" in r["Finding Labels"].split("|") for r in rows)
    assert (eff["positive"], eff["judged"]) == (n_eff, len(rows))
    cov = dict(p.coverage.select("source_id", "images").iter_rows())
    assert cov == {"nih-cxr14:report_nlp": len(rows), "nih-cxr14:google2019_expert": 4376}
    assert p.overlap.row(0, named=True)["shared_images"] == 4376
    assert p.splits["images"].sum() == 4376  # the google2019 scheme


def test_profile_gains_agreement_summary(nih):
    cat, _ = nih
    agreement.run(cat, "nih-cxr14")
    p = profile(cat, "nih-cxr14")
    section = [v for k, v in p.extra.items() if k.startswith("agreement")]
    assert section, "no agreement section after medlake agreement ran"
    pneumo = section[0].filter(section[0]["finding"].str.to_lowercase().str.contains("pneumothorax"))
    assert pneumo.height >= 1 and pneumo["n_shared"].max() == 4376
    assert "agreement between sources" in p.render()


def test_profile_unknown_dataset_and_cli(nih):
    cat, _ = nih
    with pytest.raises(CatalogError, match="ingested datasets: nih-cxr14"):
        profile(cat, "nope")
    res = CliRunner().invoke(main, ["profile", "nih-cxr14", "-w", str(cat.ws.root)])
    assert res.exit_code == 0, res.output
    assert "112,120 images, 30,805 groups" in res.output
