"""The UI in a real headless Chromium (Debian's, driven by Playwright), served by ``medlake ui``.

Full-page screenshots of every page are kept as test artifacts: PNGs under the folder named by
``MEDLAKE_TEST_ARTIFACTS`` (default: the test's tmp folder). Without a browser the tests skip
with the reason, except under CI (the ``CI`` variable set), where a missing browser fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from medlake.catalog import Catalog
from medlake.catalog import reviews as rv
from medlake.demo import ui_sample as sample

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PAGES = {  # page -> text that shows the page rendered its table
    "catalog": "Datasets (3)", "duplicates": "Similarity scores",
    "discrepancies": "images where the two sources disagree", "leakage": "groups spanning splits",
    "outliers": "Outliers, most unusual first", "review": "sampled labels reviewed",
    "sql": "Read-only DuckDB SQL",
}


def chromium() -> str:
    exe = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                       else None)
    if exe is None:
        msg = ("no system Chromium: run `make browser` (apt-get install -y chromium); "
               "medlake never downloads a browser")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


# the page is complete: the script run finished, no element still shows its loading
# skeleton, every image is loaded, every chart and table on screen is drawn (Streamlit
# loads the chart and table code on first use)
READY_JS = """() => {
  const app = document.querySelector("[data-testid='stApp']");
  if (!app || app.getAttribute("data-test-script-state") !== "notRunning") return false;
  if (document.querySelector("[data-testid='stSkeleton']")) return false;  // not drawn yet
  for (const im of document.images) if (!im.complete) return false;
  const shown = (sel) => [...document.querySelectorAll(sel)].filter(
    (e) => e.getClientRects().length > 0);  // charts and tables in hidden tabs draw later
  for (const c of shown("[data-testid='stVegaLiteChart']"))
    if (!c.querySelector("canvas, svg")) return false;
  for (const d of shown("[data-testid='stDataFrame']"))
    if (!d.querySelector("canvas")) return false;
  return true;
}"""


def artifacts_dir(tmp_path: Path) -> Path:
    """Where screenshots go: ``MEDLAKE_TEST_ARTIFACTS`` if set, else ``tmp_path``."""
    d = Path(os.environ.get("MEDLAKE_TEST_ARTIFACTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def snap(page, path: Path) -> Path:
    """A screenshot of the whole page: Streamlit scrolls inside its main container, so the
    viewport is made as tall as that container's content for the shot."""
    page.wait_for_function(READY_JS, timeout=60_000, polling=100)
    size = page.viewport_size
    height = page.evaluate("() => (document.querySelector('[data-testid=stMain]') "
                           "|| document.body).scrollHeight")
    page.set_viewport_size({"width": size["width"], "height": min(max(height, size["height"]),
                                                                  12_000)})
    try:
        page.wait_for_timeout(300)  # the resize reflows charts and images
        page.wait_for_function(READY_JS, timeout=60_000, polling=100)
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.set_viewport_size(size)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(root: Path, port: int, log: Path) -> subprocess.Popen:
    medlake = Path(sys.executable).parent / "medlake"
    env = dict(os.environ, MEDLAKE_REVIEWER="browser", STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    proc = subprocess.Popen([str(medlake), "ui", str(root), "--port", str(port)], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/_stcore/health"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"medlake ui exited: {log.read_text()[-2000:]}")
        try:
            healthy = urllib.request.urlopen(url, timeout=1).read() == b"ok"
        except OSError:
            healthy = False
        # medlake ui prints its URL once the server answers and every page was warmed
        if healthy and "medlake UI for" in log.read_text():
            return proc
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"medlake ui did not answer on {url}: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server by its process group id (the group this test started)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Path, Path]]:
    exe = chromium()
    tmp = tmp_path_factory.mktemp("browser")
    root = sample.build(tmp / "ws", n_images=60, n_pairs=20).root
    port = free_port()
    proc = start_ui(root, port, tmp / "server.log")
    try:
        yield f"http://127.0.0.1:{port}", root, Path(exe)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    _, _, exe = server
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile), executable_path=str(exe), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        try:
            yield ctx
        finally:
            ctx.close()


def test_server_binds_localhost_only(server):
    url, _, _ = server
    port = int(url.rsplit(":", 1)[1])
    addrs = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None)} - {"127.0.0.1"}
    for addr in addrs:
        if ":" in addr:
            continue
        with socket.socket() as s:
            s.settimeout(1)
            assert s.connect_ex((addr, port)) != 0, f"UI reachable on {addr}"



