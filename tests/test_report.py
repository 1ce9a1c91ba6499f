"""medlake report: a self-contained HTML page and the same sections as Markdown.

A real workspace (the session's synthetic lake, copied, then duplicates, outliers, leakage,
agreement with a reference, a materialised version and review verdicts), the report parsed
with html.parser, and a headless Chromium (Debian's, through Playwright) opening it from a
file:// URL with every non-file request blocked. The screenshot is kept under
``$MEDLAKE_TEST_ARTIFACTS`` (default: the test's tmp folder).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner
from images_helpers import _synth_lake  # noqa: F401  (session fixture synth_lake)
from versions_helpers import build_toy, write_recipe

from medlake.catalog import Catalog, Workspace
from medlake.catalog import reviews as rv
from medlake.cli.main import main
from medlake.pipelines import report
from medlake.pipelines.registry import hints

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PARAMS = """\
# report test: the reference makes PPV and sensitivity
agreement:
  references:
    - {test: "synth-cxr:nlp", reference: "synth-cxr:expert"}
"""
RECIPE = """
dataset: synth-derm
parent: synth-derm@original
description: Synthetic dermoscopy without duplicates or leakage.
labels:
  dx: {source: "synth-derm:clinic", finding: diagnosis}
duplicates: {clusters: true}
rules:
  - fix_leakage: {to: train}
  - duplicates: {mode: keep_one, labels: [dx]}
  - drop_unknown: {labels: [dx]}
export: {images: true, sizes: [16]}
"""


class Page(HTMLParser):
    """Headings (level, text, attrs), img srcs, links, and any resource from a network."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[tuple[int, str, dict[str, str]]] = []
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.external: list[str] = []
        self.scripts = 0
        self._h: tuple[int, dict[str, str]] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if re.fullmatch(r"h[1-6]", tag):
            self._h, self._text = (int(tag[1]), a), []
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "a":
            self.links.append(a.get("href", ""))
        if tag in ("script", "iframe", "object", "embed"):
            self.scripts += 1
        for k in ("src", "href", "srcset", "data", "poster"):  # a link is no request: <a> ok
            v = a.get(k, "")
            if tag != "a" and re.match(r"(https?:)?//", v):
                self.external.append(f"{tag} {k}={v}")

    def handle_data(self, data: str) -> None:
        if self._h is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if self._h is not None and tag == f"h{self._h[0]}":
            self.headings.append((self._h[0], "".join(self._text).strip(), self._h[1]))
            self._h = None


def parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


def md_headings(path: Path) -> list[tuple[int, str]]:
    """Markdown headings outside fenced code blocks."""
    out, fence = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fence = not fence
            continue
        m = None if fence else re.match(r"^(#{1,6}) (.*)$", line)
        if m:
            out.append((len(m.group(1)), m.group(2).strip()))
    return out


