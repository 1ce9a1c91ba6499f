"""Widgets the pages share: missing-table notes, images, verdict buttons, pagination."""

from __future__ import annotations

import getpass
import io
import os
from dataclasses import replace
from typing import Any

import streamlit as st

from catalog import Catalog, CatalogError
from catalog import reviews as rv
from ui import data


def need(cat: Catalog, table: str) -> bool:
    """True when ``table`` exists; otherwise say what to run and return False."""
    if data.has(cat, table):
        return True
    st.info(f"No `{table}` table in this workspace yet. Run `{data.HINTS.get(table, 'medlake')}` "
            "to create it; this page shows it as soon as it exists.")
    return False


@st.cache_data(max_entries=4000, show_spinner=False)
def _image_png(root: str, image_id: str, max_side: int | None, mtime: float) -> bytes:
    im = data.load_image(Catalog.open(root), image_id, max_side=max_side)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def image_bytes(cat: Catalog, image_id: str, max_side: int | None = None) -> bytes:
    """PNG bytes of an image (thumbnails are cached; the key includes the file's mtime)."""
    p = data.image_path(cat, image_id)
    mtime = p.stat().st_mtime if p.is_file() else 0.0
    return _image_png(str(cat.ws.root), image_id, max_side, mtime)


def show_image(cat: Catalog, image_id: str, *, max_side: int | None = None,
               caption: str | None = None) -> None:
    """Show an image, or why it cannot be shown (never a file outside the workspace)."""
    try:
        st.image(image_bytes(cat, image_id, max_side), caption=caption or image_id)
    except CatalogError as e:
        st.warning(str(e))


def gallery(cat: Catalog, image_ids: list[str], captions: list[str] | None = None, *,
            per_row: int = 6, max_side: int = 160) -> None:
    """Thumbnails in a grid."""
    caps = captions or image_ids
    for start in range(0, len(image_ids), per_row):
        cols = st.columns(per_row)
        for col, iid, cap in zip(cols, image_ids[start:start + per_row],
                                 caps[start:start + per_row]):
            with col:
                show_image(cat, iid, max_side=max_side, caption=cap)


def pager(key: str, total: int, per_page: int) -> int:
    """A page-number input; returns the offset of the page shown."""
    pages = max(1, -(-total // per_page))
    if st.session_state.get(f"{key}-page", 1) > pages:  # filters changed: back to page 1
        st.session_state[f"{key}-page"] = 1
    page = st.number_input("page", min_value=1, max_value=pages, step=1, key=f"{key}-page",
                           help=f"{pages:,} pages of {per_page}")
    st.caption(f"page {int(page)} of {pages:,}")
    return (int(page) - 1) * per_page


def reviewer() -> str:
    """The reviewer's name (sidebar field; default from MEDLAKE_REVIEWER or the login)."""
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
    verdict = replace(verdict, reviewer=reviewer(), note=note or verdict.note)
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


def last_verdict_note() -> None:
    msg = st.session_state.get("last_verdict")
    if msg:
        (st.error if msg.startswith("not") else st.success)(msg)