def test_server_start_warms_every_page(server):
    """medlake ui printed its URL only after every page ran once in the server."""
    import re

    from medlake.ui import cache

    _, root, _ = server
    log = (root.parent / "server.log").read_text()
    assert log.index("warmed ") < log.index("medlake UI for")
    timings = re.search(r"warmed .*?: (\{.*\})", log)
    assert timings, log[-2000:]
    per_page = dict(re.findall(r"'(\w+)': ([0-9.]+)", timings.group(1)))
    assert set(per_page) == set(PAGES), timings.group(1)  # a failed page logs its error text
    assert list(cache.cache_dir(Catalog.open(root)).rglob("*.png"))  # thumbnails rendered


@pytest.fixture
def artifacts(tmp_path) -> Path:
    return artifacts_dir(tmp_path)


@pytest.mark.parametrize("page_name", list(PAGES))
def test_every_page_renders(server, browser, artifacts, page_name):
    url, _, _ = server
    page = browser.new_page()
    try:
        page.goto(f"{url}/?page={page_name}")
        page.get_by_text(PAGES[page_name]).first.wait_for(timeout=60_000)
        page.wait_for_load_state("networkidle")
        assert page.locator("[data-testid='stException']").count() == 0
        shot = snap(page, artifacts / f"{page_name}.png")
        assert shot.stat().st_size > 10_000
    finally:
        page.close()


def test_verdict_click_writes_a_review_row(server, browser, artifacts):
    url, root, _ = server
    cat = Catalog.open(root)
    before = rv.read(cat).height
    page = browser.new_page()
    try:
        page.goto(f"{url}/?page=duplicates")
        # click once the first run has drawn the pairs (a click during the first run can be
        # lost when that run's widgets are replaced); the name exactly, not "Not duplicate"
        page.get_by_text("#1 score").first.wait_for(timeout=120_000)
        page.wait_for_load_state("networkidle")
        page.get_by_role("button", name="Duplicate", exact=True).first.click(timeout=60_000)
        page.get_by_text("recorded: duplicate").first.wait_for(timeout=120_000)
        snap(page, artifacts / "verdict.png")
    finally:
        page.close()
    df = rv.read(cat)
    assert df.height == before + 1
    row = df.row(-1, named=True)
    assert (row["kind"], row["verdict"], row["reviewer"]) == ("pair", "duplicate", "browser")
    # a browser refresh shows the stored verdict
    page = browser.new_page()
    try:
        page.goto(f"{url}/?page=duplicates")
        page.get_by_text("verdict so far: duplicate").first.wait_for(timeout=60_000)
    finally:
        page.close()


def _click_mark(page, chart_index: int, label_part: str) -> None:
    """Click a Vega mark of a chart, near its corner (clear of any text drawn on top)."""
    chart = page.locator("[data-testid='stVegaLiteChart']").nth(chart_index)
    mark = chart.locator(f"path[role='graphics-symbol'][aria-label*='{label_part}']").first
    mark.wait_for(timeout=60_000)
    box = mark.bounding_box()
    assert box is not None and box["width"] > 4 and box["height"] > 4, box
    mark.click(position={"x": min(6, box["width"] / 4), "y": min(6, box["height"] / 4)})


def test_clicking_the_version_graph_opens_the_version(server, browser, artifacts):
    url, _, _ = server
    page = browser.new_page()
    try:
        page.goto(f"{url}/?page=catalog")
        page.get_by_text("Parent: demo-cxr@official").first.wait_for(timeout=60_000)
        _click_mark(page, 0, f"name: {sample.ROOT_VERSION}")
        page.get_by_text(f"no DATASHEET.md for {sample.ROOT_VERSION}").first.wait_for(
            timeout=60_000)
        snap(page, artifacts / "catalog-graph-click.png")
    finally:
        page.close()


