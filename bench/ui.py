"""Page-open time of the UI in headless Chromium on 100k images / 50k pairs.

Builds a sample workspace (``ui.sample``; real PNGs for the first ``--files`` images), or
uses ``--workspace``, serves it with ``medlake ui`` on a free 127.0.0.1 port, opens each page
in Debian's Chromium via Playwright and times navigation until the page's content is shown
and the network is idle. ``cold`` is the first open after the server started (empty caches:
DuckDB connection, query results, thumbnails on disk); ``warm`` the best of ``--repeat``
later opens (a new visit to the page, as another reviewer would make it). The baseline,
measured in the same run and browser, is the open time of an empty Streamlit page (one
``st.write``) served the same way: what any page costs before medlake does anything.
The goal is under 2 s per page; this prints figures, it asserts nothing.

    .venv/bin/python bench/ui.py [--images 100000] [--pairs 50000] [--files 2000] [--record]
"""

from __future__ import annotations

import argparse
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


def open_times(page, url: str, text: str, repeat: int) -> tuple[float, float]:
    """(first open, best of ``repeat`` further opens) of ``url`` until ``text`` shows."""
    times = []
    for _ in range(repeat + 1):
        t = time.perf_counter()
        page.goto(url)
        page.get_by_text(text).first.wait_for(timeout=180_000)
        page.wait_for_load_state("networkidle")
        times.append(time.perf_counter() - t)
    return times[0], min(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--pairs", type=int, default=50_000)
    ap.add_argument("--files", type=int, default=2_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workspace", help="use this built workspace instead of building one")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if a.workspace:
            root = Path(a.workspace).resolve()
            cat = Catalog.open(root)
            shutil.rmtree(root / "lake" / "cache", ignore_errors=True)  # cold thumbnails
            desc = (f"{cat.query('SELECT count(*) FROM images').item():,} images, "
                    f"{cat.query('SELECT count(*) FROM pairs').item():,} pairs (given)")
        else:
            t = time.perf_counter()
            s = sample.build(tmp / "ws", n_images=a.images, n_pairs=a.pairs, n_files=a.files)
            root = s.root
            desc = (f"{s.counts['images']:,} images, {s.counts['pairs']:,} pairs, "
                    f"{s.n_files:,} files")
            print(f"workspace: {desc}; built in {time.perf_counter() - t:.1f} s")
        port, eport = free_port(), free_port()
        proc = start_ui(root, port, tmp / "server.log")
        empty = start_empty(tmp, eport)
        rows = []
        try:
            with sync_playwright() as p:
                ctx = p.chromium.launch_persistent_context(
                    str(tmp / "profile"), executable_path="/usr/bin/chromium",
                    headless=True, args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
                page = ctx.new_page()
                _, base = open_times(page, f"http://127.0.0.1:{eport}/", "empty page", a.repeat)
                for name, text in PAGES.items():
                    cold, warm = open_times(page, f"http://127.0.0.1:{port}/?page={name}", text,
                                            a.repeat)
                    rows.append((name, cold, warm))
                ctx.close()
        finally:
            stop(proc)
            stop(empty)
    lines = [(f"| page | cold s (first open) | warm s (best of {a.repeat}) | empty page s "
             "| warm / empty | under 2 s |"), "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {c:.2f} | {w:.2f} | {base:.2f} | {w / base:.1f} | "
              f"{'yes' if w < 2 else 'NO'} (cold {'yes' if c < 2 else 'NO'}) |"
              for n, c, w in rows]
    table = "\n".join(lines)
    print(table)
    if a.record:
        record("UI page-open times (bench/ui.py)",
               f"Workspace: {desc}. Headless Chromium via Playwright, {machine()}, machine shared "
               "with other jobs (timings noisy). Baseline: an empty Streamlit page served and "
               "opened the same way in the same run.\n\n" + table)


if __name__ == "__main__":
    main()
