"""``medlake ui [WORKSPACE]``: serve the Streamlit catalog UI (127.0.0.1 by default)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from cli.common import command, open_catalog

APP = Path(__file__).resolve().parents[2] / "ui" / "app.py"


def streamlit_cmd(root: Path, *, port: int, host: str) -> list[str]:
    """The ``streamlit run`` command line: bound to ``host``, no browser, no usage stats."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host, "--server.port", str(port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
        "--", "--workspace", str(root),
    ]


def serve(root: Path, *, port: int = 8501, host: str = "127.0.0.1") -> int:
    """Start the UI on ``root`` in the foreground and print its URL; returns the exit code."""
    env = dict(os.environ, MEDLAKE_WORKSPACE=str(root), STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    click.echo(f"medlake UI for {root}: http://{host}:{port}  (Ctrl+C stops it)")
    try:
        return subprocess.call(streamlit_cmd(root, port=port, host=host), env=env)
    except KeyboardInterrupt:
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
