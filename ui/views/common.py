"""Widgets the pages share: missing-table notes, images, verdict buttons, pagination."""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import streamlit as st
from PIL import Image

from medlake.catalog import Catalog, CatalogError
from medlake.catalog import reviews as rv
from medlake.ui import cache, data


def need(cat: Catalog, table: str) -> bool:
    """True when ``table`` exists; otherwise say what to run and return False."""
    if data.has(cat, table):
        return True
    st.info(f"No `{table}` table in this workspace yet. Run `{data.HINTS.get(table, 'medlake')}` "
            "to create it; this page shows it as soon as it exists.")
    return False


GALLERY_MAX = 24  # thumbnails in one cluster or group gallery (browser work grows with it)
BROWSER_FORMATS = {"PNG", "JPEG", "GIF", "WEBP"}
BROWSER_MODES = {"L", "RGB", "RGBA", "P", "LA"}


def _browser_native(p: Path) -> bool:
    """Whether a browser shows ``p`` as it is (8-bit PNG/JPEG/...): served without decoding."""
    try:
        with Image.open(p) as im:
            return im.format in BROWSER_FORMATS and im.mode in BROWSER_MODES
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def image_file(cat: Catalog, image_id: str, max_side: int | None = None, *,
               path: Path | None = None) -> Path:
    """A file the browser can show for ``image_id``.

    Full size (``max_side=None``): the original when the browser can show it, else an 8-bit
    PNG rendering. Thumbnails: a PNG at most ``max_side`` pixels wide and high. Renderings
    are stored once under ``lake/cache/ui`` (keyed by the file's path, size and mtime).

    Raises
    ------
    catalog.CatalogError
        The image has no file, its path leaves the workspace, or it cannot be decoded.
    """
    p = path or data.image_path(cat, image_id)
    if not p.is_file():
        raise data.ImagePathError(f"image '{image_id}': file {cat.ws.relpath(p)} is missing")
    if max_side is None and _browser_native(p):
        return p
    return cache.cached_file(cat, cache.file_key("image", p, max_side),
                             lambda: data.open_rgb(p, image_id, max_side=max_side))


def blend_file(cat: Catalog, a: str, b: str, mode: str) -> Path:
    """The cached blend or difference of two images at full size (see :func:`data.blend`)."""
    pa_, pb = data.image_path(cat, a), data.image_path(cat, b)
    for iid, p in ((a, pa_), (b, pb)):
        if not p.is_file():
            raise data.ImagePathError(f"image '{iid}': file {cat.ws.relpath(p)} is missing")
    return cache.cached_file(cat, cache.file_key("blend", pa_, pb, mode), lambda: data.blend(
        data.open_rgb(pa_, a), data.open_rgb(pb, b), mode))


NOTED = "_no-file-noted"  # session key: datasets whose "no image files" notice this run showed


def begin_run() -> None:
    """Start a script run: notices shown once per page run are due again (``ui/app.py``)."""
    st.session_state[NOTED] = set()


def no_file_notice(dataset_id: str | None) -> None:
    """Say once per page run that ``dataset_id`` has no image files, with the command that
    attaches them (instead of one warning per image of a metadata-only dataset)."""
    noted = st.session_state.get(NOTED)
    if not isinstance(noted, set):
        noted = set()
        st.session_state[NOTED] = noted
    if dataset_id in noted:
        return
    noted.add(dataset_id)
    ds = dataset_id or "DATASET"
    st.info(f"Dataset `{ds}` has no image files recorded (metadata only), so its images "
            f"are listed without pictures. Attach them with "
            f"`medlake attach-images {ds} FOLDER`; this page shows them once attached.")


