"""Page-open time of the UI in headless Chromium on 100k images / 50k pairs.

Builds a sample workspace (``ui.sample``; real PNGs for the first ``--files`` images), serves
it with ``medlake ui`` on a free 127.0.0.1 port, opens each page in Debian's Chromium via
Playwright and times navigation until the page's content is shown. The baseline, measured
in the same run, is the naive approach the pages avoid: reading the whole ``pairs`` and
``images`` tables into memory (what an unpaginated page would do before drawing anything).
The goal is under 2 s per page; this prints figures, it asserts nothing.

    .venv/bin/python bench/ui.py [--images 100000] [--pairs 50000] [--files 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catalog import Catalog
from tests.test_ui_browser import (
    CHROMIUM_ARGS,
    PAGES,
    free_port,
    start_ui,
    stop,
)
from ui import sample


def baseline(cat: Catalog) -> float:
    """Seconds to load pairs and images whole and join them in Polars (no paging)."""
    t = time.perf_counter()
    pairs, images = cat.read("pairs"), cat.read("images")
    pairs.join(images, left_on="image_a", right_on="image_id").join(
        images, left_on="image_b", right_on="image_id")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--pairs", type=int, default=50_000)
    ap.add_argument("--files", type=int, default=2_000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        s = sample.build(Path(tmp) / "ws", n_images=a.images, n_pairs=a.pairs, n_files=a.files)
        print(f"workspace: {s.counts['images']:,} images, {s.counts['pairs']:,} pairs, "
              f"{s.n_files:,} files; built in {time.perf_counter() - t:.1f} s")
        cat = Catalog.open(s.root)
        base = min(baseline(cat) for _ in range(a.repeat))
        port = free_port()
        proc = start_ui(s.root, port, Path(tmp) / "server.log")
        try:
            with sync_playwright() as p:
                ctx = p.chromium.launch_persistent_context(
                    str(Path(tmp) / "profile"), executable_path="/usr/bin/chromium",
                    headless=True, args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
                page = ctx.new_page()
                print(f"{'page':<15}{f'medlake s (best of {a.repeat})':>24}"
                      f"{'baseline s':>12}{'ratio':>8}")
                for name, text in PAGES.items():
                    times = []
                    for _ in range(a.repeat + 1):  # the first open warms caches; not counted
                        t = time.perf_counter()
                        page.goto(f"http://127.0.0.1:{port}/?page={name}")
                        page.get_by_text(text).first.wait_for(timeout=120_000)
                        page.wait_for_load_state("networkidle")
                        times.append(time.perf_counter() - t)
                    best = min(times[1:])
                    print(f"{name:<15}{best:>24.2f}{base:>12.2f}{best / base:>8.2f}")
                ctx.close()
        finally:
            stop(proc)
    print("goal: every page under 2 s; baseline = loading pairs + images whole (no paging)")


if __name__ == "__main__":
    main()
