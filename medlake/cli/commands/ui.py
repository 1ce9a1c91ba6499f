"""``medlake ui [WORKSPACE]``: serve the Streamlit catalog UI (127.0.0.1 by default)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from medlake.cli.common import command, open_catalog

def _app_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("medlake.ui")
    return Path(spec.origin).resolve().parent / "app.py"


APP = _app_path()


def streamlit_cmd(root: Path, *, port: int, host: str) -> list[str]:
    """The ``streamlit run`` command line: bound to ``host``, no browser, no usage stats."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host, "--server.port", str(port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
        "--", "--workspace", str(root),
    ]


def health_url(host: str, port: int) -> str:
    """Streamlit's health endpoint (answers ``ok`` once the app server is up)."""
    return f"http://{host}:{port}/_stcore/health"


def serve(root: Path, *, port: int = 8501, host: str = "127.0.0.1",
          wait_s: float = 120.0) -> int:
    """Serve the UI on ``root`` in the foreground; print its URL once it answers.

    Returns the server's exit code (0 after Ctrl+C). If the server does not answer on
    ``/_stcore/health`` within ``wait_s`` seconds, the URL is printed with a warning.
    """
    import time
    import urllib.request

    env = dict(os.environ, MEDLAKE_WORKSPACE=str(root), STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    proc = subprocess.Popen(streamlit_cmd(root, port=port, host=host), env=env)
    url, health = f"http://{host}:{port}", health_url(host, port)
    try:
        deadline = time.monotonic() + wait_s
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(health, timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        else:
            if proc.poll() is not None:
                return proc.returncode
            click.echo(f"warning: the UI did not answer on {health} within {wait_s:.0f} s",
                       err=True)
        if proc.poll() is None:  # run every page once so first visits find warm caches
            from medlake.ui.warm import prime

            click.echo("warming the UI: every page runs once ...", err=True)
            prime(url)
        click.echo(f"medlake UI for {root}: {url}  (Ctrl+C stops it)")
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(10)
        return 0


@click.command("ui")
@click.argument("workspace", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--port", type=int, default=8501, show_default=True, help="Port to serve on.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; the default serves this machine only. Binding another "
                   "address exposes the catalog (and the review buttons) to that network.")
@command
def ui(workspace, port, host):
    """Serve the catalog UI for WORKSPACE (default: the current workspace)."""
    cat = open_catalog(workspace)
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: binding {host}: anyone who can reach it can read the catalog "
                   "and record verdicts", err=True)
    sys.exit(serve(cat.ws.root, port=port, host=host))


COMMANDS = [ui]