def show_image(cat: Catalog, image_id: str, *, max_side: int | None = None,
               caption: str | None = None, path: Path | data.ImagePathError | None = None) -> None:
    """Show an image, or why it cannot be shown (never a file outside the workspace).

    An image without a file (a metadata-only dataset) shows its caption and one notice per
    page run and dataset (:func:`no_file_notice`), not a warning of its own.
    """
    try:
        if isinstance(path, data.ImagePathError):
            raise path
        st.image(str(image_file(cat, image_id, max_side, path=path)), caption=caption or image_id)
    except data.NoFileError as e:
        no_file_notice(e.dataset_id)
        st.caption(f"{caption or image_id} · no image file")
    except CatalogError as e:
        st.warning(str(e))


def gallery(cat: Catalog, image_ids: list[str], captions: list[str] | None = None, *,
            per_row: int = 6, max_side: int = 160,
            below: Callable[[str], None] | None = None) -> None:
    """Thumbnails in a grid (paths looked up in one query; thumbnails cached on disk).

    ``below(image_id)`` draws widgets under each image (e.g. verdict buttons).
    """
    caps = captions or image_ids
    paths = data.image_paths(cat, image_ids)
    for p in paths.values():  # the notice above the grid, not inside its first cell
        if isinstance(p, data.NoFileError):
            no_file_notice(p.dataset_id)
    for start in range(0, len(image_ids), per_row):
        cols = st.columns(per_row)
        for col, iid, cap in zip(cols, image_ids[start:start + per_row],
                                 caps[start:start + per_row]):
            with col:
                show_image(cat, iid, max_side=max_side, caption=cap, path=paths[iid])
                if below is not None:
                    below(iid)


