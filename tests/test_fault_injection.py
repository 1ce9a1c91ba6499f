"""Crash safety: a writer killed at any moment never leaves readers a half-published commit.

Real processes killed with SIGKILL (``MEDLAKE_FAULT``, see ``catalog.tables.fault_point``),
real Parquet files, real stages on a small synthetic workspace (``tests/fault_harness.py``).
On the old code (each file renamed on its own, no intent file, no recovery) the mid-commit
kills below leave images and splits (or a version folder and its rows, or merged and
original verdict files) disagreeing, and temporary files behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from fault_harness import STAGES, Harness

from medlake.catalog import Catalog, Workspace
from medlake.catalog import tables as T
from medlake.catalog.workspace import DVCIGNORE_LINES, write_dvcignore

REPO = Path(__file__).resolve().parents[1]

# a writer replacing three tables of one ingest: 185 images where the lake holds 135
WRITER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import polars as pl
    from medlake.catalog import Catalog, Workspace
    cat = Catalog(Workspace(Path(sys.argv[1])))
    for n in json.loads(sys.argv[2]):
        ids = [f"d:{i}" for i in range(n)]
        with cat.transaction() as tx:
            tx.write("images", pl.DataFrame({"image_id": ids, "dataset_id": ["d"] * n}),
                     stage="ingest", partition="d")
            tx.write("splits", pl.DataFrame({"image_id": ids, "scheme": ["s"] * n,
                                             "dataset_id": ["d"] * n, "split": ["train"] * n}),
                     stage="ingest", partition="d")
            tx.write("versions", [{"name": "d@s", "dataset_id": "d", "kind": "root",
                                   "scheme": "s", "n_images": n}], stage="ingest", partition="d")
""")


def _write(cat: Catalog, n: int, *, fault: str | None = None, rounds: list[int] | None = None,
           check: bool = True) -> int:
    env = {k: v for k, v in os.environ.items() if k != T.FAULT_ENV}
    if fault:
        env[T.FAULT_ENV] = fault
    res = subprocess.run([sys.executable, "-c", WRITER, str(cat.ws.root), json.dumps(rounds or [n])],
                         env=env, capture_output=True, text=True, check=False)
    if check:
        assert res.returncode == 0, res.stderr
    return res.returncode


def _raw_rows(cat: Catalog, table: str) -> int:
    """Rows of a table as a plain reader of the final files sees them (no medlake)."""
    files = sorted((cat.ws.tables_dir / table).rglob("*.parquet"))
    return sum(pq.read_metadata(f).num_rows for f in files)


def _counts(cat: Catalog) -> tuple[int, int, int]:
    row = cat.query("SELECT (SELECT count(*) FROM images) AS i, (SELECT count(*) FROM splits) "
                    "AS s, (SELECT max(n_images) FROM versions) AS v").row(0)
    return int(row[0]), int(row[1]), int(row[2])


def _leftovers(root: Path) -> list[str]:
    """Temporary files and folders, intents: what a finished or recovered lake must not hold."""
    return sorted(str(p.relative_to(root)) for p in (root / "lake").rglob("*")
                  if (p.name.startswith(".") and p.name != T.JOURNAL) or p.suffix == ".intent")


def test_kill_after_commit_point_is_rolled_forward(catalog: Catalog):
    """Killed between the images and the splits rename: readers see all 185 rows everywhere."""
    _write(catalog, 135)
    # step 1 renames the intent (the commit point), 2 the images file, 3 the splits file
    assert _write(catalog, 185, fault="rename:3", check=False) == -9
    assert (_raw_rows(catalog, "images"), _raw_rows(catalog, "splits")) == (185, 135)  # half
    assert list((catalog.ws.tables_dir / T.JOURNAL).glob("*.intent"))
    fresh = Catalog(Workspace(catalog.ws.root))  # any process opening the lake recovers
    assert _counts(fresh) == (185, 185, 185)
    assert fresh.read("splits").height == 185
    assert fresh.sql("SELECT count(*) AS n FROM versions").column("n")[0].as_py() == 1
    assert (_raw_rows(catalog, "images"), _raw_rows(catalog, "splits")) == (185, 185)
    assert _leftovers(catalog.ws.root) == []


