"""``medlake ui [WORKSPACE]``: serve the Streamlit catalog UI (127.0.0.1 by default).

Process handling
----------------
The Streamlit server is a child process in its own process group. ``medlake ui`` stops it
whatever way it is stopped itself:

* SIGTERM, SIGINT (Ctrl+C) or SIGHUP: the handler sends SIGTERM to the child's group, waits
  for it (SIGKILL after :data:`STOP_WAIT_S` seconds) and only then exits;
* killed outright (SIGKILL, a crash): on Linux the child asked the kernel, before it
  started Streamlit, for SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``).

Identity
--------
Verdicts carry a reviewer name. Bound to a loopback address (the default) the name is typed
in the sidebar (identity ``typed``). Bound to any other address ``medlake ui`` refuses to
start (before anything binds) unless it is told where names come from:
``--trust-proxy-header NAME`` takes the reviewer from that request header, set by an
authenticating reverse proxy (identity ``proxy-header:NAME``; a request without it cannot
record verdicts), and ``--insecure-open`` accepts typed names from anyone who can reach the
address (identity ``insecure-open``). The mode reaches the app as ``MEDLAKE_IDENTITY``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import click

from medlake.cli.common import command, open_catalog, workspace_option

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_WAIT_S = 10.0  # seconds the child gets to exit after SIGTERM before SIGKILL
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
HEADER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")  # an HTTP header name (RFC 9110 token)


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


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (``localhost`` or a loopback IP).

    Any other name counts as not loopback: it is never resolved here.
    """
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def identity_mode(host: str, trust_proxy_header: str | None, insecure_open: bool) -> str:
    """The identity mode for a server bound to ``host``, or a UsageError saying what to add.

    Parameters
    ----------
    host
        The address Streamlit will bind.
    trust_proxy_header
        The request header an authenticating reverse proxy sets to the user's name.
    insecure_open
        Accept typed reviewer names on a non-loopback address.

    Returns
    -------
    str
        ``proxy-header:<NAME>``, ``insecure-open`` or ``typed``.

    Raises
    ------
    click.UsageError
        Both options given, a malformed header name, or a non-loopback ``host`` without
        either option.
    """
    if trust_proxy_header is not None and insecure_open:
        raise click.UsageError("--trust-proxy-header and --insecure-open exclude each other")
    if trust_proxy_header is not None:
        if not HEADER_RE.match(trust_proxy_header):
            raise click.UsageError(f"--trust-proxy-header: '{trust_proxy_header}' is not an "
                                   "HTTP header name (letters, digits and '-')")
        return f"proxy-header:{trust_proxy_header}"
    if insecure_open:
        return "insecure-open"
    if not is_loopback(host):
        raise click.UsageError(
            f"refusing to serve on {host}: anyone who can reach it could record verdicts under "
            "any name. Serve behind an authenticating reverse proxy with "
            "--trust-proxy-header NAME (e.g. X-Remote-User; the reviewer then comes from that "
            "header), or accept typed names with --insecure-open.")
    return "typed"


def _child_setup(parent: int) -> Callable[[], None]:
    """The child's ``preexec_fn``: on Linux, SIGTERM when the parent dies (even by SIGKILL).

    Everything is looked up before the fork; after it only ``prctl`` and ``getppid`` run.
    """
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
            prctl = None

    def setup() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return setup


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, set to get SIGTERM when this process dies."""
    # preexec_fn: medlake ui starts the server before any thread of its own exists
    setup = _child_setup(os.getpid())
    return subprocess.Popen(cmd, env=env, process_group=0, preexec_fn=setup)  # noqa: PLW1509


def stop(proc: subprocess.Popen, wait_s: float = STOP_WAIT_S) -> int:
    """SIGTERM to ``proc``'s process group, wait, SIGKILL after ``wait_s``; its exit code."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the group is the child's own (process_group=0)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return proc.returncode


class Stopped(Exception):
    """Raised by the signal handler of :func:`serve` to unwind to its clean-up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signum)


def serve(root: Path, *, port: int = 8501, host: str = "127.0.0.1",
          wait_s: float = 120.0, identity: str = "typed") -> int:
    """Serve the UI on ``root`` in the foreground; print its URL once it answers.

    Returns the server's exit code: 0 after Ctrl+C (SIGINT), 128 + the signal number after
    SIGTERM or SIGHUP; the server has exited whenever this returns. If the server does not
    answer on ``/_stcore/health`` within ``wait_s`` seconds, the URL is printed with a
    warning. ``identity`` (:func:`identity_mode`) reaches the app as ``MEDLAKE_IDENTITY``.
    """
    import time
    import urllib.request

    env = dict(os.environ, MEDLAKE_WORKSPACE=str(root), MEDLAKE_IDENTITY=identity,
               STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    previous = {s: signal.signal(s, _raise_stopped) for s in STOP_SIGNALS}
    proc: subprocess.Popen | None = None
    url, health = f"http://{host}:{port}", health_url(host, port)
    try:
        proc = start(streamlit_cmd(root, port=port, host=host), env)
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
    except (Stopped, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Stopped) else int(signal.SIGINT)
        return 0 if signum == signal.SIGINT else 128 + signum
    finally:
        # no second signal may cut the clean-up short: ignore them until the child is gone
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        try:
            if proc is not None:
                stop(proc)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


@click.command("ui")
@click.argument("legacy_workspace", metavar="[WORKSPACE]", required=False,
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--port", type=int, default=8501, show_default=True, help="Port to serve on.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; the default serves this machine only. Another address "
                   "needs --trust-proxy-header or --insecure-open.")
@click.option("--trust-proxy-header", metavar="NAME", default=None,
              help="Take the reviewer's name from this request header (e.g. X-Remote-User), "
                   "set by an authenticating reverse proxy; requests without it cannot record "
                   "verdicts. Only the proxy may reach the server.")
@click.option("--insecure-open", is_flag=True, default=False,
              help="Serve a non-loopback --host with typed reviewer names: anyone who can "
                   "reach it can read the catalog and record verdicts under any name.")
@workspace_option
@command
def ui(legacy_workspace, port, host, trust_proxy_header, insecure_open, workspace):
    """Serve the catalog and review UI of the workspace (--workspace, as for every command;
    the positional WORKSPACE of earlier versions still works) on 127.0.0.1.

    \b
    Example:
      medlake ui --workspace my-audit --port 8502
      medlake ui --trust-proxy-header X-Remote-User   # behind an authenticating proxy
    """
    if legacy_workspace and workspace and Path(legacy_workspace) != Path(workspace):
        raise click.UsageError("Give the workspace once: --workspace DIR")
    workspace = workspace or legacy_workspace
    identity = identity_mode(host, trust_proxy_header, insecure_open)  # before anything binds
    cat = open_catalog(workspace)
    if identity == "insecure-open" and not is_loopback(host):
        click.echo(f"warning: binding {host} with --insecure-open: anyone who can reach it can "
                   "read the catalog and record verdicts under any name", err=True)
    sys.exit(serve(cat.ws.root, port=port, host=host, identity=identity))


COMMANDS = [ui]
