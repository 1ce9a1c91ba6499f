"""``medlake ui`` never leaves its Streamlit server behind: real processes, real signals.

Each test starts ``medlake ui`` on a free port of 127.0.0.1, waits until it serves, signals
the medlake process by its pid and checks that the Streamlit child is gone and the port is
closed within :data:`GONE_S` seconds. Everything started here is stopped by process id.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

STARTUP_S = 180.0  # the server answers and medlake ui prints its URL (2 shared cores)
GONE_S = 20.0  # the child has gone and the port is closed (10 s grace + SIGKILL + margin)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time)`` of ``pid`` from /proc, or None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
    return fields[0], int(fields[19])


def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (scanning /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "stat").read_text()
        except OSError:
            continue
        if int(raw[raw.rindex(")") + 2:].split()[1]) == pid:
            out.append(int(d.name))
    return out


def alive(pid: int, started: int) -> bool:
    """Whether the process ``pid`` that started at ``started`` still runs (zombies do not)."""
    st = proc_stat(pid)
    return st is not None and st[1] == started and st[0] not in ("Z", "X")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def kill_if_alive(pid: int, started: int | None) -> None:
    """SIGKILL ``pid`` when it is still the process that started at ``started``."""
    if started is not None and alive(pid, started):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def served(tmp_path) -> Iterator[dict]:
    """``medlake ui`` on a bare workspace, serving; yields its Popen, child pid and port."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc (Linux) to find the Streamlit child")
    root = tmp_path / "ws"
    (root / ".dvc").mkdir(parents=True)
    port = free_port()
    log = tmp_path / "ui.log"
    medlake = Path(sys.executable).parent / "medlake"
    env = dict(os.environ, STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    proc = subprocess.Popen([str(medlake), "ui", str(root), "--port", str(port)], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    info: dict = {"proc": proc, "port": port, "log": log, "child": None, "child_started": None}
    try:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"medlake ui exited: {log.read_text()[-2000:]}"
            if info["child"] is None:
                kids = children(proc.pid)
                if kids:
                    st = proc_stat(kids[0])
                    info["child"], info["child_started"] = kids[0], st and st[1]
            try:
                healthy = urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/_stcore/health", timeout=1).read() == b"ok"
            except OSError:
                healthy = False
            if healthy and info["child"] is not None and "medlake UI for" in log.read_text():
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"medlake ui did not serve within {STARTUP_S:.0f} s: "
                        f"{log.read_text()[-2000:]}")
        yield info
    finally:  # by pid only: the child first (it has its own process group), then medlake
        if info["child"] is not None:
            kill_if_alive(info["child"], info["child_started"])
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def wait_gone(info: dict) -> float:
    """Seconds until the child is gone and the port closed; fails after :data:`GONE_S`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < GONE_S:
        if not alive(info["child"], info["child_started"]) and not port_open(info["port"]):
            return time.monotonic() - t0
        time.sleep(0.1)
    pytest.fail(f"Streamlit child {info['child']} still running "
                f"(alive={alive(info['child'], info['child_started'])}, "
                f"port open={port_open(info['port'])}) {GONE_S:.0f} s after the signal: "
                f"{info['log'].read_text()[-1500:]}")


def test_child_is_a_separate_process_group(served):
    """The server runs in its own process group (so the parent decides how it stops)."""
    child = served["child"]
    assert os.getpgid(child) == child != os.getpgid(served["proc"].pid)


@pytest.mark.parametrize("sig, code", [
    (signal.SIGTERM, 128 + signal.SIGTERM),
    (signal.SIGHUP, 128 + signal.SIGHUP),
    (signal.SIGINT, 0),
])
def test_signal_to_medlake_stops_the_server(served, sig, code):
    proc = served["proc"]
    os.kill(proc.pid, sig)
    wait_gone(served)
    assert proc.wait(GONE_S) == code
    # medlake exits only after its child: the child was reaped, not left as a zombie
    assert proc_stat(served["child"]) is None or proc_stat(served["child"])[1] != served[
        "child_started"]


def test_kill_9_of_medlake_stops_the_server(served):
    """SIGKILL cannot be handled: the kernel signals the child (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    proc = served["proc"]
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(GONE_S) == -signal.SIGKILL
    wait_gone(served)


def test_a_server_that_ignores_sigterm_is_killed(tmp_path):
    """``stop`` gives the group ``wait_s`` seconds after SIGTERM, then SIGKILL."""
    from medlake.cli.commands.ui import start, stop

    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    proc = start([sys.executable, "-c", code], dict(os.environ))
    try:
        time.sleep(0.5)  # let it install its handler
        t0 = time.monotonic()
        assert stop(proc, wait_s=1.0) == -signal.SIGKILL
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
