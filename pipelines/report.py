"""``medlake report``: the workspace's audit as one self-contained HTML page and as Markdown.

:func:`run` writes ``DIR/report.html`` (images and charts embedded as ``data:`` URIs, CSS
inline, no script and no network: it opens offline from a USB stick) and ``DIR/report.md``
(the same sections and headings; charts and thumbnails as files under ``DIR/assets/``). Per
dataset (:data:`SECTIONS`):

- **Profile**: images, groups, studies and studies per group, images per group, splits and
  quarantine (:func:`medlake.catalog.profile.profile`);
- **Sources and coverage**: each label source, the images it covers, overlaps, prevalence;
- **Label agreement**: a Cohen's kappa heatmap (source pairs x findings with enough shared
  images, sorted) with the 95% intervals in a table, PPV and sensitivity with Wilson
  intervals as a dot-and-whisker plot, and a hidden-stratification table (the metric per
  subgroup, largest gaps first);
- **Leakage**: groups, images and pairs spanning each split pair and all splits;
- **Duplicate clusters**: contact sheets, label-conflicting and largest clusters first;
- **Outliers and quality flags**: the most outlying images and each ``fingerprints.flags``
  flag as contact sheets with counts;
- **Versions**: every version with its lineage summary and datasheet;
- **Reviews**: review progress and PPV per finding from label verdicts.

A section whose table was never computed says so in one line with the command to run
(:func:`medlake.pipelines.registry.hints`). The page states the medlake version, the
workspace's git commit and ``params.yaml``. Image files are read only through
:func:`medlake.catalog.paths.image_file`.

Example
-------
>>> from medlake.pipelines import report
>>> print(report.run(cat, out="audit").summary())  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from medlake.catalog import Catalog, CatalogError, __version__

#: ``(key, title)`` of the sections every dataset gets, in page order.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("profile", "Profile"),
    ("sources", "Sources and coverage"),
    ("agreement", "Label agreement"),
    ("leakage", "Leakage"),
    ("duplicates", "Duplicate clusters"),
    ("quality", "Outliers and quality flags"),
    ("versions", "Versions"),
    ("reviews", "Reviews"),
)
ASSETS = "assets"
MARKER = ".medlake-report"  # marks an assets folder this module wrote (safe to replace)
THUMB = 112  # thumbnail side, pixels
DASH = "–"
REVIEWS_HINT = "record verdicts in medlake ui (Duplicates, Discrepancies and Outliers pages)"
RATER_KINDS = ("pair", "annotators")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1d2330;
background:#fafbfc}
main{max-width:1180px;margin:0 auto;padding:16px 28px 60px}
h1{font-size:26px;margin:18px 0 6px}h2{font-size:21px;margin:34px 0 8px;padding-top:10px;
border-top:3px solid #2c5d8a}h3{font-size:17px;margin:24px 0 6px;color:#2c5d8a}
h4{font-size:15px;margin:16px 0 4px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:12.5px;background:#fff}
th,td{border:1px solid #d7dce3;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#eef2f7}td.n{text-align:right;font-variant-numeric:tabular-nums}
p.missing{color:#8a5300;background:#fff6e5;border-left:4px solid #e0a030;padding:4px 9px}
p.note{color:#555;font-size:12.5px}
figure{margin:8px 0 14px}figure img{max-width:100%;border:1px solid #d7dce3;background:#fff}
figcaption{font-size:12px;color:#555}
.sheet{display:flex;flex-wrap:wrap;gap:8px;margin:4px 0 14px}
.sheet figure{margin:0;width:118px}.sheet img{width:112px;height:112px;object-fit:contain;
background:#222}.sheet .none{width:112px;height:112px;background:#eee;color:#777;font-size:11px;
display:flex;align-items:center;justify-content:center;text-align:center}
.sheet figcaption{font-size:10.5px;word-break:break-all}
pre{background:#f3f5f8;border:1px solid #d7dce3;padding:8px;overflow:auto;font-size:12px}
details{margin:6px 0 12px}summary{cursor:pointer;color:#2c5d8a}
nav ul{margin:4px 0;padding-left:20px}nav li{margin:1px 0}
.datasheet{background:#fff;border:1px solid #d7dce3;padding:2px 14px}
"""


# --------------------------------------------------------------------------------------------
# result


@dataclass(frozen=True)
class ReportResult:
    """What :func:`run` wrote.

    Attributes
    ----------
    out
        The output folder.
    html, markdown
        ``report.html`` and ``report.md`` in ``out``.
    datasets
        The datasets reported, in page order.
    missing
        ``"<dataset>: <section>: <why>"`` for each part that was not computed.
    images
        Thumbnails shown (image files read).
    figures
        Charts drawn.
    """

    out: Path
    html: Path
    markdown: Path
    datasets: tuple[str, ...]
    missing: tuple[str, ...] = ()
    images: int = 0
    figures: int = 0

    def summary(self) -> str:
        """A few lines for the terminal."""
        size = self.html.stat().st_size if self.html.exists() else 0
        lines = [(f"report of {len(self.datasets)} dataset(s) ({', '.join(self.datasets)}): "
                  f"{self.html} ({size / 1e6:.1f} MB, self-contained), {self.markdown}; "
                  f"{self.figures} charts, {self.images} thumbnails")]
        if self.missing:
            lines.append(f"not computed ({len(self.missing)}):")
            lines += [f"  {m}" for m in self.missing[:20]]
            if len(self.missing) > 20:
                lines.append(f"  ... and {len(self.missing) - 20} more (see the report)")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the document: every call writes the same content as HTML and as Markdown


def _esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _md_cell(x: Any) -> str:
    return ("" if x is None else str(x)).replace("|", "\\|").replace("\n", " ")


def slug(*parts: str) -> str:
    """An HTML id from its parts (``synth-cxr``, ``profile`` -> ``synth-cxr--profile``)."""
    return "--".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", p).strip("-").lower() for p in parts)


def _fmt(v: Any) -> str:
    if v is None:
        return DASH
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return DASH
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if v and abs(v) < 1e-3:
            return f"{v:.2g}"
        return f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v)


def _cis(df: pl.DataFrame, col: str) -> list[str]:
    """``col [col_lo, col_hi]`` per row of ``df``."""
    return [_ci(*v) for v in zip(df[col], df[f"{col}_lo"], df[f"{col}_hi"])]


def _at(r: dict[str, Any], metric: str) -> str:
    """``female: 0.44 (n=10)``: one subgroup's metric."""
    return f"{r['subgroup_value']}: {r[metric]:.2f} (n={r['n_shared']})"


def _n(n: int, word: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _ci(p: Any, lo: Any, hi: Any, digits: int = 2) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return DASH
    s = f"{p:.{digits}f}"
    if lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi)):
        s += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return s


