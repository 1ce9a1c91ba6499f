"""Warm-up: every page's first visit made once in the server, before a person opens it.

What makes a page's first open slow is server work that later visits find cached: module
imports (pandas, Altair, Polars), the shared DuckDB connection, each page's aggregate
queries (:mod:`ui.cache`) and its thumbnails on disk. :func:`run_pages` renders every page
once in a thread without a Streamlit session ("bare mode": widgets return their defaults,
elements are dropped), so exactly the queries and images of each page's first visit land
in the process-wide caches; nothing is shown and no logic is repeated here.

* ``medlake ui`` calls :func:`prime` once the server answers: it opens one session over
  Streamlit's WebSocket with ``?warm=1``; the app then calls :func:`run_pages` and
  finishes the run when the warm-up is done, and ``medlake ui`` prints its URL after that.
* After a stage changes the lake (a new :func:`ui.cache.signature`), the next visit starts
  :func:`refresh`, which warms every page again in the background (only in a primed
  server: AppTest runs and plain ``streamlit run`` never start threads).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from streamlit.logger import get_logger

if TYPE_CHECKING:
    from medlake.catalog import Catalog

# the bare-mode notes Streamlit logs for calls made outside a session (expected here)
_QUIET = ("streamlit.runtime.scriptrunner_utils.script_run_context",
          "streamlit.runtime.state.session_state_proxy")
_lock = threading.Lock()
_state: dict[str, Any] = {"primed": False, "thread": None, "warmed": {}}
log = get_logger(__name__)  # Streamlit's logger: shows in the server's output


def run_pages(root: str, pages: Mapping[str, ModuleType]) -> dict[str, float | str]:
    """Render each page of ``pages`` once without a session.

    Must run in a thread without a ``ScriptRunContext`` (see :func:`start`): in a session's
    own thread the pages would be drawn into that session.

    Parameters
    ----------
    root
        The workspace root.
    pages
        Page name -> module with ``render(cat)`` (:func:`ui.views.pages`).

    Returns
    -------
    dict
        Seconds per page, or the error text of a page that raised (it then fails visibly
        when opened; the warm-up goes on with the next page).
    """
    from medlake.catalog import Catalog
    from medlake.ui import cache

    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    cat = Catalog.open(root)
    sig = cache.signature(cat.ws.tables_dir)
    out: dict[str, float | str] = {}
    for name, page in pages.items():
        t = time.perf_counter()
        try:
            page.render(cat)
            out[name] = round(time.perf_counter() - t, 3)
        except Exception as e:  # noqa: BLE001 - a page that fails here fails visibly when opened
            out[name] = f"{type(e).__name__}: {e}"
    _state["warmed"][root] = sig
    log.info("warmed %s: %s", root, out)
    return out


def start(root: str, pages: Mapping[str, ModuleType]) -> threading.Thread:
    """The warm-up thread for ``root`` (a running one is reused; none runs twice at once)."""
    with _lock:
        th = _state["thread"]
        if th is None or not th.is_alive():
            th = threading.Thread(target=run_pages, args=(root, pages), daemon=True,
                                  name="medlake-ui-warm")
            th.start()
            _state["thread"] = th
        return th


def warm_now(cat: Catalog, pages: Mapping[str, ModuleType], timeout_s: float = 600) -> bool:
    """Warm every page and wait for it (the ``?warm=1`` run); later lake changes re-warm.

    Returns whether the warm-up finished within ``timeout_s``.
    """
    _state["primed"] = True
    th = start(str(cat.ws.root), pages)
    th.join(timeout_s)
    return not th.is_alive()


def refresh(cat: Catalog, pages: Mapping[str, ModuleType]) -> bool:
    """In a primed server, warm again in the background when the lake changed since the last
    warm-up. Returns whether a warm-up was started."""
    from medlake.ui import cache

    root = str(cat.ws.root)
    if not _state["primed"] or _state["warmed"].get(root) == cache.signature(cat.ws.tables_dir):
        return False
    th = _state["thread"]
    if th is not None and th.is_alive():
        return False
    start(root, pages)
    return True


def prime(url: str, timeout_s: float = 300) -> bool:
    """Ask the server at ``url`` to warm every page and wait until it has.

    Opens one session over Streamlit's WebSocket (``/_stcore/stream``), requests the app with
    ``?warm=1`` and waits for the end of that run (``script_finished``).

    Parameters
    ----------
    url
        The server's base URL, e.g. ``http://127.0.0.1:8501``.
    timeout_s
        Give up after this many seconds.

    Returns
    -------
    bool
        True once the run finished. Any failure (no ``websockets`` package, refused
        connection, time-out) returns False: the UI works the same, only the first visit of
        each page is slower.
    """
    import asyncio

    try:
        return asyncio.run(asyncio.wait_for(_prime(url), timeout_s))
    except Exception as e:  # noqa: BLE001 - warming is an optimisation, never an error
        log.warning("UI warm-up did not finish: %s", e)
        return False


async def _prime(url: str) -> bool:
    import websockets
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    ws_url = url.replace("http://", "ws://", 1).rstrip("/") + "/_stcore/stream"
    async with websockets.connect(ws_url, subprotocols=["streamlit"],
                                  max_size=None) as ws:  # type: ignore[list-item]
        msg = BackMsg()
        msg.rerun_script.query_string = "warm=1"
        msg.rerun_script.page_name = ""
        await ws.send(msg.SerializeToString())
        while True:
            fwd = ForwardMsg()
            fwd.ParseFromString(await ws.recv())
            if fwd.WhichOneof("type") == "script_finished":
                return True
