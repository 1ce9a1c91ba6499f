"""Every page through Streamlit's AppTest on a small generated workspace."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest
from streamlit.testing.v1 import AppTest

from medlake.catalog import Catalog
from medlake.catalog import reviews as rv
from medlake.demo import ui_sample as sample
from medlake.ui import data

APP = str(Path(__file__).resolve().parents[1] / "ui" / "app.py")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return sample.build(tmp_path_factory.mktemp("uiws") / "ws", n_images=60, n_pairs=20).root


def open_page(root: Path, page: str, monkeypatch) -> AppTest:
    monkeypatch.setenv("MEDLAKE_WORKSPACE", str(root))
    monkeypatch.setenv("MEDLAKE_REVIEWER", "tester")
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["page"] = page
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


# plain st.dataframe elements carry no key in AppTest: tests address them by position

def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [h.value for h in at.subheader] + [str(m.value) for m in at.metric]
    return "\n".join(parts)


def test_catalog_page(ws, monkeypatch):
    at = open_page(ws, "catalog", monkeypatch)
    assert at.table[0].value.shape[0] == 3  # datasets: demo-cxr, demo-derm, demo-pc
    assert at.table[1].value.shape[0] == 5  # sources
    assert "2 versions" in texts(at)
    at.selectbox(key="version").set_value(sample.FIXED_VERSION).run()
    assert "Parent: demo-cxr@official" in texts(at)  # the datasheet
    assert len(at.dataframe) == 0  # closed tabs (lineage, diff) are not run
    at.session_state["version-tab"] = "Lineage"
    at.run()
    lin = at.dataframe[0].value
    assert len(lin) == 60
    at.multiselect(key="lin-action").set_value(["removed"]).run()
    removed = at.dataframe[0].value
    assert len(removed) == len(range(0, 60, 17)) and set(removed["action"]) == {"removed"}
    counts, _ = data.diff(Catalog.open(ws), sample.ROOT_VERSION, sample.FIXED_VERSION)
    at.session_state["version-tab"] = "Diff"
    at.run()
    assert f"{counts['removed']:,} removed" in texts(at) and counts["removed"] == 4


def test_duplicates_page_and_verdict_click(ws, monkeypatch):
    at = open_page(ws, "duplicates", monkeypatch)
    cat = Catalog.open(ws)
    n_pairs = cat.read("pairs").height
    assert at.metric[0].value == f"{n_pairs:,}"
    # one page of full-size images: 3 panels per pair, PER_PAGE pairs
    from medlake.ui.views.duplicates import PER_PAGE

    assert sum("score" in m.value for m in at.markdown) == PER_PAGE
    # + the score histogram (a PNG) + the first cluster's 3 thumbnails
    assert len(at.image) == 3 * PER_PAGE + 1 + 3
    assert any(c.startswith("pairs per score bin") for i in at.image for c in i.captions)
    before = rv.read(cat).height
    at.button(key="pair-0-different").click().run()
    assert not at.exception
    after = rv.read(cat)
    assert after.height == before + 1
    row = after.row(-1, named=True)
    assert (row["kind"], row["verdict"], row["reviewer"]) == ("pair", "different", "tester")
    best = cat.query("SELECT image_a, image_b FROM pairs ORDER BY score DESC, image_a, image_b "
                     "LIMIT 1").row(0)
    assert row["item"] == rv.pair_item(*best)
    assert any("recorded: different" in s.value for s in at.success)
    at.checkbox(key="dup-cross").check().run()
    crossing = cat.query("""SELECT count(*) FROM pairs p JOIN splits a ON a.image_id = p.image_a
                            JOIN splits b ON b.image_id = p.image_b WHERE a.split <> b.split""")
    assert at.metric[0].value == f"{crossing.item():,}"


def test_discrepancies_page_counts(ws, monkeypatch):
    at = open_page(ws, "discrepancies", monkeypatch)
    at.selectbox(key="disc-finding").set_value("Pneumothorax").run()
    ann = Catalog.open(ws).read("annotations").filter(pl.col("finding") == "Pneumothorax")
    a = ann.filter(pl.col("source_id") == sample.SOURCES[0]).select("image_id", "value")
    b = ann.filter(pl.col("source_id") == sample.SOURCES[1]).select("image_id", "value")
    n = a.join(b, on="image_id").filter((pl.col("value") > 0) != (pl.col("value_right") > 0)).height
    assert n > 0
    assert f"{n:,} images where the two sources disagree" in texts(at)
    from medlake.ui.views.discrepancies import PER_PAGE

    assert len(at.dataframe[0].value) == min(n, PER_PAGE)


def test_leakage_outliers_sql_pages(ws, monkeypatch):
    cat = Catalog.open(ws)
    leak = cat.query("""SELECT count(*) FROM (SELECT i.group_id FROM splits s JOIN images i
                        USING (image_id) WHERE s.dataset_id = 'demo-cxr' GROUP BY 1
                        HAVING count(DISTINCT s.split) > 1)""").item()
    at = open_page(ws, "leakage", monkeypatch)
    assert at.selectbox(key="leak-dataset").value == sample.DATASET  # the first dataset
    assert at.metric[0].value == f"{leak:,}"
    assert len(at.dataframe[0].value) == 1  # its row of the leakage table
    at = open_page(ws, "outliers", monkeypatch)
    assert at.metric[0].value == f"{cat.read('outliers').height:,}"
    from medlake.ui.views.outliers import PER_PAGE

    ranked = [c for i in at.image for c in i.captions if c.startswith("#")]
    assert len(ranked) == PER_PAGE  # one page of the ranked gallery
    at = open_page(ws, "sql", monkeypatch)
    at.text_area(key="sql-query").input("SELECT split, count(*) AS n FROM splits GROUP BY 1").run()
    at.button(key="sql-run").click().run()
    assert len(at.dataframe[-1].value) == 3  # the result, below the schema browser's tables
    at.text_area(key="sql-query").input("SELECT * FROM read_csv('/etc/passwd')").run()
    assert at.error and "lake" in at.error[0].value
    at.text_area(key="sql-query").input("DROP VIEW images").run()
    assert at.error and "only read queries" in at.error[0].value


def test_review_page_records_label_verdict(ws, monkeypatch):
    at = open_page(ws, "review", monkeypatch)
    assert at.toggle(key="rev-shown").value is False  # label hidden by default
    at.multiselect(key="rev-classes").set_value(["Effusion"]).run()
    at.number_input(key="rev-n").set_value(5).run()
    assert "0 of 5 sampled labels reviewed by tester" in at.get("progress")[0].proto.text
    at.selectbox(key="rev-rule").set_value("permissive").run()
    at.text_input(key="rev-note").input("rib shadow").run()
    at.button(key="rev-wrong").click().run()
    cat = Catalog.open(ws)
    row = rv.read(cat, where="kind = 'label'").row(-1, named=True)
    assert (row["verdict"], row["rule"], row["note"], row["label_shown"], row["finding"]) == (
        "wrong", "permissive", "rib shadow", False, "Effusion")
    assert "1 of 5 sampled labels reviewed" in at.get("progress")[0].proto.text
    assert at.dataframe[0].value["n_wrong"].sum() >= 1


def test_sample_is_seeded_and_per_class(ws):
    from medlake.ui.views.review import sample as draw

    cat = Catalog.open(ws)
    s1 = draw(cat, sample.SOURCES[0], ["Effusion", "Cardiomegaly"], 4, seed=7)
    s2 = draw(cat, sample.SOURCES[0], ["Effusion", "Cardiomegaly"], 4, seed=7)
    s3 = draw(cat, sample.SOURCES[0], ["Effusion", "Cardiomegaly"], 4, seed=8)
    assert s1.equals(s2) and not s1.equals(s3)
    assert s1.group_by("finding").len()["len"].to_list() == [4, 4]
    assert (s1["value"] > 0).all()


def test_empty_workspace_says_what_to_run(tmp_path, monkeypatch):
    (tmp_path / "empty" / ".dvc").mkdir(parents=True)
    for page, hint in (("catalog", "medlake ingest"), ("duplicates", "medlake duplicates"),
                       ("discrepancies", "medlake agreement"), ("outliers", "medlake outliers"),
                       ("leakage", "medlake leakage"), ("review", "medlake ingest")):
        at = open_page(tmp_path / "empty", page, monkeypatch)
        assert any(hint in i.value for i in at.info), (page, [i.value for i in at.info])


def test_image_paths_cannot_leave_the_workspace(tmp_path):
    root = sample.build(tmp_path / "ws", n_images=6, n_pairs=2, extra_datasets=False).root
    secret = tmp_path / "secret.png"
    secret.write_bytes((root / "data" / "sample" / "img000000.png").read_bytes())
    (root / "data" / "sample" / "link.png").symlink_to(secret)
    cat = Catalog.open(root)
    images = cat.read("images").with_columns(
        pl.when(pl.col("native_id") == "img000001").then(pl.lit("../../../secret.png"))
        .when(pl.col("native_id") == "img000002").then(pl.lit(str(secret)))
        .when(pl.col("native_id") == "img000003").then(pl.lit("link.png"))
        .otherwise(pl.col("path")).alias("path"))
    cat.write("images", images, stage="sample", partition=sample.DATASET)
    assert data.load_image(cat, "demo-cxr:img000000").size == (96, 96)
    for n in ("img000001", "img000002", "img000003"):
        with pytest.raises(data.ImagePathError, match="outside|absolute"):
            data.image_path(cat, f"demo-cxr:{n}")
    ds = cat.read("datasets").with_columns(pl.lit("..").alias("images_root"))
    cat.write("datasets", ds, stage="sample", partition=sample.DATASET)
    with pytest.raises(data.ImagePathError, match="outside"):
        data.image_path(cat, "demo-cxr:img000000")


def test_ui_command_binds_localhost_without_stats():
    from click.testing import CliRunner

    from medlake.cli.commands.ui import streamlit_cmd
    from medlake.cli.main import main

    res = CliRunner().invoke(main, ["ui", "--help"])
    assert res.exit_code == 0 and "127.0.0.1" in res.output
    cmd = streamlit_cmd(Path("ws"), port=9999, host="127.0.0.1")
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--browser.gatherUsageStats") + 1] == "false"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert os.path.basename(cmd[cmd.index("run") + 1]) == "app.py"


def test_version_graph_click_opens_the_version(ws, monkeypatch):
    at = open_page(ws, "catalog", monkeypatch)
    assert at.selectbox(key="version").value == sample.FIXED_VERSION  # sorted: "fixed" first
    at.selectbox(key="version").set_value(sample.ROOT_VERSION).run()
    assert "no DATASHEET.md" in "\n".join(i.value for i in at.info)
    # a click on the child's node (what the browser sends) opens it: datasheet, lineage, diff
    at.session_state["version-graph"] = {"selection": {"version": [
        {"name": sample.FIXED_VERSION}]}}
    at.run()
    assert not at.exception
    assert at.selectbox(key="version").value == sample.FIXED_VERSION
    assert "Parent: demo-cxr@official" in texts(at)
    at.session_state["version-tab"] = "Diff"
    at.run()
    assert at.selectbox(key="diff-other").value == sample.ROOT_VERSION  # diff against parent
    nodes, edges = data.version_graph(data.versions(Catalog.open(ws)))
    assert nodes["n_images"].to_list() == [56, 60]
    assert edges.select("parent", "name").rows() == [(sample.ROOT_VERSION, sample.FIXED_VERSION)]


def _disagree(root: Path, finding: str) -> list[str]:
    ann = Catalog.open(root).read("annotations").filter(pl.col("finding") == finding)
    a = ann.filter(pl.col("source_id") == sample.SOURCES[0]).select("image_id", "value")
    b = ann.filter(pl.col("source_id") == sample.SOURCES[1]).select("image_id", "value")
    return sorted(a.join(b, on="image_id").filter(
        (pl.col("value") > 0) != (pl.col("value_right") > 0))["image_id"].to_list())


def test_heatmap_click_shows_the_cell_and_records_label_verdicts(ws, monkeypatch):
    at = open_page(ws, "discrepancies", monkeypatch)
    pair = f"{sample.SOURCES[0]} vs {sample.SOURCES[1]}"
    at.session_state["disc-heat"] = {"selection": {"cell": [
        {"pair": pair, "finding": "Cardiomegaly"}]}}
    at.run()
    assert not at.exception
    assert at.selectbox(key="disc-finding").value == "Cardiomegaly"
    ids = _disagree(ws, "Cardiomegaly")
    assert f"{len(ids):,} images where the two sources disagree" in texts(at)
    from medlake.ui.views.discrepancies import PER_PAGE

    assert at.dataframe[0].value["image_id"].to_list() == ids[:PER_PAGE]
    at.selectbox(key="disc-judge").set_value(sample.SOURCES[1]).run()
    cat = Catalog.open(ws)
    before = rv.read(cat).height
    at.button(key=f"disc-{ids[0]}-wrong").click().run()
    assert not at.exception
    hist = rv.read(cat)
    assert hist.height == before + 1
    row = hist.row(-1, named=True)
    assert (row["kind"], row["item"], row["verdict"], row["label_shown"]) == (
        "label", f"{ids[0]}|{sample.SOURCES[1]}|Cardiomegaly", "wrong", True)


def test_outlier_image_verdict(ws, monkeypatch):
    at = open_page(ws, "outliers", monkeypatch)
    cat = Catalog.open(ws)
    top = cat.query("SELECT image_id FROM outliers ORDER BY score DESC, image_id LIMIT 1").item()
    at.button(key=f"img-{top}-outlier").click().run()
    assert not at.exception
    row = rv.latest(cat, kind="image").row(-1, named=True)
    assert (row["item"], row["verdict"], row["reviewer"]) == (top, "outlier", "tester")
    caps = [c for i in at.image for c in i.captions]
    assert any(c.startswith(f"#1 {top}") and c.endswith("verdict: outlier") for c in caps), caps


def test_demo_ui_step_prints_a_working_url(tmp_path):
    """The demo's last step (medlake.demo.runner.launch_ui) on a small built workspace."""
    import re
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from medlake.demo.runner import free_port

    root = sample.build(tmp_path / "ws", n_images=6, n_pairs=2, extra_datasets=False).root
    port = free_port(preferred=0)
    code = ("import sys; from catalog import Catalog; from medlake.demo.runner import launch_ui; "
            "sys.exit(launch_ui(Catalog.open(sys.argv[1]), port=int(sys.argv[2])))")
    log = tmp_path / "ui.log"
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            cwd=Path(__file__).resolve().parents[1], start_new_session=True)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"medlake UI for .*: (http://\S+)", log.read_text())
            url = m.group(1) if m else time.sleep(0.2)
        assert url == f"http://127.0.0.1:{port}", log.read_text()[-2000:]
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=10) as r:
            assert (r.status, r.read()) == (200, b"ok")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the group this test started
            proc.wait(20)
    assert proc.returncode is not None


