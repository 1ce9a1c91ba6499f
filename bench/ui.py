"""Page-open time of the UI in headless Chromium on 100k images / 50k pairs.

Builds a sample workspace (``ui.sample``; real PNGs for the first ``--files`` images), or
uses ``--workspace``, serves it with ``medlake ui`` on a free 127.0.0.1 port (which warms
every page before it prints its URL, see ``ui/warm.py``), opens each page in Debian's
Chromium via Playwright and times navigation until the page is complete: its text shows,
the script run has finished, and every image, chart and table is drawn. ``first`` is the
first open after the server printed its URL (thumbnails on disk deleted beforehand);
``later`` the best of ``--repeat`` further opens (a new visit, as another reviewer would
make it). The server logs each script run's seconds (``MEDLAKE_UI_TIMING``), so server and
browser time can be told apart. The baseline, measured in the same run and browser, is an
empty Streamlit page (one ``st.write``) served the same way: what any page costs before
medlake does anything. ``--unwarmed`` also times first opens on the app started without the
warm-up. The goal is under 2 s per page; this prints figures, it asserts nothing.

    .venv/bin/python bench/ui.py [--images 100000] [--pairs 50000] [--files 2000]
        [--workspace DIR] [--unwarmed] [--record]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, record
from catalog import Catalog
from tests.test_ui_browser import (
    CHROMIUM_ARGS,
    PAGES,
    free_port,
    start_ui,
    stop,
)
from ui import sample

EMPTY_APP = "import streamlit as st\nst.write('empty page')\n"


def start_empty(tmp: Path, port: int) -> subprocess.Popen:
    """An empty Streamlit page on ``port`` (the baseline), started like ``medlake ui``."""
    app = tmp / "empty_app.py"
    app.write_text(EMPTY_APP)
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", "127.0.0.1",
           "--server.port", str(port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    proc = subprocess.Popen(cmd, stdout=(tmp / "empty.log").open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(300):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health",
                                      timeout=1).read() == b"ok":
                return proc
        except OSError:
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError("the empty Streamlit page did not start")


# the page is complete: the script run finished, no element still shows its loading
# skeleton, every image is loaded, every chart and table on screen is drawn (Streamlit loads the chart and table code on first use)
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
COUNT_JS = """() => ({images: document.images.length,
  buttons: document.querySelectorAll("button").length,
  charts: document.querySelectorAll("[data-testid='stVegaLiteChart']").length,
  tables: document.querySelectorAll("[data-testid='stDataFrame']").length})"""


def open_once(page, url: str, text: str) -> float:
    """Seconds from navigation until ``text`` shows and the page is complete (READY_JS)."""
    t = time.perf_counter()
    page.goto(url)
    page.get_by_text(text).first.wait_for(timeout=180_000)
    page.wait_for_function(READY_JS, timeout=180_000, polling=50)
    return time.perf_counter() - t


def open_times(page, url: str, text: str, repeat: int) -> tuple[float, float, dict]:
    """(first open, best of ``repeat`` further opens, element counts) of ``url``."""
    times = [open_once(page, url, text) for _ in range(repeat + 1)]
    return times[0], min(times[1:]), page.evaluate(COUNT_JS)


def server_times(log: Path) -> dict[str, list[float]]:
    """Script-run seconds per page from the server log (``MEDLAKE_UI_TIMING``)."""
    out: dict[str, list[float]] = {}
    for m in re.finditer(r"page (\w+) ran in ([0-9.]+) s", log.read_text()):
        out.setdefault(m[1], []).append(float(m[2]))
    return out


def start_unwarmed(root: Path, port: int, log: Path) -> subprocess.Popen:
    """The app served like ``medlake ui`` but without its warm-up (the same-run "before")."""
    from cli.commands.ui import streamlit_cmd

    env = dict(os.environ, MEDLAKE_WORKSPACE=str(root), MEDLAKE_REVIEWER="bench")
    proc = subprocess.Popen(streamlit_cmd(root, port=port, host="127.0.0.1"), env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    for _ in range(600):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health",
                                      timeout=1).read() == b"ok":
                return proc
        except OSError:
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"the unwarmed server did not start: {log.read_text()[-2000:]}")


def measure(ctx, port: int, repeat: int, only_first: bool = False) -> dict[str, tuple]:
    """Page -> (first open, best later open, element counts) on the server at ``port``."""
    page = ctx.new_page()
    out = {}
    for name, text in PAGES.items():
        url = f"http://127.0.0.1:{port}/?page={name}"
        out[name] = ((open_once(page, url, text), None, {}) if only_first
                     else open_times(page, url, text, repeat))
    page.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--pairs", type=int, default=50_000)
    ap.add_argument("--files", type=int, default=2_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workspace", help="use this built workspace instead of building one")
    ap.add_argument("--unwarmed", action="store_true",
                    help="also time first opens on a server started without the warm-up")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    os.environ["MEDLAKE_UI_TIMING"] = "1"  # the server logs each page run's seconds
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if a.workspace:
            root = Path(a.workspace).resolve()
            cat = Catalog.open(root)
            desc = (f"{cat.query('SELECT count(*) FROM images').item():,} images, "
                    f"{cat.query('SELECT count(*) FROM pairs').item():,} pairs (given)")
        else:
            t = time.perf_counter()
            s = sample.build(tmp / "ws", n_images=a.images, n_pairs=a.pairs, n_files=a.files)
            root = s.root
            desc = (f"{s.counts['images']:,} images, {s.counts['pairs']:,} pairs, "
                    f"{s.n_files:,} files")
            print(f"workspace: {desc}; built in {time.perf_counter() - t:.1f} s")
        eport = free_port()
        empty = start_empty(tmp, eport)
        unwarmed: dict[str, tuple] = {}
        try:
            with sync_playwright() as p:
                ctx = p.chromium.launch_persistent_context(
                    str(tmp / "profile"), executable_path="/usr/bin/chromium",
                    headless=True, args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
                page = ctx.new_page()
                base_first, base, _ = open_times(page, f"http://127.0.0.1:{eport}/",
                                                 "empty page", a.repeat)
                page.close()
                if a.unwarmed:
                    shutil.rmtree(root / "lake" / "cache", ignore_errors=True)
                    port = free_port()
                    proc = start_unwarmed(root, port, tmp / "unwarmed.log")
                    try:
                        unwarmed = measure(ctx, port, a.repeat, only_first=True)
                    finally:
                        stop(proc)
                shutil.rmtree(root / "lake" / "cache", ignore_errors=True)  # cold thumbnails
                port = free_port()
                t = time.perf_counter()
                proc = start_ui(root, port, tmp / "server.log")  # returns once the URL prints
                start_s = time.perf_counter() - t
                try:
                    rows = measure(ctx, port, a.repeat)
                finally:
                    stop(proc)
                ctx.close()
        finally:
            stop(empty)
        server = server_times(tmp / "server.log")
        warmed = re.findall(r"warmed .*", (tmp / "server.log").read_text())
    print(f"medlake ui: {start_s:.1f} s from start until it printed its URL (incl. warm-up); "
          f"{warmed[0] if warmed else 'no warm-up logged'}")
    lines = [(f"| page | first open s | later open s (best of {a.repeat}) | server run s "
              "(first / best later) | images, buttons, charts, tables | first / empty page "
              f"| later / empty page | first open without warm-up s | under 2 s |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for n, (c, w, k) in rows.items():
        srv = server.get(n, [])
        sv = f"{srv[0]:.2f} / {min(srv[1:]):.2f}" if len(srv) > 1 else "—"
        un = f"{unwarmed[n][0]:.2f}" if n in unwarmed else "—"
        lines.append(
            f"| {n} | {c:.2f} | {w:.2f} | {sv} | {k.get('images')}, {k.get('buttons')}, "
            f"{k.get('charts')}, {k.get('tables')} | {c / base_first:.1f} | {w / base:.1f} | "
            f"{un} | {'yes' if max(c, w) < 2 else 'NO'} |")
    table = "\n".join(lines)
    print(f"empty Streamlit page: first open {base_first:.2f} s, later {base:.2f} s")
    print(table)
    if a.record:
        record("UI page-open times (bench/ui.py)",
               f"Workspace: {desc}. Headless Chromium via Playwright, {machine()}, machine shared "
               "with other jobs (timings noisy). An open ends when the page's text shows, its "
               "script run has finished and every image, chart and table is drawn. Baseline, "
               "same run and browser: an empty Streamlit page served the same way (first open "
               f"{base_first:.2f} s, later {base:.2f} s). `medlake ui` took {start_s:.1f} s "
               "from start to printing its URL (warm-up included)."
               + (" \"Without warm-up\": the same app started by `streamlit run` without "
                  "`medlake ui`'s warm-up, empty caches." if unwarmed else "")
               + "\n\n" + table)


if __name__ == "__main__":
    main()