def test_reader_alone_finishes_a_dead_commit(catalog: Catalog):
    """A process that only reads (a new TableStore, listing files) sees the whole commit."""
    _write(catalog, 135)
    assert _write(catalog, 185, fault="rename:4", check=False) == -9
    store = T.TableStore(catalog.ws.tables_dir)
    assert store.read("versions")["n_images"].to_list() == [185]
    assert store.read("images").height == store.read("splits").height == 185


def test_kill_before_commit_point_publishes_nothing(catalog: Catalog):
    """Killed before the intent is renamed: the old state stays and temp files are removed."""
    _write(catalog, 135)
    assert _write(catalog, 185, fault="rename:1", check=False) == -9
    assert len(list(catalog.ws.tables_dir.rglob(".*.tmp"))) == 4  # 3 tables + the intent
    fresh = Catalog(Workspace(catalog.ws.root))
    assert _counts(fresh) == (135, 135, 135)
    assert _leftovers(catalog.ws.root) == []


@pytest.mark.parametrize("step", [1, 2, 3, 4, 5])
def test_every_step_gives_old_or_new(catalog: Catalog, step: int):
    _write(catalog, 135)
    rc = _write(catalog, 185, fault=f"step:{step}", check=False)
    assert rc == -9
    assert _counts(Catalog(Workspace(catalog.ws.root))) in ((135, 135, 135), (185, 185, 185))
    _write(catalog, 185)  # the rerun
    assert _counts(catalog) == (185, 185, 185) and _leftovers(catalog.ws.root) == []


def test_readers_wait_for_a_live_commit(catalog: Catalog):
    """A writer renaming slowly (0.15 s per step): concurrent readers never see a mix."""
    _write(catalog, 135)
    env = {**os.environ, T.FAULT_ENV: "delay:0.15"}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(catalog.ws.root),
                             json.dumps([185, 160, 185])], env=env)
    seen: set[tuple[int, int, int]] = set()
    try:
        while proc.poll() is None:
            seen.add(_counts(catalog))
            i, s = catalog.read("images").height, catalog.read("splits").height
            assert i in (135, 160, 185) and s in (135, 160, 185)
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
        proc.wait()
    assert proc.returncode == 0
    assert seen <= {(135, 135, 135), (160, 160, 160), (185, 185, 185)}, seen
    assert len(seen) >= 2  # the readers did run while the writer committed