@dataclass
class Thumb:
    """One contact-sheet tile: a JPEG thumbnail (or None: why in ``note``) and a caption."""

    image_id: str
    caption: str
    data: bytes | None = None
    note: str = ""


@dataclass
class _Doc:
    out: Path
    html: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)
    figures: int = 0
    images: int = 0
    _names: set[str] = field(default_factory=set)

    @property
    def assets(self) -> Path:
        return self.out / ASSETS

    def heading(self, level: int, text: str, anchor: str, **data: str) -> None:
        attrs = "".join(f' data-{k}="{_esc(v)}"' for k, v in data.items())
        self.html.append(f'<h{level} id="{_esc(anchor)}"{attrs}>{_esc(text)}</h{level}>')
        self.md.append(f"{'#' * level} {text}\n")

    def para(self, text: str, cls: str | None = None) -> None:
        c = f' class="{cls}"' if cls else ""
        self.html.append(f"<p{c}>{_esc(text)}</p>")
        self.md.append(("> " if cls == "missing" else "") + text.replace("\n", " ") + "\n")

    def missing(self, text: str) -> None:
        self.para(text, "missing")

    def table(self, df: pl.DataFrame, *, max_rows: int = 40, numeric: Sequence[str] = ()) -> None:
        """A frame as a table; cells formatted with :func:`_fmt`; at most ``max_rows`` rows."""
        if not df.height:
            self.para("(no rows)", "note")
            return
        cols = df.columns
        num = set(numeric) | {c for c, t in zip(cols, df.dtypes) if t.is_numeric()}
        rows = df.head(max_rows).rows()
        head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
        h = [f"<table><thead><tr>{head}</tr></thead><tbody>"]
        for r in rows:
            h.append("<tr>" + "".join(
                f'<td class="n">{_esc(_fmt(v))}</td>' if c in num else f"<td>{_esc(_fmt(v))}</td>"
                for c, v in zip(cols, r)) + "</tr>")
        h.append("</tbody></table>")
        self.html.append("".join(h))
        md = ["| " + " | ".join(_md_cell(c) for c in cols) + " |",
              "|" + "|".join("---:" if c in num else "---" for c in cols) + "|"]
        md += ["| " + " | ".join(_md_cell(_fmt(v)) for v in r) + " |" for r in rows]
        self.md.append("\n".join(md) + "\n")
        if df.height > max_rows:
            self.para(f"... {df.height - max_rows:,} more rows (query them with medlake sql).",
                      "note")

    def _asset(self, stem: str, data: bytes, ext: str) -> str:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-")[:80] or "x"
        base, k = name, 1
        while f"{name}.{ext}" in self._names:
            k += 1
            name = f"{base}-{k}"
        self._names.add(f"{name}.{ext}")
        rel = f"{ASSETS}/{name}.{ext}"
        (self.out / rel).write_bytes(data)
        return rel

    def figure(self, png: bytes, stem: str, alt: str, caption: str | None = None) -> None:
        rel = self._asset(stem, png, "png")
        uri = "data:image/png;base64," + base64.b64encode(png).decode()
        cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
        self.html.append(f'<figure><img src="{uri}" alt="{_esc(alt)}">{cap}</figure>')
        self.md.append(f"![{_md_cell(alt)}]({rel})\n" + (f"\n*{caption}*\n" if caption else ""))
        self.figures += 1

    def sheet(self, thumbs: Sequence[Thumb], stem: str, per_row: int = 6) -> None:
        """A contact sheet: a grid of thumbnails with captions."""
        if not thumbs:
            return
        tiles, cells = [], []
        for i, t in enumerate(thumbs):
            if t.data is not None:
                rel = self._asset(f"{stem}-{i}", t.data, "jpg")
                uri = "data:image/jpeg;base64," + base64.b64encode(t.data).decode()
                tiles.append(f'<figure><img src="{uri}" alt="{_esc(t.image_id)}" '
                             f'title="{_esc(t.image_id)}"><figcaption>{_esc(t.caption)}'
                             "</figcaption></figure>")
                cells.append(f"![{_md_cell(t.image_id)}]({rel})<br>{_md_cell(t.caption)}")
                self.images += 1
            else:
                tiles.append(f'<figure><div class="none">{_esc(t.note or "no image file")}</div>'
                             f"<figcaption>{_esc(t.caption)}</figcaption></figure>")
                cells.append(f"({_md_cell(t.note or 'no image file')})<br>{_md_cell(t.caption)}")
        self.html.append('<div class="sheet">' + "".join(tiles) + "</div>")
        n = min(per_row, len(cells))
        md = ["| " + " | ".join([" "] * n) + " |", "|" + "|".join(["---"] * n) + "|"]
        for k in range(0, len(cells), n):
            row = cells[k:k + n] + [" "] * (n - len(cells[k:k + n]))
            md.append("| " + " | ".join(row) + " |")
        self.md.append("\n".join(md) + "\n")

    def pre(self, text: str, lang: str = "") -> None:
        self.html.append(f"<pre>{_esc(text)}</pre>")
        fence = "````" if "```" in text else "```"
        self.md.append(f"{fence}{lang}\n{text.rstrip()}\n{fence}\n")

    def details(self, summary: str, html_body: str, md_body: str, *, open_: bool = False) -> None:
        o = " open" if open_ else ""
        self.html.append(f"<details{o}><summary>{_esc(summary)}</summary>{html_body}</details>")
        self.md.append(f"<details><summary>{_esc(summary)}</summary>\n\n{md_body.rstrip()}\n\n"
                       "</details>\n")


# --------------------------------------------------------------------------------------------
# charts (matplotlib, Agg canvas; no global backend change)


def _figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, metadata={"Software": None})
    return buf.getvalue()


