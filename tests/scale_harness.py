"""Scale-out harness: a real 2-node Ray cluster and a real S3 server (SeaweedFS) on loopback.

Run inside a loopback-only user + network + PID namespace (what tests/test_scale_ray.py and
bench/scale.py do)::

    unshare -rn --pid --fork --kill-child --mount-proc PYTHON tests/scale_harness.py WORKDIR SCENARIO

SCENARIO is ``test`` (embed and duplicates local vs Ray, LanceDB on s3://, a DVC remote on
the S3 server, push, clone, pull) or ``bench`` (timings for bench/scale.py). It brings ``lo``
up, starts SeaweedFS and two Ray nodes (``ray start``, one CPU each, own ``--temp-dir``),
runs the scenario, stops every process of its PID namespace (all started by it) by process id
(SIGTERM, then SIGKILL after 10 s; never ``ray stop``, which matches names machine-wide),
removes its temp folders, and writes ``WORKDIR/result.json`` (figures, checks, leftovers).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
BIN = Path(sys.executable).parent
KEY, SECRET = "medlake-test", "medlake-test-secret"
# SeaweedFS's weed binary hardcodes its socket paths (gRPC, and the default local ones) as
# /tmp/seaweedfs-<kind>-<port>.sock (TMPDIR does not move them); a killed server leaves some
# behind, so stop() removes ours there, matched by kind and port
WEED_SOCKET = "/tmp/seaweedfs-{kind}-{port}.sock"


def wait_port(port: int, timeout: float = 90) -> float:
    """Seconds until 127.0.0.1:port accepts a connection."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return time.time() - t0
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Cluster:
    """SeaweedFS + a Ray head and one Ray worker node, all started and stopped by this object."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="mlk"))  # short: Ray's socket paths are limited
        # outside Ray's worker ports (10002-19999); SeaweedFS's /tmp socket names differ per run
        base = random.randrange(20000, 30000, 10)
        self.ports = {"s3": base, "master": base + 1, "volume": base + 2, "filer": base + 3,
                      "ray": base + 4}
        self.weed: subprocess.Popen | None = None
        self.times: dict[str, float] = {}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.address = f"127.0.0.1:{self.ports['ray']}"

    def start(self) -> None:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        wd = self.tmp / "weed"
        wd.mkdir()
        (wd / "s3.json").write_text(json.dumps({"identities": [{
            "name": "medlake", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        p = self.ports
        t0 = time.time()
        self.weed = subprocess.Popen(
            [str(BIN / "weed"), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             "-master.telemetry=false", "-filer", "-s3", f"-s3.port={p['s3']}",
             f"-s3.config={wd / 's3.json'}", f"-dir={wd}", f"-master.port={p['master']}",
             f"-volume.port={p['volume']}", f"-filer.port={p['filer']}", "-volume.max=200",
             "-master.volumeSizeLimitMB=16", f"-s3.localSocket={wd / 's3.sock'}",
             f"-filer.localSocket={wd / 'filer.sock'}"],
            stdout=open(wd / "weed.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
            env={**os.environ, "TMPDIR": str(wd)}, start_new_session=True)
        # explicit: with the mode unset, a ~/.ray/auth_token left by any local ray.init() turns
        # token auth on for the head only, and the worker's 'ray start' fails (InvalidAuthToken)
        os.environ["RAY_AUTH_MODE"] = "disabled"  # loopback-only namespace, nothing else reaches it
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=1",
                  "--object-store-memory=2000000000", "--disable-usage-stats"]
        t1 = time.time()
        _ray_start(["--head", f"--port={p['ray']}", "--include-dashboard=false",
                    f"--temp-dir={self.tmp / 'h'}", *common], env)
        self.times["ray_head_s"] = time.time() - t1
        t2 = time.time()
        _ray_start([f"--address={self.address}", f"--temp-dir={self.tmp / 'w'}", *common], env)
        self.times["ray_worker_s"] = time.time() - t2
        wait_port(p["s3"])
        self.times["weed_s"] = time.time() - t0
        os.environ.update({"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": KEY,
                           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
                           "RAY_USAGE_STATS_ENABLED": "0"})
        for bucket in ("vectors", "dvc"):
            self.bucket(bucket)

    def s3(self) -> Any:
        """An ``s3fs`` file system on this cluster's S3 server."""
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key=KEY, secret=SECRET)

    def bucket(self, name: str) -> None:
        """Create an S3 bucket (retried while SeaweedFS is still starting its volumes)."""
        fs = self.s3()
        for _ in range(60):
            try:
                fs.mkdir(name)
                fs.pipe(f"{name}/.probe", b"ok")
                fs.rm(f"{name}/.probe")
                return
            except Exception:  # noqa: BLE001  (any error while the server warms up)
                time.sleep(0.5)
        raise RuntimeError(f"cannot create bucket {name} on {self.endpoint}")

    def pids(self) -> list[int]:
        """Every other process of this PID namespace: all were started for this cluster."""
        me = os.getpid()
        return [int(d.name) for d in Path("/proc").iterdir()
                if d.name.isdigit() and int(d.name) != me and _alive(int(d.name))]

    def stop(self) -> dict[str, Any]:
        """SIGTERM every started process by id, SIGKILL what is left after 10 s, remove files."""
        try:
            import ray

            ray.shutdown()
        except ImportError:
            pass
        pids = self.pids()
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in pids):
            _reap()
            time.sleep(0.2)
        killed = [p for p in pids if _alive(p)]
        for pid in killed:
            _signal(pid, signal.SIGKILL)
        time.sleep(0.5)
        _reap()
        socks = [WEED_SOCKET.format(kind=kind + grpc, port=self.ports[kind] + off)
                 for kind in ("s3", "master", "volume", "filer")
                 for grpc, off in (("", 0), ("-grpc", 10000))]
        stale = sorted({s for s in socks if os.path.exists(s)})
        for s in stale:  # SeaweedFS leaves some gRPC sockets in /tmp when killed: ours, by port
            os.unlink(s)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return {"stopped": len(pids), "needed_sigkill": len(killed), "removed_sockets": stale,
                "left_processes": self.pids(),
                "left_files": [s for s in [str(self.tmp), *socks] if os.path.exists(s)]}


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    r = subprocess.run([str(BIN / "ray"), "start", *args], env=env, capture_output=True,
                       text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"ray start {' '.join(args[:2])} failed:\n{(r.stdout + r.stderr)[-3000:]}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap() -> None:
    """As PID 1 of the namespace, collect exited children (orphaned daemons become ours)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(workdir: Path, scenario: str) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    if os.getpid() != 1:
        sys.exit("run me as PID 1 of a new namespace: unshare -rn --pid --fork --kill-child "
                 "--mount-proc PYTHON tests/scale_harness.py WORKDIR SCENARIO")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           check=True).stdout
    res: dict[str, Any] = {"scenario": scenario,
                           "interfaces": sorted(ln.split(":")[1].strip() for ln in links.splitlines())}
    cl = Cluster()
    try:
        t0 = time.time()
        cl.start()
        res["startup"] = {**cl.times, "total_s": time.time() - t0}
        res["ports"], res["tmp"] = cl.ports, str(cl.tmp)
        from scale_scenarios import SCENARIOS

        res.update(SCENARIOS[scenario](cl, workdir))
        res["ok"] = True
    except Exception as e:  # noqa: BLE001  (reported in the JSON; the test shows it)
        res["ok"] = False
        res["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-6000:]}"
    finally:
        res["cleanup"] = cl.stop()
        (workdir / "result.json").write_text(json.dumps(res, indent=1, default=str))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]).resolve(), sys.argv[2]))
