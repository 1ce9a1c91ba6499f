"""Page-open time of the UI in headless Chromium on 100k images / 50k pairs.

Builds a sample workspace (``medlake.demo.ui_sample``; real PNGs for the first ``--files`` images), or
uses ``--workspace``, serves it with ``medlake ui`` on a free 127.0.0.1 port (which warms
every page before it prints its URL, see ``ui/warm.py``), opens each page in Debian's
Chromium via Playwright and times navigation until the page is complete: its text shows,
the script run has finished, no element shows its loading skeleton, and every image, chart
and table on screen is drawn. Three passes, each with the on-disk thumbnails deleted first:
``new browser`` is the first open of each page right after ``medlake ui`` printed its URL,
on an address the browser never visited (Streamlit's scripts download and compile too), and
``later`` the best of ``--repeat`` further opens; ``after restart`` is the first open after
``medlake ui`` was stopped and started again on the same address (the browser has
Streamlit's scripts cached: a reviewer's usual first open); ``--unwarmed`` adds first opens
on the app started by ``streamlit run`` alone (no warm-up, new address). The server logs
each script run's seconds (``MEDLAKE_UI_TIMING``), so server and browser time can be told
apart. The baseline, measured in the same run and browser, is an empty Streamlit page (one
``st.write``) served the same way: what any page costs before medlake does anything. The
goal is under 2 s per page; this prints figures, it asserts nothing.

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
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, record
from medlake.catalog import Catalog
from tests.test_ui_browser import (
    CHROMIUM_ARGS,
    PAGES,
    READY_JS,
    free_port,
    start_ui,
    stop,
)
from medlake.demo import ui_sample as sample

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
    return wait_healthy(proc, port, 300, "the empty Streamlit page did not start")


def wait_healthy(proc: subprocess.Popen, port: int, tries: int, error: str,
                 log: Path | None = None) -> subprocess.Popen:
    """``proc`` once ``/_stcore/health`` on ``port`` answers ``ok``; else, after ``tries``
    polls, stopped and ``error`` raised (with the end of ``log``, when given)."""
    for _ in range(tries):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health",
                                      timeout=1).read() == b"ok":
                return proc
        except OSError:
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"{error}: {log.read_text()[-2000:]}" if log else error)


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
    from medlake.cli.commands.ui import streamlit_cmd

    env = dict(os.environ, MEDLAKE_WORKSPACE=str(root), MEDLAKE_REVIEWER="bench")
    proc = subprocess.Popen(streamlit_cmd(root, port=port, host="127.0.0.1"), env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    return wait_healthy(proc, port, 600, "the unwarmed server did not start", log)


def measure(page, port: int, repeat: int, only_first: bool = False) -> dict[str, tuple]:
    """Page -> (first open, best later open, element counts) on the server at ``port``.

    ``page`` is one browser tab used for every pass (as a reviewer reloads their tab after a
    restart), so no pass pays for starting a new tab's renderer process.
    """
    out = {}
    for name, text in PAGES.items():
        url = f"http://127.0.0.1:{port}/?page={name}"
        out[name] = ((open_once(page, url, text), None, {}) if only_first
                     else open_times(page, url, text, repeat))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--pairs", type=int, default=50_000)
    ap.add_argument("--files", type=int, default=2_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3,
                    help="server starts per kind of first open (the median is reported)")
    ap.add_argument("--workspace", help="use this built workspace instead of building one")
    ap.add_argument("--unwarmed", action="store_true",
                    help="also time first opens on the app started without the warm-up")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    load0 = os.getloadavg()[0]
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
        rows: dict[str, tuple] = {}
        start_s: list[float] = []
        try:
            with sync_playwright() as p:
                ctx = p.chromium.launch_persistent_context(
                    str(tmp / "profile"), executable_path="/usr/bin/chromium",
                    headless=True, args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
                page = ctx.new_page()
                base_first, base, _ = open_times(page, f"http://127.0.0.1:{eport}/",
                                                 "empty page", a.repeat)
                new: list[dict] = []
                restart: list[dict] = []
                for r in range(a.rounds):
                    # a. a browser new to the UI's address: Streamlit's own code loads too
                    port = free_port()
                    shutil.rmtree(root / "lake" / "cache", ignore_errors=True)  # thumbnails
                    t = time.perf_counter()
                    proc = start_ui(root, port, tmp / f"server{r}.log")  # URL printed
                    start_s.append(time.perf_counter() - t)
                    try:
                        m = measure(page, port, a.repeat, only_first=r > 0)
                    finally:
                        stop(proc)
                    new.append(m)
                    rows = rows or m
                    # b. medlake ui restarted on that address: Streamlit's code is cached
                    shutil.rmtree(root / "lake" / "cache", ignore_errors=True)
                    proc = start_ui(root, port, tmp / f"restart{r}.log")
                    try:
                        restart.append(measure(page, port, a.repeat, only_first=True))
                    finally:
                        stop(proc)
                if a.unwarmed:  # c. a server without the warm-up (new address, empty caches)
                    shutil.rmtree(root / "lake" / "cache", ignore_errors=True)
                    uport = free_port()
                    proc = start_unwarmed(root, uport, tmp / "unwarmed.log")
                    try:
                        unwarmed = measure(page, uport, a.repeat, only_first=True)
                    finally:
                        stop(proc)
                ctx.close()
        finally:
            stop(empty)
        server = server_times(tmp / "server0.log")
        warmed = re.findall(r"warmed .*", (tmp / "server0.log").read_text())
    print(f"medlake ui: {median(start_s):.1f} s (median of {len(start_s)}) from start until it "
          f"printed its URL, warm-up included; {warmed[0] if warmed else 'no warm-up logged'}")
    lines = [(f"| page | first open, new browser s (median of {a.rounds}) | first open after "
              f"restart s (median of {a.rounds}) | later open s (best of {a.repeat}) | server "
              "run s (first / best later) | images, buttons, charts, tables | new / empty first "
              "| restart / empty later | later / empty later | new browser, no warm-up s "
              "| under 2 s (restart, later) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, (_, w, k) in rows.items():
        c = median(m[n][0] for m in new)
        r = median(m[n][0] for m in restart)
        srv = server.get(n, [])
        sv = f"{srv[0]:.2f} / {min(srv[1:]):.2f}" if len(srv) > 1 else "—"
        un = f"{unwarmed[n][0]:.2f}" if n in unwarmed else "—"
        lines.append(
            f"| {n} | {c:.2f} | {r:.2f} | {w:.2f} | {sv} | {k.get('images')}, "
            f"{k.get('buttons')}, {k.get('charts')}, {k.get('tables')} | {c / base_first:.1f} "
            f"| {r / base:.1f} | {w / base:.1f} | {un} | "
            f"{'yes' if max(r, w) < 2 else 'NO'} (new browser {'yes' if c < 2 else 'NO'}) |")
    table = "\n".join(lines)
    print(f"empty Streamlit page: first open {base_first:.2f} s, later {base:.2f} s")
    print(table)
    if a.record:
        record("UI page-open times (bench/ui.py)",
               f"Workspace: {desc}. Headless Chromium via Playwright, {machine()}, machine shared "
               "with other jobs (timings noisy). An open ends when the page's text shows, its "
               "script run has finished, no element shows its loading skeleton and every "
               "image, chart and table on screen is drawn. `medlake ui` warms every page "
               f"before printing its URL ({median(start_s):.1f} s here, median). \"New "
               "browser\": first open right after the server printed its URL, on an address "
               "this browser never visited (Streamlit's scripts download and compile too); "
               "\"after restart\": "
               "`medlake ui` restarted on the same address, thumbnails deleted, the browser "
               "has Streamlit's scripts cached (a reviewer's usual first open); \"later\": "
               "best further visit. Baseline, same run and browser: an empty Streamlit page "
               f"(first open {base_first:.2f} s, later {base:.2f} s). Load average "
               f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end."
               + (" \"No warm-up\": the app started by `streamlit run` alone, empty caches, "
                  "new address." if unwarmed else "")
               + "\n\n" + table)


if __name__ == "__main__":
    main()