def kappa_heatmap(mat: Sequence[Sequence[float | None]], rows: Sequence[str],
                  cols: Sequence[str], n: Sequence[Sequence[int | None]], title: str) -> bytes:
    """A heatmap PNG of kappa (rows: source pairs, columns: findings), each cell labelled
    with kappa and the number of shared images; undefined kappa is grey."""
    import matplotlib
    import numpy as np

    arr = np.array([[np.nan if v is None else v for v in r] for r in mat], dtype=float)
    longest = max((len(r) for r in rows), default=10)
    w = min(22.0, max(5.0, 1.6 + 0.07 * longest + 0.85 * len(cols)))
    h = min(30.0, max(2.6, 1.6 + 0.5 * len(rows) + 0.05 * max((len(c) for c in cols), default=5)))
    fig = _figure(w, h)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(under="#8b1a1a", bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(arr), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            k, m = arr[i, j], n[i][j]
            if m is None:
                continue
            txt = ("–" if np.isnan(k) else f"{k:.2f}") + f"\nn={m:,}"
            dark = not np.isnan(k) and (k < 0.15 or k > 0.85)
            ax.text(j, i, txt, ha="center", va="center", fontsize=7.5,
                    color="white" if dark else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, extend="min", shrink=0.85, label="Cohen's kappa")
    fig.tight_layout()
    return _png(fig)


def dot_whisker(labels: Sequence[str], panels: Sequence[tuple[str, Sequence[Any], Sequence[Any],
                                                               Sequence[Any]]]) -> bytes:
    """A dot-and-whisker PNG: one row per label, one panel per metric ``(title, p, lo, hi)``,
    each dot with its interval; missing values are left out."""
    longest = max((len(x) for x in labels), default=10)
    h = min(30.0, max(2.2, 1.0 + 0.32 * len(labels)))
    fig = _figure(min(20.0, 2.0 + 0.065 * longest + 3.6 * len(panels)), h)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    y = list(range(len(labels)))
    for ax, (title, p, lo, hi) in zip(axes, panels):
        for yi, pv, lv, hv in zip(y, p, lo, hi):
            if pv is None or (isinstance(pv, float) and math.isnan(pv)):
                continue
            lv = pv if lv is None else lv
            hv = pv if hv is None else hv
            ax.plot([lv, hv], [yi, yi], color="#2c5d8a", lw=1.6)
            ax.plot([pv], [yi], "o", color="#2c5d8a", ms=5)
        ax.set_xlim(-0.02, 1.02)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].set_ylim(len(labels) - 0.5, -0.5)
    fig.tight_layout()
    return _png(fig)


def bar_chart(labels: Sequence[str], values: Sequence[int], title: str, xlabel: str) -> bytes:
    """A small bar chart PNG (counts per category)."""
    fig = _figure(max(3.6, 0.7 * len(labels) + 1.5), 2.6)
    ax = fig.add_subplot()
    ax.bar(range(len(labels)), values, color="#2c5d8a")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:,}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.margins(y=0.18)
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------------------------
# provenance


def git_commit(root: Path) -> str:
    """``git rev-parse HEAD`` of the workspace (``+ uncommitted changes`` when dirty), or
    ``not a git repository`` / ``no commit yet``."""
    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=False)

    try:
        inside = git("rev-parse", "--is-inside-work-tree")
    except OSError:
        return "not a git repository (git not installed)"
    if inside.returncode or inside.stdout.strip() != "true":
        return "not a git repository"
    head = git("rev-parse", "HEAD")
    if head.returncode:
        return "no commit yet"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + (" (plus uncommitted changes)" if dirty else "")


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


# --------------------------------------------------------------------------------------------
# the builder