def pager(key: str, total: int, per_page: int) -> int:
    """A page-number input; returns the offset of the page shown."""
    pages = max(1, -(-total // per_page))
    if st.session_state.get(f"{key}-page", 1) > pages:  # filters changed: back to page 1
        st.session_state[f"{key}-page"] = 1
    page = st.number_input("page", min_value=1, max_value=pages, step=1, key=f"{key}-page",
                           help=f"{pages:,} pages of {per_page}")
    st.caption(f"page {int(page)} of {pages:,}")
    return (int(page) - 1) * per_page


def chart(build: Callable[..., Any], *rows: tuple, key: str) -> dict:
    """The Vega-Lite spec of the Altair chart ``build(*rows)``, built once per ``rows``.

    Building and validating an Altair chart costs a few tenths of a second per rerun; the
    spec only changes with its data, so it is cached (per build function and ``rows``,
    which must be hashable: tuples of table rows). ``key`` names the chart in the cache.
    """
    return _chart(key, build.__module__, build.__qualname__, build, rows)


@st.cache_data(max_entries=256, show_spinner=False)
def _chart(key: str, module: str, name: str, _build: Callable[..., Any],
           rows: tuple) -> dict:
    spec = _build(*rows).to_dict()
    spec.pop("config", None)  # Altair's default theme sizes; Streamlit's theme applies
    return spec


def show_chart(spec: dict, key: str) -> None:
    """Draw a spec from :func:`chart`."""
    st.vega_lite_chart(spec=spec, key=key)


def chart_pick(spec: dict, key: str, param: str, fields: tuple[str, ...], *,
               width: str | int | None = None) -> tuple | None:
    """Show a chart spec whose point selection ``param`` reruns the page on a click.

    Returns the clicked point's ``fields`` when the selection changed since the last rerun,
    else None, so a page can copy a click into its selectboxes (which stay usable too).
    ``width``: Streamlit's chart width (``"content"`` keeps the spec's own sizes).
    """
    ev = st.vega_lite_chart(spec=spec, on_select="rerun", selection_mode=param, key=key,
                            width=width)
    points = (ev.get("selection") or {}).get(param) or [] if ev else []
    first = points[0] if isinstance(points, list) and points else None
    pick = tuple(first.get(f) for f in fields) if isinstance(first, dict) else None
    last_key = f"{key}-last-pick"
    changed = pick is not None and pick != st.session_state.get(last_key)
    st.session_state[last_key] = pick
    return pick if changed else None


def select(container: Any, label: str, options: list, *, key: str, default: Any = None,
           **kw: Any) -> Any:
    """A selectbox whose remembered value is dropped when it is no longer an option (another
    dataset was chosen), starting at ``default`` (else the first option)."""
    if key in st.session_state and st.session_state[key] not in options:
        del st.session_state[key]
    index = 0  # a remembered value wins; index 0 keeps Streamlit from warning about both
    if key not in st.session_state and default in options:
        index = options.index(default)
    return container.selectbox(label, options, index=index if options else None, key=key, **kw)


def identity_mode() -> str:
    """How reviewers are identified: ``MEDLAKE_IDENTITY`` as set by ``medlake ui``.

    ``typed`` (the default: a loopback server, the sidebar name), ``insecure-open`` (typed
    names on an open address) or ``proxy-header:<NAME>`` (the name comes from request header
    NAME, set by an authenticating reverse proxy). Stored with each verdict (``identity``).
    """
    return os.environ.get("MEDLAKE_IDENTITY", "").strip() or "typed"


def proxy_header() -> str | None:
    """The trusted identity header's name in ``proxy-header:<NAME>`` mode, else None."""
    mode = identity_mode()
    return mode.removeprefix("proxy-header:") if mode.startswith("proxy-header:") else None


def header_reviewer(name: str) -> str:
    """The reviewer named by request header ``name`` of this session ('' when absent).

    A header sent more than once with different values names nobody (a proxy must set it,
    not pass on what the client sent). Outside a session (the warm-up) there are no headers.
    """
    values = {v.strip() for v in st.context.headers.get_all(name) if v and v.strip()}
    return values.pop() if len(values) == 1 else ""


def reviewer() -> str:
    """The reviewer's name: from the trusted proxy header in ``proxy-header`` mode (never
    typed), else the sidebar field (default from MEDLAKE_REVIEWER or the login)."""
    header = proxy_header()
    if header is not None:
        return header_reviewer(header)
    if "reviewer" not in st.session_state:
        try:
            default = os.environ.get("MEDLAKE_REVIEWER") or getpass.getuser()
        except (KeyError, OSError):
            default = ""
        st.session_state["reviewer"] = default
    return str(st.session_state.get("reviewer", "")).strip()


def _record(root: str, verdict: rv.Verdict, note_key: str | None) -> None:
    # read name and note when clicked, not when the button was drawn
    note = st.session_state.get(note_key) if note_key else None
    header = proxy_header()
    if header is not None and not reviewer():
        st.session_state["last_verdict"] = (
            f"not recorded: this request has no {header} header from the authenticating "
            "proxy, so there is no reviewer to record the verdict under")
        return
    verdict = replace(verdict, reviewer=reviewer(), note=note or verdict.note,
                      identity=identity_mode())
    try:
        rv.record(Catalog.open(root), verdict)
        st.session_state["last_verdict"] = f"recorded: {verdict.verdict} on {verdict.item}"
    except CatalogError as e:
        st.session_state["last_verdict"] = f"not recorded: {e}"


def verdict_buttons(cat: Catalog, make: Any, choices: tuple[str, ...], key: str, *,
                    note_key: str | None = None) -> None:
    """One button per verdict; a click stores the verdict at once (``make(verdict)``)."""
    cols = st.columns(len(choices))
    for col, choice in zip(cols, choices):
        with col:
            st.button(choice.capitalize(), key=f"{key}-{choice}", on_click=_record,
                      args=(str(cat.ws.root), make(choice), note_key), disabled=not reviewer())


def latest_verdicts(cat: Catalog, kind: str) -> dict[str, str]:
    """Item -> its newest verdict of any reviewer (read fresh, see :mod:`ui.cache`)."""
    done = rv.latest(cat, kind=kind, per_reviewer=False)
    return dict(zip(done["item"].to_list(), done["verdict"].to_list()))


def last_verdict_note() -> None:
    msg = st.session_state.get("last_verdict")
    if msg:
        (st.error if msg.startswith("not") else st.success)(msg)
