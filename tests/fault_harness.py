"""Fault injection: kill a stage with SIGKILL mid-commit, check readers and reruns.

A small synthetic workspace (the demo generator: dermoscopy and chest X-ray images) is run
through ingest, fingerprint, embed, duplicates, materialize and review compaction twice:
first on truncated manifests, then on the full ones, so every stage's new output differs
from its old one (a half-published commit is then visible). For each stage the harness keeps
the lake *before* the stage and a clean run's result *after* it, plus the clean run's
commits (which files each transaction publishes, from ``MEDLAKE_FAULT=log:PATH``).

A trial copies the before-state, runs the stage in a child process and kills it (SIGKILL):
at its Nth rename or deletion (``MEDLAKE_FAULT=step:N``, the child kills itself in
``catalog.tables.fault_point``) or after a random delay while every step is slowed down
(``delay:S``). Then

1. *raw*: the files on disk, before any medlake process opened the lake, are classified per
   transaction of the clean run: a transaction with some files old and some new is a half
   state as a plain glob would see it (expected after a kill mid-rename; recovery fixes it);
2. *reader*: a separate process opens the lake with medlake (which finishes or cleans up
   what the kill left) and checks cross-table consistency: every annotation's, split's,
   fingerprint's, embedding's and cluster's image exists; each root version's image count
   equals its split scheme's rows; each derived version's folder (version.json recipe hash,
   manifest rows, lineage.parquet) matches its ``versions`` and ``lineage`` rows; no verdict
   appears twice; ``read``, ``query`` and ``sql`` agree; the files it saw are classified per
   transaction as in 1. Any finding is a *half state seen by a reader*;
3. *rerun*: the stage runs again, cleanly; every file under ``lake/tables`` and
   ``lake/versions`` must have the sha256 of the clean run (leftover temporary files count
   as differences).

Children are forked from a small server process (``python tests/fault_harness.py serve``)
that imported medlake, torch and LanceDB once, so a trial costs the stage's work, not the
imports. ``legacy=True`` emulates the old publication (each file renamed on its own, no
intent file, no recovery): the baseline of ``bench/faults.py``.

Used by ``tests/test_fault_injection.py`` (a few trials per stage) and ``bench/faults.py``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "fingerprint", "embed", "duplicates", "materialize", "compact")
RECIPE = "synth-derm-clean"
KEEP_ROWS = 0.7  # the first phase ingests this share of each manifest
IGNORED = {"tables/reviews/ui/.compact.lock"}  # the compaction's lock file, not data
PRELOAD = ("lancedb", "torch", "medlake.catalog.reviews", "medlake.demo.synthetic",
           "medlake.pipelines.duplicates", "medlake.pipelines.embed",
           "medlake.pipelines.fingerprint", "medlake.pipelines.ingest",
           "medlake.pipelines.materialize")


# --- the server: forks the children that run stages and readers ---------------------------
def serve() -> None:
    """Read one JSON request per line from stdin; fork a child per request; reply on stdout.

    Replies ``{"pid": ...}`` when the child started and ``{"pid", "rc", "wall_s"}`` when it
    ended (``rc`` -9: killed). ``kill_after`` (seconds) makes this process kill the child
    then (it is still unreaped, so its pid cannot have been reused); ``timeout`` likewise.
    """
    import warnings

    warnings.filterwarnings("ignore", message=".*fork support is experimental.*")
    # imported once here, never used here (so forking stays safe)
    for mod in PRELOAD:
        importlib.import_module(mod)

    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: its prints go to stderr, the reply channel stays clean
            os.dup2(2, 1)
            code = 1
            try:
                code = _child(req)
            except BaseException:  # noqa: BLE001 - reported on stderr, exit code 1
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        deadline = t0 + float(req.get("timeout", 600))
        kill_at = t0 + float(req["kill_after"]) if req.get("kill_after") is not None else None
        status = None
        while status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                break
            now = time.monotonic()
            if (kill_at is not None and now >= kill_at) or now >= deadline:
                os.kill(pid, signal.SIGKILL)
                kill_at = None
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.002)
        out.write(json.dumps({"pid": pid, "rc": os.waitstatus_to_exitcode(status),
                              "wall_s": round(time.monotonic() - t0, 3)}) + "\n")
        out.flush()


def _child(req: dict[str, Any]) -> int:
    os.environ.pop("MEDLAKE_FAULT", None)
    if req.get("legacy"):
        legacy_patch()
    ws = Path(req["ws"])
    if req["cmd"] == "setup":
        setup_workspace(ws, n_captures=int(req["n_captures"]))
    elif req["cmd"] == "run":
        if req.get("fault"):
            os.environ["MEDLAKE_FAULT"] = req["fault"]
        run_stage(req["stage"], ws)
    elif req["cmd"] == "read":
        Path(req["out"]).write_text(json.dumps(read_check(ws)))
    else:
        raise ValueError(f"unknown request {req['cmd']!r}")
    return 0


def legacy_patch() -> None:
    """Emulate the old publication: each file renamed on its own, no intent, no recovery."""
    from medlake.catalog import tables

    def commit_without_intent(self: Any, ops: list[list[str]]) -> None:
        lake = self.store.dir.parent
        self._published = True
        tables._log_commit(lake, [[o[0], *(tables._rel(lake, x) for x in o[1:])] for o in ops])
        tables.apply_ops(lake, ops)
        tables._log_commit(lake, None)

    tables.Transaction._commit = commit_without_intent
    tables._recover_once = lambda tables_dir: None


# --- the workspace and the stages -----------------------------------------------------------
def setup_workspace(ws: Path, *, n_captures: int) -> None:
    """A bare workspace (``.dvc/``, no git) with synthetic data, params and one recipe.

    The manifests start truncated (:data:`KEEP_ROWS`); the full ones are kept beside them
    as ``*.full`` (:func:`use_full_manifests` swaps them in).
    """
    import yaml

    from medlake.demo.synthetic import generate

    (ws / ".dvc").mkdir(parents=True, exist_ok=True)
    data = ws / "data" / "synthetic"
    generate(data, n_captures=n_captures, seed=0, overwrite=True)
    for name in ("derm_manifest.csv", "cxr_manifest.csv"):
        p = data / name
        lines = p.read_text().splitlines(keepends=True)
        shutil.copyfile(p, p.with_name(p.name + ".full"))
        p.write_text("".join(lines[:1 + int((len(lines) - 1) * KEEP_ROWS)]))
    (ws / "params.yaml").write_text(yaml.safe_dump({
        "ingest": [{"format": "generic", "path": "data/synthetic/derm.yaml"},
                   {"format": "generic", "path": "data/synthetic/cxr.yaml"}],
        "duplicates": {"workers": 1},
        "materialize": {"recipes": [RECIPE]},
    }, sort_keys=False))
    rec = yaml.safe_load((REPO / "recipes" / f"{RECIPE}.yaml").read_text())
    rec["export"] = {"images": True, "sizes": [16], "npz": "dx"}
    (ws / "recipes").mkdir(exist_ok=True)
    (ws / "recipes" / f"{RECIPE}.yaml").write_text(yaml.safe_dump(rec, sort_keys=False))


def use_full_manifests(ws: Path) -> None:
    data = ws / "data" / "synthetic"
    for name in ("derm_manifest.csv", "cxr_manifest.csv"):
        shutil.copyfile(data / (name + ".full"), data / name)


def run_stage(stage: str, ws: Path) -> None:
    """Run one stage as its command does (``record`` adds six verdict files)."""
    from medlake.catalog import Catalog, Workspace, reviews
    from medlake.pipelines import duplicates, embed, fingerprint, ingest, materialize

    cat = Catalog(Workspace(ws))
    mods = {"ingest": ingest, "fingerprint": fingerprint, "embed": embed,
            "duplicates": duplicates}
    if stage == "ingest":
        ingest.run_all(cat, processes=1, echo=lambda m: None)
    elif stage in ("fingerprint", "embed", "duplicates"):
        mods[stage].run(cat)
    elif stage == "materialize":
        materialize.run(cat, RECIPE)
    elif stage == "compact":
        reviews.compact(cat)
    elif stage == "record":
        ids = cat.read("images", columns=["image_id"]).sort("image_id")["image_id"].to_list()
        for i, iid in enumerate(ids[:6]):
            reviews.record(cat, reviews.image_verdict(iid, ("ok", "outlier")[i % 2], "ana"))
    else:
        raise ValueError(f"unknown stage {stage!r}")
    if stage in mods:
        mods[stage].DECLARATION.ensure_outputs(cat)


def read_check(ws: Path) -> dict[str, Any]:
    """Open the lake with medlake and list every cross-table inconsistency found."""
    import polars as pl

    from medlake.catalog import Catalog, Workspace

    cat = Catalog(Workspace(ws))  # opening the lake recovers what a killed writer left
    problems: list[str] = []

    def n(sql: str) -> int:
        return int(cat.query(sql).item())

    for what, sql in [
        ("annotations without an image",
         "SELECT count(*) FROM annotations ANTI JOIN images USING (image_id)"),
        ("splits without an image", "SELECT count(*) FROM splits ANTI JOIN images USING (image_id)"),
        ("fingerprints without an image",
         "SELECT count(*) FROM fingerprints ANTI JOIN images USING (image_id)"),
        ("embeddings without a fingerprint",
         "SELECT count(*) FROM embeddings ANTI JOIN fingerprints USING (image_id)"),
        ("clusters without an image",
         "SELECT count(*) FROM clusters ANTI JOIN images USING (image_id)"),
        ("pairs without an image", ("SELECT count(*) FROM pairs p WHERE p.image_a NOT IN "
                                    "(SELECT image_id FROM images) OR p.image_b NOT IN "
                                    "(SELECT image_id FROM images)")),
        ("verdict rows repeated", "SELECT count(*) - count(DISTINCT review_id) FROM reviews"),
    ]:
        k = n(sql)
        if k:
            problems.append(f"{k} {what}")
    roots = cat.query("""
        SELECT v.name, v.n_images,
               CASE WHEN v.scheme IS NULL
                    THEN (SELECT count(*) FROM images i WHERE i.dataset_id = v.dataset_id)
                    ELSE (SELECT count(*) FROM splits s WHERE s.dataset_id = v.dataset_id
                                                          AND s.scheme = v.scheme) END AS n
        FROM versions v WHERE v.kind = 'root'""")
    for name, want, got in roots.iter_rows():
        if want != got:
            problems.append(f"root version {name}: versions says {want} images, the "
                            f"images/splits tables hold {got}")
    rows = cat.query("SELECT name, recipe_hash, n_images FROM versions WHERE kind = 'derived'")
    named = set(rows["name"].to_list())
    for name, recipe_hash, n_images in rows.iter_rows():
        folder = cat.ws.versions_dir / name
        if not (folder / "version.json").is_file():
            problems.append(f"version {name}: a versions row but no folder")
            continue
        meta = json.loads((folder / "version.json").read_text())
        if meta.get("recipe_hash") != recipe_hash:
            problems.append(f"version {name}: folder recipe hash differs from its versions row")
        m = pl.read_parquet(folder / "manifest.parquet").height
        if m != n_images:
            problems.append(f"version {name}: manifest has {m} rows, versions says {n_images}")
        lin_f = pl.read_parquet(folder / "lineage.parquet")
        lin_t = cat.query("SELECT * FROM lineage WHERE version = ?", [name]).select(lin_f.columns)
        key = ["image_id", "rule", "step"]
        if not lin_f.sort(key).equals(lin_t.sort(key)):
            problems.append(f"version {name}: lineage.parquet has {lin_f.height} rows, the "
                            f"lineage table {lin_t.height} (or other rows)")
    if cat.ws.versions_dir.is_dir():
        for folder in sorted(cat.ws.versions_dir.iterdir()):  # hidden: temporary, no version
            if (not folder.name.startswith(".") and (folder / "version.json").is_file()
                    and folder.name not in named):
                problems.append(f"version folder {folder.name} without a versions row")
    by = {"read": cat.read("images").height, "query": n("SELECT count(*) FROM images"),
          "sql": cat.sql("SELECT count(*) AS n FROM images").column("n")[0].as_py()}
    if len(set(by.values())) != 1:
        problems.append(f"readers disagree on the image count: {by}")
    return {"problems": problems, "images": by["query"]}


# --- files and transactions -----------------------------------------------------------------
def hash_tree(ws: Path) -> dict[str, str]:
    """sha256 of every file under ``lake/tables`` and ``lake/versions`` (keys relative to lake)."""
    lake = ws / "lake"
    out = {}
    for sub in ("tables", "versions"):
        for root, _dirs, files in os.walk(lake / sub):
            for f in files:
                p = Path(root) / f
                rel = p.relative_to(lake).as_posix()
                if rel not in IGNORED:
                    out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _dir_digest(hashes: dict[str, str], rel: str) -> str | None:
    items = sorted((k[len(rel) + 1:], v) for k, v in hashes.items() if k.startswith(rel + "/"))
    return hashlib.sha256(json.dumps(items).encode()).hexdigest() if items else None


def _member(hashes: dict[str, str], op: list[str]) -> tuple[str, str | None]:
    """(final path, its state in ``hashes``) of a commit operation."""
    if op[0] == "dir":
        return op[2], _dir_digest(hashes, op[2])
    path = op[2] if op[0] == "file" else op[1]
    return path, hashes.get(path)


def half_states(hashes: dict[str, str], before: dict[str, str], after: dict[str, str],
                commits: list[list[list[str]]]) -> list[str]:
    """The clean run's transactions that ``hashes`` shows partly old and partly new."""
    out = []
    for ops in commits:
        old, new = [], []
        for op in ops:
            path, now = _member(hashes, op)
            _, was = _member(before, op)
            _, will = _member(after, op)
            if was == will:
                continue  # unchanged by the stage: says nothing
            if now == was:
                old.append(path)
            elif now == will:
                new.append(path)
        if old and new:
            out.append(f"old {old[:3]} with new {new[:3]}")
    return out


