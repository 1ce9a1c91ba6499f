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
    assert at.table[0].value.shape[0] == 1  # datasets
    assert at.table[1].value.shape[0] == 2  # sources
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
                        USING (image_id) GROUP BY 1 HAVING count(DISTINCT s.split) > 1)""").item()
    at = open_page(ws, "leakage", monkeypatch)
    assert at.metric[0].value == f"{leak:,}"
    assert len(at.dataframe[0].value) == 1
    at = open_page(ws, "outliers", monkeypatch)
    assert at.metric[0].value == "60"
    from medlake.ui.views.outliers import PER_PAGE

    assert len(at.image) == PER_PAGE  # one page of the ranked gallery
    at = open_page(ws, "sql", monkeypatch)
    at.text_area(key="sql-query").input("SELECT split, count(*) AS n FROM splits GROUP BY 1").run()
    at.button(key="sql-run").click().run()
    assert len(at.dataframe[0].value) == 3
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
    root = sample.build(tmp_path / "ws", n_images=6, n_pairs=2).root
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

    root = sample.build(tmp_path / "ws", n_images=6, n_pairs=2).root
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
    # the outliers page's count query was answered during the warm-up: hide the table's file
    # (keeping the folders' mtimes, i.e. the lake's signature) and the cached answer remains
    sql = 'SELECT count(*) AS n FROM "outliers" WHERE true'
    files = list((cat.ws.tables_dir / "outliers").rglob("*.parquet"))
    folders = {d: d.stat().st_mtime_ns for d in {f.parent for f in files}}
    for f in files:
        f.rename(f.with_suffix(".hidden"))
    for d, m in folders.items():
        os.utime(d, ns=(m, m))
    assert data.q(cat, sql)["n"][0] == 30
    assert not warm.refresh(cat, pages())  # this process was never primed: no thread started


def test_prime_without_a_server_is_harmless():
    from medlake.ui import warm

    assert warm.prime("http://127.0.0.1:9", timeout_s=5) is False