def test_warm_up_renders_every_page_outside_a_session(tmp_path):
    """ui.warm.run_pages in a thread without a session: every page runs, thumbnails land on
    disk, and the pages' queries are cached (a cached answer survives its file's removal)."""
    import threading

    from medlake.ui import cache, warm
    from medlake.ui.views import pages

    root = sample.build(tmp_path / "ws", n_images=30, n_pairs=8).root
    cat = Catalog.open(root)
    result: dict = {}
    th = threading.Thread(target=lambda: result.update(warm.run_pages(str(root), pages())))
    th.start()
    th.join(120)
    assert set(result) == set(pages())
    assert all(isinstance(v, float) for v in result.values()), result
    assert len(list(cache.cache_dir(cat).rglob("*.png"))) >= 12  # thumbnails and blends
    # the outliers page's count query was answered during the warm-up: overwrite the table's
    # files in place with zeros of the same size, keeping their inodes and mtimes (i.e. the
    # lake's signature); a query reading them would fail, the cached answer remains
    n = cat.read("outliers").height
    sql = 'SELECT count(*) AS n FROM "outliers" WHERE true'
    for f in (cat.ws.tables_dir / "outliers").rglob("*.parquet"):
        st_ = f.stat()
        with f.open("r+b") as fh:
            fh.write(bytes(st_.st_size))
        os.utime(f, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    assert data.q(cat, sql)["n"][0] == n
    assert not warm.refresh(cat, pages())  # this process was never primed: no thread started


def test_prime_without_a_server_is_harmless():
    from medlake.ui import warm

    assert warm.prime("http://127.0.0.1:9", timeout_s=5) is False


# --- issue 15: the UI at real scale -------------------------------------------------------------
def _chart_spec(at: AppTest) -> dict:
    """The Vega-Lite spec of the page's (first) chart."""
    import json

    return json.loads(at.get("vega_lite_chart")[0].proto.spec)


def test_discrepancies_dataset_first_and_findings_paged(ws, monkeypatch):
    """At PadChest's ~190 findings the heatmap shows one dataset's pairs and one page of
    findings (the old page drew every dataset's cells in one chart)."""
    from medlake.ui.views.discrepancies import FINDINGS_PER_PAGE

    cat = Catalog.open(ws)
    ag = cat.read("agreement").filter((pl.col("dataset_id") == sample.META)
                                      & pl.col("kappa").is_not_null())
    at = open_page(ws, "discrepancies", monkeypatch)
    at.selectbox(key="disc-dataset").set_value(sample.META).run()
    assert not at.exception
    spec = _chart_spec(at)
    shown = spec["layer"][0]["encoding"]["y"]["sort"]  # the findings on this page, in order
    assert len(shown) == FINDINGS_PER_PAGE
    worst = ag.group_by("finding").agg(pl.col("kappa").min()).sort(["kappa", "finding"])
    assert shown == worst["finding"].head(FINDINGS_PER_PAGE).to_list()  # lowest kappa first
    pairs = spec["layer"][0]["encoding"]["x"]["sort"]  # short names: no dataset prefix
    assert pairs == sorted(["nlp vs model", "physician vs model", "physician vs nlp"])
    n_all = ag["finding"].n_unique()
    assert f"{n_all:,} of {n_all:,} findings of {sample.META}" in texts(at)
    assert f"page 1 of {-(-n_all // FINDINGS_PER_PAGE)}" in texts(at)
    # a minimum number of shared images filters findings; pages follow
    at.number_input(key="disc-min-n").set_value(25).run()
    keep = ag.filter(pl.col("n_shared") >= 25)["finding"].n_unique()
    assert 0 < keep < n_all
    assert f"{keep:,} of {n_all:,} findings" in texts(at)
    at.selectbox(key="disc-order").set_value("name").run()
    at.number_input(key="disc-f-page").set_value(2).run()
    names = sorted(ag.filter(pl.col("n_shared") >= 25)["finding"].unique().to_list())
    assert _chart_spec(at)["layer"][0]["encoding"]["y"]["sort"] == names[25:50]
    # a click on a cell still opens the images the two sources disagree on; the dataset has
    # no image files: one notice with the attach command, no warning per image
    finding = names[25]
    at.session_state["disc-heat"] = {"selection": {"cell": [
        {"pair": f"{sample.META_SOURCES[0]} vs {sample.META_SOURCES[1]}", "finding": finding}]}}
    at.run()
    assert not at.exception
    assert at.selectbox(key="disc-finding").value == finding
    ann = cat.read("annotations").filter(pl.col("finding") == finding)
    a = ann.filter(pl.col("source_id") == sample.META_SOURCES[0]).select("image_id", "value")
    b = ann.filter(pl.col("source_id") == sample.META_SOURCES[1]).select("image_id", "value")
    n = a.join(b, on="image_id").filter(
        (pl.col("value") > 0) != (pl.col("value_right") > 0)).height
    assert f"{n:,} images where the two sources disagree" in texts(at)
    if n:
        notes = [i.value for i in at.info if "attach-images" in i.value]
        assert len(notes) == 1 and f"medlake attach-images {sample.META} FOLDER" in notes[0]
        assert not at.warning


def test_quality_flags_from_the_fingerprint_stage(ws, monkeypatch):
    """The sample's fingerprints come from the real stage; the page reads its `flags` text."""
    cat = Catalog.open(ws)
    fp = cat.read("fingerprints")
    assert (cat.ws.tables_dir / "fingerprints" / "fingerprint").is_dir()  # the stage wrote it
    counts = (fp.filter(pl.col("flags") != "")
              .select(pl.col("flags").str.split(",").explode().alias("flag"))
              .group_by("flag").len())
    expect = dict(counts.iter_rows())
    assert {"dark", "tiny"} <= set(expect)
    at = open_page(ws, "outliers", monkeypatch)
    assert not any("no flag columns" in i.value for i in at.info)
    table = at.dataframe[0].value  # the flag counts (the only table on the page)
    assert dict(zip(table["flag"], table["images"])) == expect
    assert table["images"].sum() >= 2
    at.selectbox(key="flag").set_value("tiny").run()
    tiny = fp.filter(pl.col("flags").str.contains("tiny"))["image_id"].to_list()
    caps = [c for i in at.image for c in i.captions if "tiny" in c and not c.startswith("#")]
    assert sorted(c.split(" · ")[0] for c in caps) == sorted(tiny)


def test_histogram_threshold_line_is_the_params_value(tmp_path, monkeypatch):
    """The red line is drawn at params.yaml duplicates.ncc (through the stage's params)."""
    from medlake.ui.views import duplicates as page

    root = sample.build(tmp_path / "ws", n_images=12, n_pairs=6, extra_datasets=False).root
    (root / "params.yaml").write_text("duplicates:\n  ncc: 0.62\n")
    drawn: list = []
    real = page._histogram_png
    monkeypatch.setattr(page, "_histogram_png",
                        lambda rows, thr: drawn.append(thr) or real(rows, thr))
    at = open_page(root, "duplicates", monkeypatch)
    assert page.duplicates_threshold(Catalog.open(root)) == 0.62
    assert drawn == [0.62]  # a new workspace: the PNG was drawn now, with the line at 0.62
    assert any("duplicates.ncc = 0.62" in c for i in at.image for c in i.captions)


def _splits_of(at: AppTest) -> dict[str, str]:
    """image id -> the split its caption on the duplicates page shows."""
    import re

    out = {}
    for i in at.image:
        for c in i.captions:
            m = re.match(r"(\S+) · group \S+ · split (\S+) ·", c)
            if m:
                out[m.group(1)] = m.group(2)
    return out


def test_duplicates_split_scheme_follows_the_pairs_dataset(ws, monkeypatch):
    """Two datasets with different schemes: chest pairs show their `official` split, not
    `dermamnist`'s '—' (the old default was the first scheme by name)."""
    cat = Catalog.open(ws)
    split = dict(cat.query("SELECT image_id, split FROM splits").iter_rows())
    at = open_page(ws, "duplicates", monkeypatch)
    shown = _splits_of(at)
    assert {i.split(":")[0] for i in shown} == {sample.DATASET, sample.DERM}  # both on page 1
    assert shown == {i: split[i] for i in shown}  # every image's own dataset's split, no '—'
    at.selectbox(key="dup-dataset").set_value(sample.DATASET).run()
    assert at.selectbox(key=f"dup-scheme:{sample.DATASET}").value == "official"
    shown = _splits_of(at)
    assert shown and {i.split(":")[0] for i in shown} == {sample.DATASET}
    assert shown == {i: split[i] for i in shown}
    at.selectbox(key="dup-dataset").set_value(sample.DERM).run()
    assert at.selectbox(key=f"dup-scheme:{sample.DERM}").options == [sample.DERM_SCHEME]
    assert at.selectbox(key=f"dup-scheme:{sample.DERM}").value == sample.DERM_SCHEME
    shown = _splits_of(at)
    assert len(shown) == 6 and shown == {i: split[i] for i in shown}  # its 3 pairs


def test_leakage_on_a_metadata_only_dataset_says_it_once(ws, monkeypatch):
    at = open_page(ws, "leakage", monkeypatch)
    at.selectbox(key="leak-dataset").set_value(sample.META).run()
    assert not at.exception
    assert at.selectbox(key="leak-scheme").value == sample.META_SCHEME
    assert int(at.metric[0].value) > 0  # groups spanning splits, with a gallery below
    notes = [i.value for i in at.info if "attach-images" in i.value]
    assert len(notes) == 1 and f"`medlake attach-images {sample.META} FOLDER`" in notes[0]
    assert not at.warning  # no box per image
    assert any(c.value.endswith("no image file") for c in at.caption)


def test_sql_schema_browser_examples_downloads_and_cap(ws, monkeypatch):
    from medlake.catalog import TABLES, VIEWS
    from medlake.ui.views.sql_page import EXAMPLES

    cat = Catalog.open(ws)
    at = open_page(ws, "sql", monkeypatch)
    tables = at.dataframe[0].value  # the schema browser's tables
    assert set(tables["table"]) == set(TABLES) | set(VIEWS)
    rows = dict(zip(tables["table"], tables["rows"]))
    assert rows["images"] == cat.read("images").height
    assert rows["annotations"] == cat.read("annotations").height
    assert rows["reviews"] == rv.read(cat).height
    at.selectbox(key="sql-schema-table").set_value("fingerprints").run()
    cols = at.dataframe[1].value
    assert dict(zip(cols["column"], cols["type"]))["flags"] == "VARCHAR"
    at.selectbox(key="sql-schema-table").set_value("discrepancies").run()
    assert "label_map" in set(at.dataframe[1].value["column"])
    # every example runs on the sample and returns rows
    for i, title in enumerate(EXAMPLES):
        at.button(key=f"sql-ex-{i}").click().run()
        assert not at.exception and not at.error, (title, [e.value for e in at.error])
        assert at.text_area(key="sql-query").value == EXAMPLES[title][1]
        assert len(at.dataframe[-1].value) > 0, title
    at.button(key="sql-ex-1").click().run()  # leakage: one row per dataset
    assert len(at.dataframe[-1].value) == cat.read("leakage").height
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels == ["Download CSV", "Download Parquet"]
    assert not any("Capped" in w.value for w in at.warning)
    # more rows than the cap: the first cap rows and a visible note
    at.number_input(key="sql-cap").set_value(50).run()
    at.text_area(key="sql-query").input("SELECT image_id FROM images ORDER BY 1").run()
    at.button(key="sql-run").click().run()
    assert len(at.dataframe[-1].value) == 50
    capped = [w.value for w in at.warning if w.value.startswith("Capped")]
    assert len(capped) == 1 and "more than 50 rows" in capped[0]
