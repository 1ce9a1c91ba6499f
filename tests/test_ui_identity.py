"""Who recorded a verdict: typed names on loopback, a trusted proxy header, or a refusal.

The end-to-end test puts a real nginx (Debian's package) in front of ``medlake ui
--trust-proxy-header X-Remote-User`` on loopback, proxying HTTP and the WebSocket, setting
``X-Remote-User: alice``, and clicks a verdict in headless Chromium through it. nginx runs
from a config in the test's tmp folder (pid file, logs, temp paths there) and is stopped by
its pid. Without nginx or Chromium those tests skip with the reason (fail under CI).
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

import click
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from streamlit.testing.v1 import AppTest

from medlake.catalog import Catalog
from medlake.catalog import reviews as rv
from medlake.demo import ui_sample as sample

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "ui" / "app.py")
HEADER = "X-Remote-User"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing(what: str, how: str) -> None:
    msg = f"no {what}: {how}"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


# --- the command: refuse an open address without an identity, before binding ---------------

@pytest.mark.parametrize("host, expected", [
    ("127.0.0.1", "typed"), ("localhost", "typed"), ("::1", "typed"), ("127.0.0.2", "typed"),
    ("0.0.0.0", None), ("::", None), ("192.0.2.10", None), ("ui.example.org", None),
])
def test_identity_mode_by_host(host, expected):
    from medlake.cli.commands.ui import identity_mode

    if expected is None:
        with pytest.raises(click.UsageError, match="--trust-proxy-header.*--insecure-open"):
            identity_mode(host, None, False)
    else:
        assert identity_mode(host, None, False) == expected
    assert identity_mode(host, HEADER, False) == f"proxy-header:{HEADER}"
    assert identity_mode(host, None, True) == "insecure-open"
    with pytest.raises(click.UsageError, match="exclude each other"):
        identity_mode(host, HEADER, True)
    with pytest.raises(click.UsageError, match="not an HTTP header name"):
        identity_mode(host, "X-User: alice", False)


def test_open_host_without_identity_refuses_to_start(tmp_path):
    """The real command: exit status 2 and a message naming both ways out, within seconds.

    The workspace does not exist, so no version of the command could get as far as binding
    0.0.0.0 here: the refusal must come first (a command that opened the workspace first
    fails with a workspace error instead).
    """
    root = tmp_path / "no-workspace"
    medlake = Path(sys.executable).parent / "medlake"
    t0 = time.monotonic()
    res = subprocess.run([str(medlake), "ui", str(root), "--host", "0.0.0.0", "--port",
                          str(free_port())], capture_output=True, text=True, timeout=120, check=False,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 2, res.stdout + res.stderr
    err = " ".join(res.stderr.split())
    assert "refusing to serve on 0.0.0.0" in err
    assert "--trust-proxy-header NAME" in err and "--insecure-open" in err
    assert time.monotonic() - t0 < 60  # it did not wait for a server


def test_refusal_happens_before_anything_starts(tmp_path, monkeypatch):
    """No workspace is opened and no process started when the identity check fails."""
    import medlake.cli.commands.ui as ui_cmd
    from medlake.cli.main import main

    def boom(*a, **kw):
        raise AssertionError("reached past the identity check")

    monkeypatch.setattr(ui_cmd, "open_catalog", boom)
    monkeypatch.setattr(ui_cmd, "serve", boom)
    monkeypatch.setattr(ui_cmd.subprocess, "Popen", boom)
    res = CliRunner().invoke(main, ["ui", str(tmp_path / "nowhere"), "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "refusing to serve on 0.0.0.0" in res.output, res.output
    res = CliRunner().invoke(main, ["ui", "--host", "::", "--trust-proxy-header", HEADER,
                                    "--insecure-open"])
    assert res.exit_code == 2 and "exclude each other" in res.output, res.output


# --- the reviews table: the identity column -------------------------------------------------

def test_identity_is_stored_and_old_rows_read_as_null(catalog):
    folder = rv.folder(catalog)
    folder.mkdir(parents=True)
    old = pa.table({"review_id": ["00000000000000000001-1-old"], "item": ["d:1|d:2"],
                    "kind": ["pair"], "reviewer": ["ana"], "verdict": ["different"]})
    pq.write_table(old, folder / "00000000000000000001-1-old.parquet")  # before the column
    assert rv.read(catalog)["identity"].to_list() == [None]
    rv.record(catalog, rv.pair_verdict("d:1", "d:3", "duplicate", "bo",
                                       identity=f"proxy-header:{HEADER}"))
    rv.record(catalog, rv.pair_verdict("d:1", "d:4", "duplicate", "cy", identity="typed"))
    df = rv.read(catalog)
    assert df["identity"].to_list() == [None, f"proxy-header:{HEADER}", "typed"]
    assert df.schema["identity"] == pl.String
    assert rv.compact(catalog) == 3
    assert rv.read(catalog)["identity"].to_list() == [None, f"proxy-header:{HEADER}", "typed"]
    with pytest.raises(rv.ReviewError, match="identity 'sso' is not one of"):
        rv.record(catalog, rv.pair_verdict("d:1", "d:5", "duplicate", "cy", identity="sso"))


# --- the app: where the reviewer comes from (AppTest: no request headers) -------------------

@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return sample.build(tmp_path_factory.mktemp("idws") / "ws", n_images=20, n_pairs=6).root


def open_duplicates(root: Path, monkeypatch, identity: str | None) -> AppTest:
    monkeypatch.setenv("MEDLAKE_WORKSPACE", str(root))
    monkeypatch.setenv("MEDLAKE_REVIEWER", "typed-name")
    if identity is None:
        monkeypatch.delenv("MEDLAKE_IDENTITY", raising=False)
    else:
        monkeypatch.setenv("MEDLAKE_IDENTITY", identity)
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["page"] = "duplicates"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_typed_reviewer_is_recorded_as_typed(ws, monkeypatch):
    at = open_duplicates(ws, monkeypatch, None)
    cat = Catalog.open(ws)
    before = rv.read(cat).height
    at.button(key="pair-0-different").click().run()
    df = rv.read(cat)
    assert df.height == before + 1
    assert (df["reviewer"][-1], df["identity"][-1]) == ("typed-name", "typed")


def test_proxy_mode_without_the_header_records_nothing(ws, monkeypatch):
    """The typed/default name is never used in proxy mode; no header, no verdict."""
    at = open_duplicates(ws, monkeypatch, f"proxy-header:{HEADER}")
    box = at.sidebar.text_input[0]
    assert box.disabled and box.value == ""
    assert any(f"No {HEADER} header" in w.value for w in at.warning)
    assert at.button(key="pair-0-different").disabled


def test_proxy_mode_callback_refuses_without_the_header(ws, monkeypatch):
    """A click that reaches the callback anyway (a forged message) records nothing."""
    import streamlit as st

    from medlake.ui.views import common

    monkeypatch.setenv("MEDLAKE_IDENTITY", f"proxy-header:{HEADER}")
    monkeypatch.setenv("MEDLAKE_REVIEWER", "typed-name")
    cat = Catalog.open(ws)
    before = rv.read(cat).height
    common._record(str(ws), rv.pair_verdict("demo-cxr:a", "demo-cxr:b", "duplicate", "typed"),
                   None)  # outside a session: no request headers, like a request without one
    assert rv.read(cat).height == before
    assert st.session_state["last_verdict"].startswith(
        f"not recorded: this request has no {HEADER} header")
    monkeypatch.setenv("MEDLAKE_IDENTITY", "typed")  # the same call records when typed
    st.session_state["reviewer"] = "typed-name"
    common._record(str(ws), rv.pair_verdict("demo-cxr:a", "demo-cxr:b", "duplicate", ""), None)
    df = rv.read(cat)
    assert df.height == before + 1 and df["identity"][-1] == "typed"


# --- end to end: nginx in front, verdicts in Chromium ---------------------------------------

NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header {header} alice;
            proxy_buffering off;
            proxy_max_temp_file_size 0;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""


def nginx_exe() -> str:
    exe = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)
    if exe is None:
        missing("nginx", "run `make browser` (apt-get install -y nginx chromium)")
    return exe


def chromium_exe() -> str:
    exe = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                       else None)
    if exe is None:
        missing("system Chromium", "run `make browser` (apt-get install -y chromium)")
    return exe


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path,
              ready: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited: {log.read_text()[-2000:]}")
        try:
            ok = urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            ok = False
        if ok and (ready is None or ready in log.read_text()):
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing answered on {url} within {timeout:.0f} s: "
                       f"{log.read_text()[-2000:]}")


def stop_pid(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process this test started, by its pid; SIGKILL after 20 s."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(20)


@pytest.fixture(scope="module")
def proxied(ws, tmp_path_factory) -> Iterator[dict]:
    """``medlake ui --trust-proxy-header X-Remote-User`` behind nginx, both on 127.0.0.1."""
    nginx, chromium = nginx_exe(), chromium_exe()
    tmp = tmp_path_factory.mktemp("proxy")
    upstream, port = free_port(), free_port()
    medlake = Path(sys.executable).parent / "medlake"
    ui_log = tmp / "ui.log"
    env = {k: v for k, v in os.environ.items() if k not in ("MEDLAKE_REVIEWER",
                                                            "MEDLAKE_IDENTITY")}
    env["MEDLAKE_REVIEWER"] = "typed-name"  # must never be used in proxy mode
    ui = subprocess.Popen([str(medlake), "ui", str(ws), "--port", str(upstream),
                           "--trust-proxy-header", HEADER], env=env, stdout=ui_log.open("w"),
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, upstream=upstream, header=HEADER))
    ng_log = tmp / "nginx.out"
    ng = None
    try:
        wait_http(f"http://127.0.0.1:{upstream}/_stcore/health", 300, ui, ui_log,
                  ready="medlake UI for")
        ng = subprocess.Popen([nginx, "-p", str(tmp), "-c", str(conf), "-e",
                               str(tmp / "error.log")], stdout=ng_log.open("w"),
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_http(f"http://127.0.0.1:{port}/_stcore/health", 60, ng, ng_log)
        yield {"url": f"http://127.0.0.1:{port}", "direct": f"http://127.0.0.1:{upstream}",
               "chromium": chromium, "tmp": tmp}
    finally:
        if ng is not None:
            stop_pid(ng, signal.SIGQUIT)  # nginx's graceful stop; workers follow the master
        stop_pid(ui)  # medlake ui stops its Streamlit child before it exits


@pytest.fixture(scope="module")
def browser(proxied, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile), executable_path=proxied["chromium"], headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
        try:
            yield ctx
        finally:
            ctx.close()


def test_verdict_through_the_proxy_is_recorded_under_the_header_name(proxied, browser, ws,
                                                                      tmp_path):
    cat = Catalog.open(ws)
    before = rv.read(cat).height
    page = browser.new_page()
    try:
        page.goto(f"{proxied['url']}/?page=duplicates")
        box = page.get_by_label("reviewer", exact=True)
        box.wait_for(timeout=120_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('input')].some(i => i.value === 'alice')",
            timeout=60_000)
        assert box.input_value() == "alice" and box.is_disabled()
        page.get_by_role("button", name="Duplicate").first.click(timeout=60_000)
        page.get_by_text("recorded: duplicate").first.wait_for(timeout=60_000)
        page.screenshot(path=str(tmp_path / "proxied-verdict.png"), full_page=True)
    finally:
        page.close()
    df = rv.read(cat)
    assert df.height == before + 1
    row = df.row(-1, named=True)
    assert (row["kind"], row["verdict"], row["reviewer"], row["identity"]) == (
        "pair", "duplicate", "alice", f"proxy-header:{HEADER}")
    # the request reached Streamlit through nginx, WebSocket included (nginx logs an
    # upgraded connection when it closes, a moment after the page does: wait for the line)
    log = proxied["tmp"] / "access.log"
    deadline = time.monotonic() + 30
    while "GET /_stcore/stream" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    access = log.read_text()
    assert "GET /_stcore/stream" in access and " 101 " in access


def test_direct_request_without_the_header_cannot_record(proxied, browser, ws, tmp_path):
    """Bypassing the proxy (no header): no reviewer, the verdict buttons are disabled."""
    cat = Catalog.open(ws)
    before = rv.read(cat).height
    page = browser.new_page()
    try:
        page.goto(f"{proxied['direct']}/?page=duplicates")
        page.get_by_text(f"No {HEADER} header reached the app").first.wait_for(timeout=120_000)
        button = page.get_by_role("button", name="Duplicate").first
        button.wait_for(timeout=60_000)
        assert button.is_disabled()
        assert page.get_by_label("reviewer", exact=True).input_value() == ""
        page.screenshot(path=str(tmp_path / "direct-no-header.png"), full_page=True)
    finally:
        page.close()
    assert rv.read(cat).height == before