class _Report:
    def __init__(self, catalog: Catalog, doc: _Doc, *, top: int, min_shared: int,
                 min_subgroup: int) -> None:
        from medlake.pipelines.registry import hints

        self.cat = catalog
        self.doc = doc
        self.top = top
        self.min_shared = min_shared
        self.min_subgroup = min_subgroup
        self.hints = hints()
        self.missing: list[str] = []
        self._images: pl.DataFrame | None = None
        self._roots: dict[str, str | None] | None = None
        self._splits: dict[str, str] | None = None

    # -- helpers -------------------------------------------------------------------------
    def has(self, table: str) -> bool:
        return self.cat.tables.exists(table)

    def not_computed(self, ds: str, section: str, table: str, hint: str | None = None) -> None:
        cmd = hint or self.hints.get(table, f"the stage that writes {table}")
        text = f"not computed: run {cmd}" if hint is None else f"not computed: {hint}"
        self.doc.missing(f"{text} (table '{table}' is missing).")
        self.missing.append(f"{ds}: {section}: {text}")

    def read_ds(self, table: str, ds: str, columns: Sequence[str] | None = None) -> pl.DataFrame:
        return self.cat.read(table, where=f"dataset_id = {_sql_str(ds)}",
                             columns=list(columns) if columns else None)

    def image_rows(self) -> pl.DataFrame:
        if self._images is None:
            self._images = self.cat.read("images", columns=["image_id", "dataset_id",
                                                            "native_id", "path"])
            roots = self.cat.read("datasets", columns=["dataset_id", "images_root"])
            self._roots = dict(roots.iter_rows())
        return self._images

    def split_of(self) -> dict[str, str]:
        if self._splits is None:
            sp = self.cat.read("splits", columns=["image_id", "scheme", "split"]).sort(
                "scheme", "image_id")
            self._splits = dict(sp.unique("image_id", keep="first").select(
                "image_id", "split").iter_rows())
        return self._splits

    def thumbs(self, ids: Sequence[str], captions: dict[str, str]) -> list[Thumb]:
        """Thumbnails of ``ids``: each file found with :func:`catalog.paths.image_file`,
        decoded with :func:`catalog.imageio.load_rgb` (DICOM windowed), shrunk to THUMB px."""
        from medlake.catalog.imageio import ImageReadError, load_rgb
        from medlake.catalog.paths import image_file

        rows = self.image_rows().filter(pl.col("image_id").is_in(list(ids)))
        by_id = {r["image_id"]: r for r in rows.iter_rows(named=True)}
        out = []
        for iid in ids:
            t = Thumb(iid, captions.get(iid, iid))
            r = by_id.get(iid)
            if r is None:
                t.note = "not in images"
            else:
                assert self._roots is not None
                root = self._roots.get(r["dataset_id"])
                try:
                    if not root:
                        raise ImageReadError(iid, "metadata only (no images_root)")
                    im = load_rgb(image_file(self.cat.ws.root, root, r["path"]),
                                  min_side=2 * THUMB)  # a large JPEG: a reduced DCT decode
                    im.thumbnail((THUMB, THUMB))
                    buf = io.BytesIO()
                    im.save(buf, format="JPEG", quality=82)
                    t.data = buf.getvalue()
                except (ImageReadError, OSError, ValueError) as e:
                    t.note = getattr(e, "reason", None) or type(e).__name__
            out.append(t)
        return out

    # -- sections ------------------------------------------------------------------------
    def dataset(self, ds: str, info: dict[str, Any]) -> None:
        from medlake.catalog.profile import profile

        d = self.doc
        d.heading(2, f"Dataset {ds}", slug(ds), dataset=ds)
        meta = [f"{k}: {info[k]}" for k in ("name", "modality", "license", "citation")
                if info.get(k)]
        if meta:
            d.para("; ".join(meta))
        prof = profile(self.cat, ds, max_findings=10)
        for key, title in SECTIONS:
            d.heading(3, title, slug(ds, key), dataset=ds, section=key)
            getattr(self, f"s_{key}")(ds, prof)

    def s_profile(self, ds: str, prof: Any) -> None:
        d, s = self.doc, prof.summary
        d.para(f"{s['images']:,} images, {s['groups']:,} groups (patients/lesions), "
               f"{s['studies']:,} studies, {s['sources']} label sources, "
               f"{_n(s['quarantined'], 'quarantined row')}.")
        per = self.cat.query(
            "SELECT group_id, count(*) AS images, count(DISTINCT study_id) AS studies "
            "FROM images WHERE dataset_id = ? AND group_id IS NOT NULL GROUP BY group_id", [ds])
        if per.height:
            bins = [("1", 1, 1), ("2", 2, 2), ("3-5", 3, 5), ("6-10", 6, 10), ("11+", 11, 10**12)]
            img = [int(per.filter(pl.col("images").is_between(a, b)).height) for _, a, b in bins]
            st = [int(per.filter(pl.col("studies").is_between(a, b)).height) for _, a, b in bins]
            no_study = int(per.filter(pl.col("studies") == 0).height)
            has_st = no_study < per.height
            d.heading(4, "Images and studies per group", slug(ds, "profile", "groups"))
            tab = {"per group": [b[0] for b in bins], "groups with this many images": img}
            if has_st:
                tab["groups with this many studies"] = st
            d.table(pl.DataFrame(tab))
            d.para(f"mean {per['images'].mean():.2f} images"
                   + (f" and {per.filter(pl.col('studies') > 0)['studies'].mean():.2f} studies"
                      if has_st else "")
                   + f" per group; largest group {_n(per['images'].max(), 'image')}"
                   + ("; no study ids recorded" if not has_st else
                      f"; {_n(no_study, 'group')} without a study id" if no_study else "") + ".")
            d.figure(bar_chart([b[0] for b in bins], img, f"{ds}: images per group",
                               "images in the group"), f"{ds}-images-per-group",
                     f"{ds}: number of groups by images per group")
        else:
            d.para("no group ids recorded (images.group_id is null): leakage cannot be "
                   "measured by patient or lesion.", "note")
        d.heading(4, "Groups with more than N images", slug(ds, "profile", "sizes"))
        d.table(prof.group_sizes)
        d.heading(4, "Splits", slug(ds, "profile", "splits"))
        if prof.splits.height:
            d.table(prof.splits)
        else:
            d.para("no split scheme recorded for this dataset.", "note")
        d.heading(4, "Quarantine", slug(ds, "profile", "quarantine"))
        if prof.quarantine.height:
            d.table(prof.quarantine)
        else:
            d.para("no quarantined rows.", "note")

    def s_sources(self, ds: str, prof: Any) -> None:
        d = self.doc
        src = self.read_ds("sources", ds, ["source_id", "kind", "negatives", "value_type",
                                           "exhaustive", "rule"])
        if not src.height:
            d.para("no label sources for this dataset (metadata or images only).", "note")
            return
        n_img = prof.summary["images"] or 0
        cov = prof.coverage.select("source_id", pl.col("images").alias("images covered"))
        tab = src.join(cov, on="source_id", how="left").with_columns(
            (pl.col("images covered") / max(n_img, 1)).round(3).alias("share of images")
        ).sort("source_id")
        d.table(tab)
        if not self.has("coverage"):
            self.not_computed(ds, "sources", "coverage")
        d.heading(4, "Images shared between sources", slug(ds, "sources", "overlap"))
        if prof.overlap.height:
            d.table(prof.overlap)
        else:
            d.para("no two sources judged the same image.", "note")
        d.heading(4, "Finding prevalence per source (top 10)", slug(ds, "sources", "prevalence"))
        if prof.prevalence.height:
            d.table(prof.prevalence)
        else:
            d.para("no binary or graded findings.", "note")
        cats = prof.extra.get("categories per source")
        if cats is not None and cats.height:
            d.heading(4, "Categories per source", slug(ds, "sources", "categories"))
            d.table(cats, max_rows=30)

    def s_agreement(self, ds: str, prof: Any) -> None:
        d = self.doc
        if not self.has("agreement"):
            self.not_computed(ds, "agreement", "agreement")
            return
        ag = self.read_ds("agreement", ds)
        if not ag.height:
            d.para(f"medlake agreement found no comparable label sources in {ds} (it needs "
                   "two sources, or two annotators, judging the same findings on the same "
                   "images).", "note")
            return

        def rater(s: str, a: str) -> str:
            return s.split(":", 1)[-1] + (f"/{a}" if a else "")

        def pair(r: dict[str, Any]) -> str:
            return (f"{rater(r['source_a'], r['annotator_a'] or '')} vs "
                    f"{rater(r['source_b'], r['annotator_b'] or '')}")

        ag = ag.with_columns(pl.struct("source_a", "annotator_a", "source_b", "annotator_b")
                             .map_elements(pair, return_dtype=pl.String).alias("pair"))
        self._kappa(ds, ag)
        self._ppv(ds, ag)
        self._strata(ds, ag)

    def _kappa(self, ds: str, ag: pl.DataFrame) -> None:
        d = self.doc
        d.heading(4, "Cohen's kappa per source pair and finding", slug(ds, "agreement", "kappa"))
        base = ag.filter((pl.col("subgroup") == "") & pl.col("kind").is_in(RATER_KINDS))
        if not base.height:
            d.para("no pair of sources or annotators shares a finding.", "note")
            return
        per_f = base.group_by("finding").agg(pl.col("n_shared").max().alias("n"),
                                             pl.col("kappa").mean().alias("mean"))
        keep = per_f.filter(pl.col("n") >= self.min_shared)
        left = sorted(set(per_f["finding"]) - set(keep["finding"]))
        if keep.height > 40:  # the 40 findings with the most shared images
            keep = keep.sort("n", descending=True).head(40)
        if not keep.height:
            d.para(f"no finding has {self.min_shared} or more images judged by two sources "
                   f"({len(left)} left out: {', '.join(left[:20])}).", "note")
            return
        cell = base.filter(pl.col("finding").is_in(keep["finding"].implode()))
        cols = (keep.sort([pl.col("mean").fill_nan(None).fill_null(-9), "finding"],
                          descending=[True, False])["finding"].to_list())
        rows_df = cell.group_by("pair").agg(pl.col("kappa").mean().alias("mean"))
        rows = rows_df.sort([pl.col("mean").fill_nan(None).fill_null(-9), "pair"],
                            descending=[True, False])["pair"].to_list()[:30]
        lookup = {(r["pair"], r["finding"]): r for r in cell.iter_rows(named=True)}
        mat = [[(lookup[(p, f)]["kappa"] if (p, f) in lookup else None) for f in cols]
               for p in rows]
        ns = [[(lookup[(p, f)]["n_shared"] if (p, f) in lookup else None) for f in cols]
              for p in rows]
        d.figure(kappa_heatmap(mat, rows, cols, ns, f"{ds}: Cohen's kappa (n = shared images)"),
                 f"{ds}-kappa", f"{ds}: kappa heatmap, source pairs by findings",
                 "Findings sorted by mean kappa (best first); grey: kappa undefined (see note).")
        if left:
            d.para(f"{len(left)} finding(s) with fewer than {self.min_shared} shared images "
                   f"left out: {', '.join(left[:30])}{' ...' if len(left) > 30 else ''}.", "note")
        order = {f: i for i, f in enumerate(cols)}
        porder = {p: i for i, p in enumerate(rows)}
        tab = (cell.filter(pl.col("pair").is_in(rows))
               .with_columns(pl.col("finding").replace_strict(order, default=999).alias("_f"),
                             pl.col("pair").replace_strict(porder, default=999).alias("_p"))
               .sort("_f", "_p"))
        weighted = tab["kappa_quadratic"].drop_nulls().len() > 0
        out = {
            "finding": tab["finding"].to_list(), "pair": tab["pair"].to_list(),
            "shared images": tab["n_shared"].to_list(),
            "kappa [95% CI]": _cis(tab, "kappa"),
        }
        if weighted:
            out["weighted kappa (quadratic) [95% CI]"] = _cis(tab, "kappa_quadratic")
        out["observed agreement"] = tab["observed"].to_list()
        out["note"] = tab["note"].to_list()
        d.table(pl.DataFrame(out, strict=False), max_rows=60)

    def _ppv(self, ds: str, ag: pl.DataFrame) -> None:
        d = self.doc
        d.heading(4, "PPV and sensitivity against the reference", slug(ds, "agreement", "ppv"))
        rows = ag.filter((pl.col("subgroup") == "") & (
            pl.col("ppv").is_not_null() | pl.col("sens").is_not_null()
            | pl.col("pos_confirmed").is_not_null()))
        if not rows.height:
            d.para("no reference source set for this dataset: add one to params.yaml "
                   "agreement.references (test and reference source) and run medlake agreement.",
                   "note")
            return
        rows = rows.with_columns(
            pl.when(pl.col("reference").is_not_null() & (pl.col("reference") == pl.col("source_a")))
            .then(pl.col("source_b")).otherwise(pl.col("source_a")).alias("test"),
        ).sort("finding", "test").head(40)
        labels = [f"{r['finding']}: {r['test'].split(':', 1)[-1]} vs "
                  f"{(r['reference'] or r['source_b']).split(':', 1)[-1]}"
                  for r in rows.iter_rows(named=True)]
        p = [a if a is not None else b for a, b in zip(rows["ppv"], rows["pos_confirmed"])]
        lo = [a if a is not None else b for a, b in zip(rows["ppv_lo"], rows["pos_confirmed_lo"])]
        hi = [a if a is not None else b for a, b in zip(rows["ppv_hi"], rows["pos_confirmed_hi"])]
        d.figure(dot_whisker(labels, [("PPV (or share of positives confirmed)", p, lo, hi),
                                      ("sensitivity", rows["sens"].to_list(),
                                       rows["sens_lo"].to_list(), rows["sens_hi"].to_list())]),
                 f"{ds}-ppv", f"{ds}: PPV and sensitivity with Wilson 95% intervals",
                 "Dots: estimate; whiskers: Wilson 95% interval.")
        d.table(pl.DataFrame({
            "finding": rows["finding"].to_list(), "test": rows["test"].to_list(),
            "reference": [r or DASH for r in rows["reference"].to_list()],
            "shared images": rows["n_shared"].to_list(),
            "PPV [95% CI]": [_ci(*v) for v in zip(p, lo, hi)],
            "sensitivity [95% CI]": _cis(rows, "sens"),
            "NPV [95% CI]": _cis(rows, "npv"),
            "specificity [95% CI]": _cis(rows, "spec"),
        }, strict=False))

    def _strata(self, ds: str, ag: pl.DataFrame) -> None:
        d = self.doc
        d.heading(4, "Hidden stratification: metrics per subgroup", slug(ds, "agreement", "strata"))
        sub = ag.filter((pl.col("subgroup") != "") & pl.col("kind").is_in(RATER_KINDS)
                        & (pl.col("n_shared") >= self.min_subgroup))
        out = []
        for metric in ("kappa", "ppv", "sens"):
            m = sub.filter(pl.col(metric).is_not_null() & ~pl.col(metric).is_nan())
            for key, g in m.group_by("pair", "finding", "subgroup", maintain_order=True):
                if g.height < 2:
                    continue
                g = g.sort(metric)
                lo_r, hi_r = g.row(0, named=True), g.row(-1, named=True)
                out.append({
                    "pair": key[0], "finding": key[1], "subgroup": key[2], "metric": metric,
                    "gap": round(hi_r[metric] - lo_r[metric], 3),
                    "lowest": _at(lo_r, metric), "highest": _at(hi_r, metric),
                    "all subgroups": "; ".join(
                        f"{r['subgroup_value']} {r[metric]:.2f} (n={r['n_shared']})"
                        for r in g.sort("subgroup_value").iter_rows(named=True)),
                })
        if not out:
            d.para(f"no subgroup with at least {self.min_subgroup} shared images has a defined "
                   "metric in two or more subgroups (params.yaml agreement.subgroups).", "note")
            return
        tab = pl.DataFrame(out).sort(["gap", "pair", "finding", "subgroup", "metric"],
                                     descending=[True, False, False, False, False])
        d.para(f"Subgroups with at least {self.min_subgroup} shared images; largest gap between "
               "the best and the worst subgroup first.", "note")
        d.table(tab, max_rows=25)

    def s_leakage(self, ds: str, prof: Any) -> None:
        d = self.doc
        if not self.has("leakage"):
            self.not_computed(ds, "leakage", "leakage")
            return
        lk = self.read_ds("leakage", ds)
        if not lk.height:
            d.para("no split scheme to check (no splits recorded for this dataset).", "note")
            return
        from medlake.pipelines.leakage import SPLIT_ORDER

        def rank(a: str) -> int:
            return SPLIT_ORDER.get(a, 8)

        lk = lk.with_columns(
            pl.when(pl.col("split_a") == "*").then(pl.lit("across all splits"))
            .when(pl.col("split_a") == "all").then(pl.lit("in every split"))
            .otherwise(pl.col("split_a") + " / " + pl.col("split_b")).alias("splits"),
            pl.when(pl.col("split_a") == "*").then(90).when(pl.col("split_a") == "all").then(91)
            .otherwise(pl.col("split_a").map_elements(rank, return_dtype=pl.Int64) * 10
                       + pl.col("split_b").map_elements(rank, return_dtype=pl.Int64))
            .alias("_o"),
        ).sort("scheme", "grouping", "_o")
        for (scheme, grouping), g in lk.group_by("scheme", "grouping", maintain_order=True):
            star = g.filter(pl.col("split_a") == "*")
            if star.height:
                r = star.row(0, named=True)
                d.para(f"scheme {scheme}, grouping {grouping}: {r['n_groups']:,} of "
                       f"{r['n_groups_total']:,} groups ({r['n_images']:,} of "
                       f"{r['n_images_total']:,} images) span splits; {r['n_pairs']:,} "
                       "cross-split image pairs.")
        d.table(lk.select(
            "scheme", "grouping", "splits",
            pl.col("n_groups").alias("groups spanning"), pl.col("n_images").alias("images in them"),
            pl.col("n_pairs").alias("cross-split pairs"), pl.col("n_groups_total").alias("groups"),
            pl.col("n_images_total").alias("images")), max_rows=60)
        d.para("grouping group_id: patients/lesions; group_id+duplicates: also joined by "
               "duplicate clusters and imported pair lists. 'in every split': groups with images "
               "in all splits of the scheme (leakage.all_splits).", "note")

    def s_duplicates(self, ds: str, prof: Any) -> None:
        d = self.doc
        if not self.has("clusters"):
            self.not_computed(ds, "duplicates", "clusters")
            return
        cl = self.cat.read("clusters", columns=["image_id", "cluster_id"])
        mine = cl.filter(pl.col("image_id").str.starts_with(ds + ":"))["cluster_id"].unique()
        cl = cl.filter(pl.col("cluster_id").is_in(mine.implode()))
        if not cl.height:
            d.para("no duplicate clusters in this dataset.", "note")
            return
        ids = cl["image_id"].unique().sort().to_list()
        conflicts = self._label_conflicts(cl, ids)
        sizes = cl.group_by("cluster_id").agg(pl.len().alias("images"),
                                              pl.col("image_id").sort().alias("members"))
        sizes = sizes.join(conflicts, on="cluster_id", how="left").with_columns(
            pl.col("conflict").fill_null(""))
        sizes = sizes.sort([pl.col("conflict") != "", "images", "cluster_id"],
                           descending=[True, True, False])
        n_conf = int((sizes["conflict"] != "").sum())
        n_pairs = None
        if self.has("pairs"):
            n_pairs = self.cat.query(
                "SELECT count(*) AS n FROM pairs WHERE verified AND (starts_with(image_a, ?) "
                "OR starts_with(image_b, ?))", [ds + ":", ds + ":"])["n"][0]
        d.para(f"{sizes.height:,} clusters holding {len(ids):,} images; {n_conf:,} with "
               "conflicting labels" + (f"; {n_pairs:,} verified pairs" if n_pairs is not None
                                       else "") + ". Label-conflicting and largest clusters first.")
        d.table(sizes.select("cluster_id", "images", pl.col("conflict").alias("labels that differ"))
                .with_columns(pl.col("labels that differ").replace("", DASH)), max_rows=25)
        split = self.split_of()
        rows = self.image_rows()
        native = dict(rows.filter(pl.col("image_id").is_in(ids)).select(
            "image_id", "native_id").iter_rows())
        labels = self._labels(ids)
        for r in sizes.head(self.top).iter_rows(named=True):
            members = r["members"][:12]
            d.heading(4, f"Cluster {r['cluster_id']} ({r['images']} images"
                      + (", labels conflict" if r["conflict"] else "") + ")",
                      slug(ds, "dup", r["cluster_id"]))
            caps = {i: " · ".join(x for x in (native.get(i, i), split.get(i), labels.get(i)) if x)
                    for i in members}
            d.sheet(self.thumbs(members, caps), f"{ds}-dup-{r['cluster_id']}")
        if sizes.height > self.top:
            d.para(f"{sizes.height - self.top:,} more clusters in the table 'clusters' "
                   "(medlake ui, Duplicates page).", "note")

    def _label_conflicts(self, cl: pl.DataFrame, ids: list[str]) -> pl.DataFrame:
        """``cluster_id, conflict`` (``source/finding`` names whose labels differ)."""
        ann = self._annotations(ids)
        empty = pl.DataFrame(schema={"cluster_id": pl.String, "conflict": pl.String})
        if not ann.height:
            return empty
        g = (ann.join(cl, on="image_id")
             .group_by("cluster_id", "source_id", "annotator", "finding")
             .agg(pl.col("label").n_unique().alias("k"), pl.len().alias("n"))
             .filter((pl.col("k") > 1) & (pl.col("n") > 1)))
        if not g.height:
            return empty
        return (g.with_columns((pl.col("source_id").str.split(":").list.last() + "/"
                                + pl.col("finding")).alias("what"))
                .group_by("cluster_id").agg(pl.col("what").unique().sort().str.join(", ")
                                            .alias("conflict")))

    def _annotations(self, ids: list[str]) -> pl.DataFrame:
        if not ids or not self.has("annotations"):
            return pl.DataFrame(schema={"image_id": pl.String, "source_id": pl.String,
                                        "annotator": pl.String, "finding": pl.String,
                                        "label": pl.String})
        parts = []
        for k in range(0, len(ids), 2000):
            chunk = ", ".join(_sql_str(i) for i in ids[k:k + 2000])
            parts.append(self.cat.read(
                "annotations", where=f"image_id IN ({chunk})",
                columns=["image_id", "source_id", "annotator", "finding", "value", "category"]))
        ann = pl.concat(parts)
        v = pl.col("value")
        val = pl.when(v == v.round(0)).then(v.cast(pl.Int64).cast(pl.String)).otherwise(
            v.cast(pl.String))
        return ann.with_columns(pl.coalesce(pl.col("category"), val).alias("label")).filter(
            pl.col("label").is_not_null()).select("image_id", "source_id", "annotator",
                                                  "finding", "label")

    def _labels(self, ids: list[str]) -> dict[str, str]:
        """A short label text per image: category labels, and binary findings marked 1."""
        ann = self._annotations(ids)
        if not ann.height:
            return {}
        ann = ann.filter(pl.col("label") != "0").sort("source_id", "annotator", "finding")
        txt = ann.with_columns(
            pl.when(pl.col("label") == "1").then(pl.col("finding"))
            .otherwise(pl.col("source_id").str.split(":").list.last() + "=" + pl.col("label"))
            .alias("t")).group_by("image_id").agg(pl.col("t").unique(maintain_order=True)
                                                  .head(3).str.join(", "))
        return dict(txt.iter_rows())

    def s_quality(self, ds: str, prof: Any) -> None:
        d = self.doc
        rows = self.image_rows()
        native = dict(rows.filter(pl.col("dataset_id") == ds).select("image_id", "native_id")
                      .iter_rows())
        split = self.split_of()
        d.heading(4, "Outliers", slug(ds, "quality", "outliers"))
        if not self.has("outliers"):
            self.not_computed(ds, "outliers", "outliers")
        else:
            out = self.read_ds("outliers", ds, ["image_id", "score", "rank", "k", "model"]).sort(
                "score", "image_id", descending=[True, False])
            if not out.height:
                d.para("no outlier scores for this dataset (no fingerprinted images).", "note")
            else:
                r0 = out.row(0, named=True)
                d.para(f"{out.height:,} images scored (1 - mean cosine similarity to the "
                       f"{r0['k']} nearest, model {r0['model']}); the {min(self.top, out.height)} "
                       "most outlying:")
                top = out.head(self.top)
                caps = {r["image_id"]: f"#{i + 1} {native.get(r['image_id'], r['image_id'])} · "
                        f"score {r['score']:.3f}" for i, r in enumerate(top.iter_rows(named=True))}
                d.sheet(self.thumbs(top["image_id"].to_list(), caps), f"{ds}-outliers")
        d.heading(4, "Quality flags", slug(ds, "quality", "flags"))
        if not self.has("fingerprints"):
            self.not_computed(ds, "quality flags", "fingerprints")
            return
        fp = self.read_ds("fingerprints", ds, ["image_id", "flags"])
        if not fp.height:
            d.para("no fingerprinted images in this dataset (no image files).", "note")
            return
        fl = (fp.with_columns(pl.col("flags").fill_null("").str.split(",").alias("flag"))
              .explode("flag").with_columns(pl.col("flag").str.strip_chars())
              .filter(pl.col("flag") != ""))
        counts = (fl.group_by("flag").agg(pl.len().alias("images")).with_columns(
            (pl.col("images") / fp.height).round(4).alias("share"))
            .sort(["images", "flag"], descending=[True, False]))
        unflagged = fp.height - fl["image_id"].n_unique()
        d.para(f"{fp.height:,} images fingerprinted; {fp.height - unflagged:,} carry at least one "
               f"flag, {unflagged:,} none.")
        fq = self.cat.read("quarantine", columns=["reason"],
                           where=f"dataset_id = {_sql_str(ds)} AND stage = 'fingerprint'")
        if fq.height:
            d.para(f"{fq.height:,} image files could not be read by the fingerprint stage "
                   "(see Profile, Quarantine).", "note")
        if not counts.height:
            return
        d.table(counts)
        for r in counts.iter_rows(named=True):
            ex = fl.filter(pl.col("flag") == r["flag"]).sort("image_id")["image_id"].to_list()
            d.heading(4, f"Flag {r['flag']} ({_n(r['images'], 'image')})",
                      slug(ds, "flag", r["flag"]))
            shown = ex[:min(self.top, 8)]
            caps = {i: " · ".join(x for x in (native.get(i, i), split.get(i)) if x) for i in shown}
            d.sheet(self.thumbs(shown, caps), f"{ds}-flag-{r['flag']}")

    def s_versions(self, ds: str, prof: Any) -> None:
        d = self.doc
        if not self.has("versions"):
            self.not_computed(ds, "versions", "versions")
            return
        v = self.read_ds("versions", ds, ["name", "kind", "parent", "scheme", "n_images",
                                          "counts", "medlake_version", "path"]).sort(
            [pl.col("kind") != "root", "name"])
        if not v.height:
            d.para("no versions: add recipes/NAME.yaml and run medlake materialize NAME.", "note")
            return

        def split_counts(c: str | None) -> str:
            try:
                sp = (json.loads(c or "{}") or {}).get("split") or {}
            except ValueError:
                return DASH
            return ", ".join(f"{k} {n:,}" for k, n in sp.items()) or DASH

        d.table(v.with_columns(pl.col("counts").map_elements(split_counts, return_dtype=pl.String)
                               .alias("images per split")).drop("counts", "path"))
        lin = self.cat.read("lineage", columns=["version", "rule", "step", "action"]) \
            if self.has("lineage") else None
        derived = v.filter(pl.col("kind") == "derived")
        if derived.height and lin is None:
            self.not_computed(ds, "versions: lineage", "lineage")
        for r in derived.iter_rows(named=True):
            name = r["name"]
            d.heading(4, f"Version {name}", slug(ds, "version", name))
            d.para(f"derived from {r['parent']}; {r['n_images'] or 0:,} images; folder "
                   f"{r['path'] or DASH}.")
            if lin is not None:
                s = (lin.filter(pl.col("version") == name)
                     .group_by("step", "rule", "action").agg(pl.len().alias("images"))
                     .sort("step", "rule", "action"))
                if s.height:
                    d.table(s)
            folder = self.cat.ws.root / (r["path"] or f"lake/versions/{name}")
            sheet = folder / "DATASHEET.md"
            extras = [f for f in ("croissant.json", "version.json", "manifest.parquet")
                      if (folder / f).is_file()]
            if extras:
                d.para("files: " + ", ".join(extras) + (
                    " (Croissant 1.0 metadata with Responsible-AI fields)"
                    if "croissant.json" in extras else ""), "note")
            if sheet.is_file():
                text = sheet.read_text(encoding="utf-8", errors="replace")
                d.details(f"DATASHEET.md of {name}", _markdown_html(text), _demote(text),
                          open_=True)
            else:
                d.para(f"no datasheet: the folder is absent here (dvc pull {r['path'] or ''}).",
                       "note")

    def s_reviews(self, ds: str, prof: Any) -> None:
        from medlake.catalog import reviews as rv

        d = self.doc
        if not self.has("reviews"):
            self.not_computed(ds, "reviews", "reviews", REVIEWS_HINT)
            return
        hist = rv.read(self.cat)
        pre = ds + ":"
        hist = hist.filter(pl.col("image_id").fill_null("").str.starts_with(pre)
                           | pl.col("image_b").fill_null("").str.starts_with(pre))
        if not hist.height:
            d.para(f"no verdicts on images of {ds} yet ({REVIEWS_HINT}).", "note")
            return
        latest = rv.latest(self.cat, per_reviewer=False, reviews=hist)
        denom: dict[str, int | None] = {"pair": None, "image": None, "label": None}
        if self.has("pairs"):
            denom["pair"] = int(self.cat.query(
                "SELECT count(*) AS n FROM pairs WHERE starts_with(image_a, ?) "
                "OR starts_with(image_b, ?)", [pre, pre])["n"][0])
        if self.has("outliers"):
            denom["image"] = self.read_ds("outliers", ds, ["image_id"]).height
        rows = []
        for kind in ("pair", "label", "image"):
            k = latest.filter(pl.col("kind") == kind)
            if not k.height:
                continue
            vc = dict(k.group_by("verdict").len().iter_rows())
            total = denom[kind]
            rows.append({
                "kind": kind, "items reviewed": k.height,
                "of": total, "share": round(k.height / total, 3) if total else None,
                "verdicts": ", ".join(f"{v} {vc[v]:,}" for v in rv.VERDICTS[kind] if v in vc),
                "reviewers": hist.filter(pl.col("kind") == kind)["reviewer"].n_unique(),
            })
        d.para(f"{_n(hist.height, 'verdict')} recorded ({_n(latest.height, 'item')}, the latest "
               "verdict per item counts). 'of': candidate pairs (pair) or scored images (image).")
        d.table(pl.DataFrame(rows, schema_overrides={"of": pl.Int64, "share": pl.Float64}))
        d.heading(4, "PPV of positive labels from label verdicts", slug(ds, "reviews", "ppv"))
        ppv = rv.ppv_by_class(self.cat, reviews=hist).filter(pl.col("n") > 0)
        if not ppv.height:
            d.para("no label verdicts with a correct/wrong answer yet (Discrepancies page).",
                   "note")
            return
        labels = [f"{r['source_id'].split(':', 1)[-1]}: {r['finding']} (n={r['n']})"
                  for r in ppv.iter_rows(named=True)]
        d.figure(dot_whisker(labels, [("PPV from reviews", ppv["ppv"].to_list(),
                                       ppv["ppv_lo"].to_list(), ppv["ppv_hi"].to_list())]),
                 f"{ds}-review-ppv", f"{ds}: PPV per finding from review verdicts",
                 "correct = true positive, wrong = false positive; unsure left out; Wilson 95%.")
        d.table(ppv.select("source_id", "finding", "n_correct", "n_wrong", "n_unsure",
                           pl.struct("ppv", "ppv_lo", "ppv_hi").map_elements(
                               lambda s: _ci(s["ppv"], s["ppv_lo"], s["ppv_hi"]),
                               return_dtype=pl.String).alias("PPV [95% CI]")))