def test_clicking_a_heatmap_cell_shows_its_disagreements(server, browser, artifacts):
    import polars as pl

    url, root, _ = server
    ann = Catalog.open(root).read("annotations").filter(pl.col("finding") == "Pneumothorax")
    a = ann.filter(pl.col("source_id") == sample.SOURCES[0]).select("image_id", "value")
    b = ann.filter(pl.col("source_id") == sample.SOURCES[1]).select("image_id", "value")
    n = a.join(b, on="image_id").filter((pl.col("value") > 0) != (pl.col("value_right") > 0)).height
    page = browser.new_page()
    try:
        page.goto(f"{url}/?page=discrepancies")
        page.get_by_text("kappa 0.500 on 60 shared images").first.wait_for(timeout=60_000)
        _click_mark(page, 0, "finding: Pneumothorax")  # kappa 0.7 in the sample
        page.get_by_text("kappa 0.700 on 60 shared images").first.wait_for(timeout=60_000)
        page.get_by_text(f"{n:,} images where the two sources disagree").first.wait_for(
            timeout=60_000)
        snap(page, artifacts / "heatmap-click.png")
    finally:
        page.close()


# boxes of a Vega chart's axis labels and cell texts (Streamlit draws Vega as SVG: DOM nodes)
_BOXES_JS = """(chart) => {
  const svg = chart.querySelector('svg');
  const box = (t) => { const r = t.getBoundingClientRect();
    return {text: t.textContent, x: r.left, y: r.top, w: r.width, h: r.height,
            size: parseFloat(getComputedStyle(t).fontSize)}; };
  const axes = [...svg.querySelectorAll('.role-axis')].map(a => ({
    name: a.getAttribute('aria-label') || '',
    labels: [...a.querySelectorAll('.role-axis-label text')].map(box)}));
  const cells = [...svg.querySelectorAll('.mark-text.role-mark text')].map(box);
  return {axes, cells};
}"""


def _overlaps(boxes: list[dict], gap: float = 0.5) -> list[tuple[str, str]]:
    """Pairs of text boxes that overlap by more than ``gap`` pixels both ways."""
    out = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            dx = min(a["x"] + a["w"], b["x"] + b["w"]) - max(a["x"], b["x"])
            dy = min(a["y"] + a["h"], b["y"] + b["h"]) - max(a["y"], b["y"])
            if dx > gap and dy > gap:
                out.append((a["text"], b["text"]))
    return out


def test_heatmap_labels_are_legible_at_padchest_size(server, browser, artifacts):
    """A dataset with ~190 findings: the heatmap shows that dataset's pairs and one page of
    findings; no axis label overlaps another, and no cell number overlaps another."""
    from medlake.ui.views.discrepancies import FINDINGS_PER_PAGE

    url, _, _ = server
    page = browser.new_page()
    try:
        page.goto(f"{url}/?page=discrepancies&dataset={sample.META}")
        chart = page.locator("[data-testid='stVegaLiteChart']").first
        chart.locator(".role-axis-label text").first.wait_for(timeout=60_000)
        page.wait_for_load_state("networkidle")
        got = chart.evaluate(_BOXES_JS)
        snap(page, artifacts / "discrepancies-padchest-size.png")
    finally:
        page.close()
    x = next(a for a in got["axes"] if a["name"].startswith("X-axis"))
    y = next(a for a in got["axes"] if a["name"].startswith("Y-axis"))
    assert sorted(t["text"] for t in x["labels"]) == [
        "nlp vs model", "physician vs model", "physician vs nlp"]  # no dataset prefix
    assert len(y["labels"]) == FINDINGS_PER_PAGE
    assert {t["text"] for t in y["labels"]} <= set(sample.META_FINDINGS)  # whole names
    labels = x["labels"] + y["labels"]
    assert all(t["size"] >= 10 and t["w"] > 0 and t["h"] > 0 for t in labels), labels
    assert _overlaps(labels) == []
    assert len(got["cells"]) == 3 * FINDINGS_PER_PAGE
    assert _overlaps(got["cells"]) == []


def test_metadata_only_dataset_shows_one_notice(server, browser, artifacts):
    """Leakage on a dataset without image files: one notice with the attach command."""
    url, _, _ = server
    page = browser.new_page()
    try:
        page.goto(f"{url}/?page=leakage&dataset={sample.META}")
        page.get_by_text("groups spanning splits").first.wait_for(timeout=60_000)
        page.get_by_text("no image file").first.wait_for(timeout=60_000)  # the gallery
        page.wait_for_load_state("networkidle")
        alerts = page.locator("[data-testid='stAlert']")
        assert alerts.count() == 1
        assert f"medlake attach-images {sample.META} FOLDER" in alerts.first.inner_text()
        snap(page, artifacts / "leakage-metadata-only.png")
    finally:
        page.close()