def differences(hashes: dict[str, str], want: dict[str, str]) -> list[str]:
    """Files that differ from, are missing from or are extra to ``want``."""
    out = [f"differs: {k}" for k in sorted(want) if k in hashes and hashes[k] != want[k]]
    out += [f"missing: {k}" for k in sorted(want) if k not in hashes]
    out += [f"extra: {k}" for k in sorted(hashes) if k not in want]
    return out


def parse_log(path: Path) -> tuple[list[list[list[str]]], list[dict[str, Any]]]:
    """(commits, steps) of a ``MEDLAKE_FAULT=log:PATH`` file.

    Each step gets ``commit``: the index of the commit whose publication it belongs to
    (None for a step outside any commit, e.g. an atomic single-file write).
    """
    commits: list[list[list[str]]] = []
    steps: list[dict[str, Any]] = []
    current = None
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "commit" in rec:
                commits.append(rec["commit"])
                current = len(commits) - 1
            elif "end" in rec:
                current = None
            else:
                steps.append({**rec, "commit": current})
    return commits, steps


def mid_commit_step(steps: list[dict[str, Any]]) -> int:
    """The step that, killed before, leaves the largest commit half applied.

    In the commit with the most renames and deletions, the middle one (after the intent's
    rename, the commit point, where there is one); a commit of one file: before its rename.
    """
    by: dict[int, list[int]] = {}
    for s in steps:
        if s["commit"] is not None and not s["path"].endswith(".intent"):
            by.setdefault(s["commit"], []).append(s["n"])
    if not by:
        return steps[len(steps) // 2]["n"] if steps else 1
    ops = max(by.values(), key=len)
    return ops[len(ops) // 2]


# --- trials ---------------------------------------------------------------------------------
@dataclass
class Trial:
    """One kill and what followed."""

    stage: str
    fault: str
    legacy: bool
    killed: bool
    raw_half: list[str] = field(default_factory=list)
    half: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    diffs: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def half_seen(self) -> bool:
        """A reader saw a half state (by transaction or by a cross-table check)."""
        return bool(self.half or self.problems)

    def line(self) -> str:
        return (f"{self.stage:<11} {'legacy' if self.legacy else 'intent'} {self.fault:<22} "
                f"killed={int(self.killed)} raw_half={len(self.raw_half)} "
                f"reader_half={int(self.half_seen)} diffs={len(self.diffs)}"
                + (f"  {self.half[:1] + self.problems[:2] + self.diffs[:2]}"
                   if self.half_seen or self.diffs else ""))


@dataclass
class Reference:
    """A stage's before-state (a copy of the workspace), clean result and commits."""

    stage: str
    snapshot: Path
    before: dict[str, str]
    after: dict[str, str]
    commits: list[list[list[str]]]
    steps: list[dict[str, Any]]
    wall_s: float


class Harness:
    """Prepares the workspaces once, then runs trials (see the module docstring).

    Parameters
    ----------
    work
        An empty folder for the workspace, snapshots and logs.
    n_captures
        Synthetic captures (about 1.6 images each, two modalities).
    legacy
        Emulate the old single-rename-per-file publication in every child.
    """

    def __init__(self, work: Path, *, n_captures: int = 16, legacy: bool = False,
                 echo: Any = None) -> None:
        self.work = Path(work)
        self.ws = self.work / "ws"
        self.n_captures = n_captures
        self.legacy = legacy
        self.echo = echo or (lambda m: None)
        self.refs: dict[str, Reference] = {}
        self._proc: subprocess.Popen[str] | None = None
        self._n = 0

    # the server process
    def _server(self) -> subprocess.Popen[str]:
        if self._proc is None or self._proc.poll() is not None:
            env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "HF_HUB_OFFLINE": "1"}
            env.pop("MEDLAKE_FAULT", None)
            self._stderr = open(self.work / "server.log", "a")  # noqa: SIM115 - closed in close()
            self._proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "serve"], cwd=self.work,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                env=env)
        return self._proc

    def call(self, req: dict[str, Any]) -> dict[str, Any]:
        """Send one request to the server; wait for its child to end."""
        proc = self._server()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"legacy": self.legacy, **req}) + "\n")
        proc.stdin.flush()
        started = proc.stdout.readline()
        ended = proc.stdout.readline()
        if not started or not ended:
            raise RuntimeError(f"the fault server stopped; see {self.work / 'server.log'}")
        return json.loads(ended)

    def _ok(self, req: dict[str, Any]) -> dict[str, Any]:
        res = self.call(req)
        if res["rc"] != 0:
            tail = (self.work / "server.log").read_text()[-3000:]
            raise RuntimeError(f"{req} failed (exit {res['rc']}):\n{tail}")
        return res

    def close(self) -> None:
        """Stop the server (by its process id) and close its log."""
        if self._proc is not None:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
            self._stderr.close()
            self._proc = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # preparing
    def prepare(self) -> None:
        """Build the two phases and a :class:`Reference` per stage (clean runs, logged)."""
        self.work.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.ws, ignore_errors=True)
        self._ok({"cmd": "setup", "ws": str(self.ws), "n_captures": self.n_captures})
        for s in STAGES[:-1]:  # phase 1: truncated manifests
            self._ok({"cmd": "run", "stage": s, "ws": str(self.ws)})
        use_full_manifests(self.ws)
        for s in STAGES:  # phase 2: the full manifests; a reference per stage
            if s == "compact":
                self._ok({"cmd": "run", "stage": "record", "ws": str(self.ws)})
            snap = self.work / "snap" / s
            shutil.rmtree(snap, ignore_errors=True)
            _copy_ws(self.ws, snap)
            before = hash_tree(self.ws)
            log = self.work / f"{s}.log"
            log.unlink(missing_ok=True)
            res = self._ok({"cmd": "run", "stage": s, "ws": str(self.ws), "fault": f"log:{log}"})
            commits, steps = parse_log(log)
            self.refs[s] = Reference(s, snap, before, hash_tree(self.ws), commits, steps,
                                     res["wall_s"])
            self.echo(f"reference {s}: {len(commits)} commits, {len(steps)} steps, "
                      f"{res['wall_s']:.2f} s")

    # one trial
    def trial(self, stage: str, *, step: int | None = None, kill_after: float | None = None,
              delay: float = 0.0) -> Trial:
        """Kill ``stage`` before its ``step``-th rename/deletion, or after ``kill_after`` s
        (each step slowed by ``delay`` s); then check raw files, a reader and a rerun."""
        ref = self.refs[stage]
        t0 = time.monotonic()
        shutil.rmtree(self.ws, ignore_errors=True)
        _copy_ws(ref.snapshot, self.ws)
        fault = f"step:{step}" if step is not None else (f"delay:{delay}" if delay else "")
        res = self.call({"cmd": "run", "stage": stage, "ws": str(self.ws), "fault": fault,
                         "kill_after": kill_after})
        label = fault if step is not None else f"random {kill_after:.2f}s"
        tr = Trial(stage, label, self.legacy, killed=res["rc"] == -signal.SIGKILL)
        if res["rc"] not in (0, -signal.SIGKILL):
            tr.problems.append(f"the stage failed with exit code {res['rc']}")
        raw = hash_tree(self.ws)
        tr.raw_half = half_states(raw, ref.before, ref.after, ref.commits)
        self._n += 1
        out = self.work / f"read-{self._n}.json"
        rd = self.call({"cmd": "read", "ws": str(self.ws), "out": str(out)})
        if rd["rc"] != 0:
            tr.problems.append(f"the reader failed (exit {rd['rc']}); see server.log")
        else:
            tr.problems += json.loads(out.read_text())["problems"]
        tr.half = half_states(hash_tree(self.ws), ref.before, ref.after, ref.commits)
        self._ok({"cmd": "run", "stage": stage, "ws": str(self.ws)})
        tr.diffs = differences(hash_tree(self.ws), ref.after)
        tr.seconds = round(time.monotonic() - t0, 2)
        self.echo(tr.line())
        return tr

    def plan(self, stage: str, *, every_step: bool, random_kills: int, seed: int = 0,
             delay: float = 0.05) -> Iterator[dict[str, Any]]:
        """Trial arguments: every step (or the mid-commit one) plus random kills."""
        ref = self.refs[stage]
        if every_step:
            for s in ref.steps:
                yield {"step": s["n"]}
        elif ref.steps:
            yield {"step": mid_commit_step(ref.steps)}
        rng = random.Random(f"{seed}-{stage}")
        span = ref.wall_s + delay * len(ref.steps)
        for _ in range(random_kills):
            yield {"kill_after": round(rng.uniform(0.1 * span, span), 3), "delay": delay}


def _copy_ws(src: Path, dst: Path) -> None:
    """Copy a workspace: the lake byte by byte, the input data as hard links."""
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.name == "data":
            shutil.copytree(item, dst / item.name, copy_function=os.link)
        elif item.is_dir():
            shutil.copytree(item, dst / item.name, symlinks=True)
        else:
            shutil.copy2(item, dst / item.name)


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        serve()
    else:
        sys.exit("usage: python tests/fault_harness.py serve  (used by the harness)")