def test_folder_swap_and_rows_are_one_commit(catalog: Catalog):
    """A version folder published with its rows: killed between, both come out new."""
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        from medlake.catalog import Catalog, Workspace
        from medlake.pipelines import export
        cat = Catalog(Workspace(Path(sys.argv[1])))
        tag = sys.argv[2]
        tx = cat.transaction()
        with export.atomic_dir(cat.ws.versions_dir / "v", tx=tx) as tmp:
            (tmp / "version.json").write_text(tag)
        with tx:
            tx.write("versions", [{"name": "v", "recipe_hash": tag}], stage="materialize",
                     partition="v")
    """)

    def run(tag: str, fault: str | None = None) -> int:
        env = {k: v for k, v in os.environ.items() if k != T.FAULT_ENV}
        if fault:
            env[T.FAULT_ENV] = fault
        return subprocess.run([sys.executable, "-c", script, str(catalog.ws.root), tag],
                              env=env, check=False).returncode

    assert run("old") == 0
    # steps: 1 intent, 2 folder aside, 3 new folder in, 4 old folder removed, 5 the row
    for step in (2, 3, 4, 5, 6):
        assert run("new", f"step:{step}") == -9
        cat = Catalog(Workspace(catalog.ws.root))
        row = cat.read("versions")["recipe_hash"].to_list()
        assert row == [(cat.ws.versions_dir / "v" / "version.json").read_text()] == ["new"]
        assert _leftovers(catalog.ws.root) == []
        assert run("old") == 0


def test_orphans_of_dead_writers_are_removed_live_ones_kept(tmp_path: Path):
    root = tmp_path / "ws"
    stage = root / "lake" / "tables" / "images" / "ingest"
    versions = root / "lake" / "versions"
    stage.mkdir(parents=True)
    (versions / "v").mkdir(parents=True)
    (versions / "w" / "x").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    live = str(os.getpid())
    names = {
        stage / f".d.parquet.{dead}-0123abcd.tmp": False,  # False: removed
        stage / f".e.parquet.{live}-0123abcd.tmp": True,
        root / "lake" / "tables" / T.JOURNAL / f".intent.{dead}-0123456789ab.tmp": False,
        versions / f".v.tmp-{dead}-0123abcd": False,
        versions / f".w.tmp-{live}-0123abcd": True,
        versions / f".v.old-{dead}-0123abcd": False,  # v exists: the old copy goes
        versions / f".u.old-{dead}-0123abcd": False,  # u missing: restored as u
    }
    for p in names:
        if ".tmp-" in p.name or ".old-" in p.name:
            p.mkdir(parents=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x")
    (root / ".dvc").mkdir()
    Catalog(Workspace(root))  # opening the lake cleans
    assert {p: p.exists() for p in names} == names
    assert (versions / "u").is_dir() and (versions / "v").is_dir()


def test_dvcignore_written_by_init_and_in_repository(workspace: Workspace):
    text = (workspace.root / ".dvcignore").read_text().splitlines()
    assert all(line in text for line in DVCIGNORE_LINES)
    assert all(line in (REPO / ".dvcignore").read_text().splitlines() for line in DVCIGNORE_LINES)
    write_dvcignore(workspace.root)  # idempotent
    assert (workspace.root / ".dvcignore").read_text().splitlines() == text
    dvc = Path(sys.executable).parent / "dvc"
    for rel, ignored in [("lake/tables/images/ingest/.d.parquet.123-0123abcd.tmp", True),
                         ("lake/versions/.v.tmp-123-0123abcd", True),
                         ("lake/versions/.v.old-123-0123abcd", True),
                         ("lake/tables/.journal/123-0123456789ab.intent", True),
                         ("lake/tables/images/ingest/d.parquet", False)]:
        res = subprocess.run([str(dvc), "check-ignore", rel], cwd=workspace.root,
                             capture_output=True, text=True, check=False)
        assert (res.returncode == 0) == ignored, (rel, res.stdout, res.stderr)


# --- the stages, killed in a child process (tests/fault_harness.py) --------------------------
@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory):
    h = Harness(tmp_path_factory.mktemp("faults"), n_captures=16)
    try:
        h.prepare()
        yield h
    finally:
        h.close()


@pytest.mark.parametrize("stage", STAGES)
def test_stage_killed_mid_commit_and_at_random(harness: Harness, stage: str):
    """A kill in the middle of the stage's largest commit and one at a random moment: the
    reader sees no half state, and the rerun's files are byte-identical to a clean run's."""
    trials = [harness.trial(stage, **args)
              for args in harness.plan(stage, every_step=False, random_kills=1)]
    for tr in trials:
        print(tr.line())  # shown with -s: the figures of this run
    assert trials[0].killed  # the mid-commit kill happened
    if len(harness.refs[stage].commits[-1]) > 1:
        # on disk the commit was half renamed when the writer died: recovery finished it
        assert trials[0].raw_half, trials[0].line()
    for tr in trials:
        assert not tr.half_seen, tr.line()
        assert tr.diffs == [], tr.line()


def test_reference_runs_are_consistent(harness: Harness):
    """The clean runs themselves: every stage published, and the lake passes the checks."""
    assert set(harness.refs) == set(STAGES)
    for s, ref in harness.refs.items():
        assert ref.commits, s
        assert ref.before != ref.after, s  # the stage changed its outputs (else no trial bites)
    df = pl.DataFrame([{"stage": s, "steps": len(r.steps)} for s, r in harness.refs.items()])
    assert df["steps"].min() >= 2


def test_intent_folder_is_not_a_table(catalog: Catalog):
    catalog.write("images", pl.DataFrame({"image_id": ["a"]}), stage="ingest", partition="a")
    with catalog.transaction() as tx:
        tx.write("splits", pl.DataFrame({"image_id": ["a"], "scheme": ["s"]}), stage="ingest",
                 partition="a")
    assert (catalog.ws.tables_dir / T.JOURNAL).is_dir()
    assert list((catalog.ws.tables_dir / T.JOURNAL).iterdir()) == []
    assert catalog.sql("SELECT count(*) AS n FROM splits").column("n")[0].as_py() == 1
    # a thread holding nothing pending: settle returns at once
    t0 = time.monotonic()
    for _ in range(200):
        T.settle(catalog.ws.tables_dir)
    assert time.monotonic() - t0 < 1.0