def _demote(md: str) -> str:
    """Markdown headings of an embedded file become bold lines, so the report's own
    headings stay the only ones (the HTML and Markdown outlines then match)."""
    out, fence = [], False
    for line in md.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"^(#{1,6})\s+(.*)$", line)
        out.append(f"**{m.group(2).strip()}**" if m else line)
    return "\n".join(out)


def _markdown_html(md: str) -> str:
    """A datasheet as HTML (markdown-it, which rich brings; else preformatted text), its
    headings demoted to bold paragraphs like in the Markdown report."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # pragma: no cover - rich depends on markdown-it-py
        return f"<pre>{_esc(md)}</pre>"
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(_demote(md))
    return f'<div class="datasheet">{body}</div>'


# --------------------------------------------------------------------------------------------
# entry


def _prepare(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    assets = out / ASSETS
    if assets.exists():
        if not (assets / MARKER).exists():
            raise CatalogError(f"{assets} exists and was not written by medlake report; "
                               "choose another --out folder or remove it")
        shutil.rmtree(assets)
    assets.mkdir()
    (assets / MARKER).write_text("written by medlake report; replaced on each run\n")
    return assets


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def run(catalog: Catalog, datasets: Iterable[str] | None = None, *, out: Path | str,
        top: int = 12, min_shared: int = 20, min_subgroup: int = 10) -> ReportResult:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ ``assets/``) to ``out``.

    Parameters
    ----------
    catalog
        The workspace's catalog.
    datasets
        Dataset ids to report (default: every ingested dataset).
    out
        Output folder (created; ``report.html``, ``report.md`` and ``assets/`` are replaced).
    top
        Duplicate clusters and outliers shown as contact sheets per dataset.
    min_shared
        Findings enter the kappa heatmap when two sources share at least this many images.
    min_subgroup
        Subgroups enter the hidden-stratification table with at least this many images.

    Returns
    -------
    ReportResult

    Raises
    ------
    CatalogError
        An unknown dataset, no dataset ingested, or an ``assets`` folder in ``out`` that
        this function did not write.

    Example
    -------
    >>> run(cat, ["synth-cxr"], out="audit").summary()  # doctest: +SKIP
    """
    known = catalog.dataset_ids()
    ids = list(dict.fromkeys(datasets or known))
    if not ids:
        raise CatalogError("no dataset ingested yet; run medlake ingest FORMAT PATH first")
    unknown = [d for d in ids if d not in known]
    if unknown:
        raise CatalogError(f"dataset(s) {', '.join(unknown)} not in this workspace; ingested "
                           f"datasets: {', '.join(known)}")
    out = Path(out)
    _prepare(out)
    doc = _Doc(out)
    rep = _Report(catalog, doc, top=top, min_shared=min_shared, min_subgroup=min_subgroup)
    ws = catalog.ws
    dsinfo = {r["dataset_id"]: r for r in catalog.read("datasets").iter_rows(named=True)}

    doc.heading(1, "medlake report", "top")
    doc.para(f"Workspace {ws.root.name}: {len(ids)} dataset(s): {', '.join(ids)}.")
    doc.heading(2, "Provenance", "provenance")
    commit = git_commit(ws.root)
    pf = ws.params_file
    ptxt = pf.read_text(encoding="utf-8") if pf.is_file() else None
    doc.table(pl.DataFrame({"": ["medlake version", "git commit", "params"],
                            "value": [__version__, commit,
                                      "params.yaml (below)" if ptxt is not None
                                      else "no params.yaml (every stage's defaults)"]}))
    if ptxt is not None:
        doc.details("params.yaml", f"<pre>{_esc(ptxt)}</pre>",
                    "```yaml\n" + ptxt.rstrip() + "\n```", open_=True)
    else:
        doc.para("no params.yaml: every stage ran with its defaults.", "note")
    doc.heading(2, "Overview", "overview")
    over = catalog.query(
        "SELECT dataset_id, count(*) AS images, count(DISTINCT group_id) AS groups, "
        "count(path) AS \"with image file\" FROM images GROUP BY dataset_id")
    over = pl.DataFrame({"dataset_id": ids}).join(over, on="dataset_id", how="left")
    doc.table(over, max_rows=100)
    nav = "".join(
        f'<li><a href="#{slug(ds)}">{_esc(ds)}</a>: ' + ", ".join(
            f'<a href="#{slug(ds, k)}">{_esc(t)}</a>' for k, t in SECTIONS) + "</li>"
        for ds in ids)
    doc.html.append(f"<nav><ul>{nav}</ul></nav>")
    for ds in ids:
        rep.dataset(ds, dsinfo.get(ds, {}))
    doc.html.append(f'<p class="note">Written by medlake {_esc(__version__)} (medlake report); '
                    "no network resource is used by this page.</p>")

    title = f"medlake report: {', '.join(ids)}"
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<meta name=\"generator\" content=\"medlake {_esc(__version__)}\">"
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body><main>\n"
            + "\n".join(doc.html) + "\n</main></body></html>\n")
    html_path, md_path = out / "report.html", out / "report.md"
    _write(html_path, page)
    _write(md_path, "\n".join(doc.md))
    return ReportResult(out=out, html=html_path, markdown=md_path, datasets=tuple(ids),
                        missing=tuple(rep.missing), images=doc.images, figures=doc.figures)