@pytest.fixture(scope="module")
def lake(synth_lake: Catalog, tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """A copy of the synthetic lake with every audit stage run, a version and verdicts."""
    from medlake.pipelines import agreement, duplicates, leakage, materialize, outliers

    root = tmp_path_factory.mktemp("report") / "ws"
    shutil.copytree(synth_lake.ws.root, root, symlinks=True)
    cat = Catalog(Workspace(root))
    (root / "params.yaml").write_text(PARAMS)
    duplicates.run(cat)
    outliers.run(cat)
    leakage.run(cat, all_splits=True)
    agreement.run(cat)
    write_recipe(cat, "synth-derm-report", RECIPE)
    materialize.run(cat, "synth-derm-report")
    ann = (cat.read("annotations").filter((pl.col("source_id") == "synth-cxr:nlp")
                                          & (pl.col("value") == 1)).sort("image_id", "finding"))
    verdicts = [rv.label_verdict(r["image_id"], r["source_id"], r["finding"],
                                 ("correct", "wrong", "correct")[i % 3], "ana")
                for i, r in enumerate(ann.head(9).iter_rows(named=True))]
    pair = cat.read("pairs").sort("image_a", "image_b").row(0, named=True)
    verdicts.append(rv.pair_verdict(pair["image_a"], pair["image_b"], "duplicate", "bo"))
    rv.record(cat, verdicts)
    return cat


@pytest.fixture(scope="module")
def built(lake: Catalog, tmp_path_factory: pytest.TempPathFactory) -> report.ReportResult:
    out = tmp_path_factory.mktemp("report-out") / "audit"
    return report.run(lake, out=out)


def test_every_section_for_every_dataset(lake: Catalog, built: report.ReportResult) -> None:
    assert built.datasets == ("synth-cxr", "synth-derm")
    page = parse(built.html)
    assert page.scripts == 0 and page.external == []
    sections = {(h[2].get("data-dataset"), h[2].get("data-section")) for h in page.headings
                if h[0] == 3}
    for ds in built.datasets:
        assert (2, f"Dataset {ds}") in {(h[0], h[1]) for h in page.headings}
        for key, title in report.SECTIONS:
            assert (ds, key) in sections, (ds, key)
            assert any(h[1] == title and h[2].get("id") == report.slug(ds, key)
                       for h in page.headings)
    # in-page links all resolve
    ids = {h[2].get("id") for h in page.headings}
    assert {ln[1:] for ln in page.links if ln.startswith("#")} <= ids
    assert built.missing == ()  # everything was computed in this lake
    text = built.html.read_text(encoding="utf-8")
    # provenance: version, commit (not a git repository here), the params used
    from medlake import __version__

    assert f"<td>{__version__}</td>" in text and "not a git repository" in text
    assert "synth-cxr:expert" in text and "report test: the reference" in text
    # the content the issue asks for
    for part in ("Cohen&#x27;s kappa per source pair and finding",
                 "PPV and sensitivity against the reference",
                 "Hidden stratification: metrics per subgroup", "across all splits",
                 "in every split", "labels conflict", "Quality flags",
                 "Version synth-derm-report", "DATASHEET.md of synth-derm-report",
                 "PPV of positive labels from label verdicts", "kappa [95% CI]",
                 "PPV [95% CI]"):
        assert part in text, part
    assert "croissant.json" in text  # the version folder's Croissant card is named


def test_images_are_embedded_or_beside_the_page(built: report.ReportResult) -> None:
    page = parse(built.html)
    assert len(page.imgs) == built.images + built.figures > 20
    for src in page.imgs:
        if src.startswith("data:"):
            assert re.match(r"data:image/(png|jpeg);base64,[A-Za-z0-9+/=]{100,}$", src)
        else:
            assert not re.match(r"[a-z]+:", src) and (built.out / src).is_file(), src
    # Markdown references files beside it
    md = built.markdown.read_text(encoding="utf-8")
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(refs) == len(page.imgs)
    for ref in refs:
        assert (built.out / ref).is_file(), ref


def test_markdown_has_the_same_headings(built: report.ReportResult) -> None:
    page = parse(built.html)
    assert md_headings(built.markdown) == [(h[0], h[1]) for h in page.headings]


def test_sections_are_ordered_and_sorted(lake: Catalog, built: report.ReportResult) -> None:
    text = built.html.read_text(encoding="utf-8")
    derm = text[text.index('id="synth-derm"'):]
    # label-conflicting clusters come first in the duplicate contact sheets
    clusters = re.findall(r'<h4 id="synth-derm--dup[^"]*">Cluster ([^ ]+) \((\d+) images?'
                          r'(, labels conflict)?\)</h4>', derm)
    assert clusters and clusters[0][2]
    flags = [bool(c[2]) for c in clusters]
    assert flags == sorted(flags, reverse=True)
    # hidden stratification: largest gap first
    cxr = text[text.index('id="synth-cxr"'):text.index('id="synth-derm"')]
    strata = cxr[cxr.index("Hidden stratification"):cxr.index('id="synth-cxr--leakage"')]
    rows = re.findall(r"<tr><td>[^<]*</td><td>[^<]*</td><td>[^<]*</td><td>[^<]*</td>"
                      r'<td class="n">([0-9.]+)</td>', strata)
    gaps = [float(g) for g in rows]
    assert gaps and gaps == sorted(gaps, reverse=True)
    # leakage numbers are the table's
    lk = lake.read("leakage").filter((pl.col("dataset_id") == "synth-derm")
                                     & (pl.col("split_a") == "*")
                                     & (pl.col("grouping") == "group_id")).row(0, named=True)
    assert (f"{lk['n_groups']} of {lk['n_groups_total']} groups ({lk['n_images']} of "
            f"{lk['n_images_total']} images) span splits") in derm


def test_missing_tables_say_what_to_run(catalog: Catalog, tmp_path: Path) -> None:
    build_toy(catalog)
    res = report.run(catalog, out=tmp_path / "r")
    h = hints()
    text = res.html.read_text(encoding="utf-8")
    md = res.markdown.read_text(encoding="utf-8")
    for table in ("agreement", "leakage", "outliers", "fingerprints"):
        line = f"not computed: run {h[table]} (table &#x27;{table}&#x27; is missing)."
        assert line in text, line
        assert f"> not computed: run {h[table]} (table '{table}' is missing)." in md
    assert "not computed: record verdicts in medlake ui" in text
    # toy has clusters but no fingerprints: contact sheets still work (images via the resolver)
    assert "Cluster c2 (2 images, labels conflict)" in text
    assert {m.split(": ")[1] for m in res.missing} >= {"agreement", "leakage", "outliers",
                                                       "quality flags", "reviews"}
    page = parse(res.html)
    assert md_headings(res.markdown) == [(x[0], x[1]) for x in page.headings]
    # a second run replaces its own assets; a foreign assets folder is refused
    report.run(catalog, out=tmp_path / "r")
    (tmp_path / "other" / "assets").mkdir(parents=True)
    from medlake.catalog import CatalogError

    with pytest.raises(CatalogError, match="was not written by medlake report"):
        report.run(catalog, out=tmp_path / "other")


def test_git_commit_of_the_workspace(tmp_path: Path) -> None:
    assert report.git_commit(tmp_path) == "not a git repository"
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=env)
    assert report.git_commit(tmp_path) == "no commit yet"
    (tmp_path / "a.txt").write_text("a")
    subprocess.run(["git", "add", "a.txt"], cwd=tmp_path, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "a"], cwd=tmp_path, check=True, env=env)
    head = report.git_commit(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", head)
    (tmp_path / "a.txt").write_text("b")
    assert report.git_commit(tmp_path) == f"{head} (plus uncommitted changes)"


def test_cli(lake: Catalog, tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["report", "synth-derm", "--out", str(tmp_path / "o"),
                                  "--top", "2", "-w", str(lake.ws.root)])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("report of 1 dataset(s) (synth-derm)")
    page = parse(tmp_path / "o" / "report.html")
    assert {h[2].get("data-dataset") for h in page.headings} == {None, "synth-derm"}
    assert len([h for h in page.headings if h[1].startswith("Cluster ")]) == 2
    r = CliRunner().invoke(main, ["report", "nope", "--out", str(tmp_path / "p"),
                                  "-w", str(lake.ws.root)])
    assert r.exit_code == 1 and "Error: dataset(s) nope not in this workspace" in r.output
    r = CliRunner().invoke(main, ["report", "--help"])
    assert "Example:" in r.output and "medlake report synth-derm synth-cxr --out audit" in r.output


def _chromium() -> str:
    from test_ui_browser import chromium  # one lookup (and skip/fail rule) for both suites

    return chromium()


@pytest.mark.browser
def test_opens_offline_in_chromium(built: report.ReportResult, tmp_path: Path) -> None:
    exe = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    artifacts = Path(os.environ.get("MEDLAKE_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "report.png"
    blocked: list[str] = []
    requested: list[str] = []

    def route(r) -> None:
        url = r.request.url
        if url.startswith(("file:", "data:")):
            r.continue_()
        else:
            blocked.append(url)
            r.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.route("**/*", route)
            page.on("request", lambda req: requested.append(req.url))
            page.goto(built.html.resolve().as_uri(), wait_until="load")
            assert page.title().startswith("medlake report")
            broken = page.evaluate(
                "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                ".map(i => i.alt)")
            assert broken == []
            assert page.evaluate("document.images.length") == built.images + built.figures
            assert page.locator("h3[data-section='agreement']").count() == 2
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert blocked == []
    assert [u for u in requested if not u.startswith(("file:", "data:"))] == []
    assert shot.stat().st_size > 50_000
