"""The SQL sandbox (issue 13): no writes, limits, no machine paths, broken and changing files.

Real DuckDB over real Parquet files in tmp_path. Every attack of the audit is a test here:
the write attempts leave every file under ``lake/`` byte-identical, endless queries are
stopped by the time limit, huge results by the row cap, settings and error messages show no
machine path, a broken file gives one line naming it, and readers never fail while a
writer keeps replacing a table's files.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pytest
from click.testing import CliRunner

from medlake.catalog import Catalog, SQLError, write_parquet_atomic
from medlake.catalog import sql as sqlmod
from medlake.catalog.tables import BrokenFileError, conform
from medlake.cli.main import main


def _images(tag: str, n: int) -> pl.DataFrame:
    return pl.DataFrame({
        "image_id": [f"{tag}:{i}" for i in range(n)], "dataset_id": [tag] * n,
        "group_id": [f"{tag}:g{i % 7}" for i in range(n)],
    })


@pytest.fixture
def lake(catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> Catalog:
    """A small lake; the current folder is the workspace root (relative paths hit lake/)."""
    catalog.write("images", _images("d", 3), stage="ingest", partition="d")
    catalog.write("datasets", pl.DataFrame({"dataset_id": ["d"], "name": ["D"]}),
                  stage="ingest", partition="d")
    monkeypatch.chdir(catalog.ws.root)
    return catalog


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (folders as None) with its bytes."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


# --- 1. nothing can be written -------------------------------------------------------------
WRITES = [
    "EXPLAIN ANALYZE COPY (SELECT * FROM images) TO 'lake/tables/images/ingest/x.parquet'",
    "EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{lake}/tables/images/ingest/x.parquet'",
    "EXPLAIN (ANALYZE, FORMAT json) COPY (SELECT 1 AS a) TO 'lake/x.parquet'",
    "EXPLAIN ANALYSE COPY images TO 'lake/tables/images/ingest/d.parquet' (FORMAT parquet)",
    "explain   analyze\n  copy (select 1) to 'lake/x.csv'",
    "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
    "EXPLAIN ANALYZE INSERT INTO images (image_id) VALUES ('x')",
    "EXPLAIN ANALYZE ATTACH 'lake/x.duckdb'",
    "/* hidden */ EXPLAIN ANALYZE COPY (SELECT 1) TO 'lake/x.csv'",
    "COPY (SELECT 1) TO 'lake/tables/images/ingest/x.parquet'",
    "COPY images TO 'lake/out.csv'",
    "ATTACH 'lake/x.duckdb' AS x",
    "INSTALL httpfs",
    "LOAD parquet",
    "SET enable_external_access = true",
    "RESET lock_configuration",
    "PRAGMA enable_profiling",
    "CALL duckdb_settings()",
    "CREATE TABLE t AS SELECT 1",
    "CREATE VIEW v AS SELECT 1",
    "DROP VIEW images",
    "EXPORT DATABASE 'lake/export'",
    "CHECKPOINT",
    "SELECT 1; COPY (SELECT 1) TO 'lake/x.csv'",
    "SELECT * FROM query('COPY (SELECT 1) TO ''lake/x.csv''')",
    "SELECT * FROM read_parquet('lake/tables/images/ingest/d.parquet')",
]


@pytest.mark.parametrize("query", WRITES)
def test_write_attempts_leave_the_lake_byte_identical(lake: Catalog, query: str):
    before = _snapshot(lake.ws.root)
    with pytest.raises(SQLError) as info:
        lake.sql(query.replace("{lake}", str(lake.ws.lake)))
    assert "Traceback" not in str(info.value)
    assert _snapshot(lake.ws.root) == before
    assert lake.sql("SELECT count(*) AS n FROM images").to_pylist() == [{"n": 3}]


def test_sandbox_connection_itself_cannot_write(lake: Catalog):
    """Even SQL that skipped the statement check cannot touch a file: the engine refuses."""
    before = _snapshot(lake.ws.root)
    target = lake.ws.tables_dir / "images" / "ingest" / "x.parquet"
    con = sqlmod.connect(lake.ws.tables_dir, sandbox=True)
    try:
        assert con.sql("SELECT count(*) FROM images").fetchall() == [(3,)]
        for stmt in [
            f"COPY (SELECT 1 AS a) TO '{target}'",
            f"EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{target}'",
            "COPY (SELECT 1 AS a) TO 'lake/tables/images/ingest/x.parquet'",
            f"ATTACH '{lake.ws.lake}/x.duckdb' AS x",
            "SET enable_external_access = true",
            "SET allowed_directories = ['/']",
            "SET temp_directory = 'lake'",
            f"SELECT * FROM read_parquet('{target.with_name('d.parquet')}')",
        ]:
            with pytest.raises(duckdb.Error):
                con.execute(stmt).fetchall()
    finally:
        con.close()
    assert _snapshot(lake.ws.root) == before


@pytest.mark.parametrize("query", [
    "SELECT dataset_id, count(*) AS n FROM images GROUP BY 1",
    "WITH x AS (SELECT * FROM images) SELECT count(*) FROM x",
    "FROM images",
    "VALUES (1), (2)",
    "DESCRIBE images",
    "SHOW TABLES",
    "SUMMARIZE images",
    "EXPLAIN SELECT * FROM images",
    "EXPLAIN ANALYZE SELECT count(*) FROM images",
    "SELECT 1;",
])
def test_read_statements_are_accepted(lake: Catalog, query: str):
    assert lake.sql(query).num_rows > 0


# --- 2. limits -----------------------------------------------------------------------------
def test_huge_result_is_capped_in_the_engine(lake: Catalog):
    t0 = time.monotonic()
    at = lake.sql("SELECT * FROM range(1000000000)", limit=1000)
    assert at.num_rows == 1000
    assert sqlmod.row_cap(at) == 1000
    at = lake.sql("SELECT * FROM range(1000000000) t(n)")  # the default cap
    assert at.num_rows == sqlmod.DEFAULT_ROW_CAP
    assert sqlmod.row_cap(at) == sqlmod.DEFAULT_ROW_CAP
    assert time.monotonic() - t0 < 60  # generous: fetching 1e9 rows would take far longer


def test_limit_does_not_fetch_everything_and_says_when_it_cut(lake: Catalog):
    at = lake.sql("SELECT image_id FROM images ORDER BY 1", limit=2)
    assert at.column("image_id").to_pylist() == ["d:0", "d:1"]
    assert sqlmod.row_cap(at) == 2
    at = lake.sql("SELECT image_id FROM images", limit=3)
    assert at.num_rows == 3 and sqlmod.row_cap(at) is None
    at = lake.sql("SELECT image_id FROM images", limit=0)
    assert at.num_rows == 0 and sqlmod.row_cap(at) == 0


def test_endless_recursive_query_is_stopped_by_the_time_limit(lake: Catalog):
    t0 = time.monotonic()
    with pytest.raises(SQLError, match=r"time limit of 2 s.*--timeout") as info:
        lake.sql("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
                 "SELECT count(*) FROM r", timeout_s=2)
    assert time.monotonic() - t0 < 30
    assert "timeout_s" in str(info.value)


def test_slow_join_is_stopped_by_the_time_limit(lake: Catalog):
    t0 = time.monotonic()
    with pytest.raises(SQLError, match="time limit"):
        lake.sql("SELECT count(*) FROM range(100000000) a, range(100000000) b "
                 "WHERE a.range + b.range = -1", timeout_s=1)
    assert time.monotonic() - t0 < 30


def test_memory_limit_stops_a_query_and_nothing_spills(lake: Catalog, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    with pytest.raises(SQLError, match=r"memory.*64MB.*--memory-limit"):
        lake.sql("SELECT list(range) FROM range(100000000)", memory_limit="64MB")
    with pytest.raises(SQLError, match=r"memory.*64MB"):
        lake.sql("SELECT range, count(*) FROM range(20000000) GROUP BY 1 ORDER BY 2 DESC",
                 memory_limit="64MB")
    assert list(here.iterdir()) == []  # no .tmp/ spill folder in the current folder
    assert not (lake.ws.root / ".tmp").exists()


@pytest.mark.parametrize("bad", ["lots", "1GB'; SET enable_external_access=true; --", ""])
def test_memory_limit_must_be_a_size(lake: Catalog, bad: str):
    with pytest.raises(SQLError, match="not a size"):
        lake.sql("SELECT 1", memory_limit=bad or " ")


def test_cli_limits(lake: Catalog):
    r = CliRunner()
    ws = str(lake.ws.root)
    res = r.invoke(main, ["sql", "SELECT image_id FROM images ORDER BY 1", "-w", ws,
                          "--format", "csv", "--limit", "2"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == ["image_id", "d:0", "d:1"]
    assert "capped at 2 rows" in res.stderr and "--limit" in res.stderr
    res = r.invoke(main, ["sql", "SELECT count(*) AS n FROM images", "-w", ws, "--format", "json"])
    assert res.exit_code == 0 and res.stdout.strip() == '{"n":3}' and res.stderr == ""
    endless = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT max(n) FROM r"
    res = r.invoke(main, ["sql", endless, "-w", ws, "--timeout", "1"])
    assert res.exit_code == 1
    assert "time limit of 1 s" in res.output and "--timeout" in res.output
    assert "Traceback" not in res.output
    res = r.invoke(main, ["sql", "SELECT list(range) FROM range(100000000)", "-w", ws,
                          "--memory-limit", "64MB"])
    assert res.exit_code == 1 and "--memory-limit" in res.output


# --- 3. only the lake is visible -----------------------------------------------------------
def _machine_paths(lake: Catalog, tmp_path: Path) -> set[str]:
    out = {str(Path.home()), os.getcwd(), str(tmp_path), str(lake.ws.root),
           str(lake.ws.root.resolve()), tempfile.gettempdir()}
    return {p for p in out if p not in ("", "/")}


def test_settings_hold_no_machine_paths(lake: Catalog, tmp_path: Path):
    paths = _machine_paths(lake, tmp_path)
    rows = lake.sql("SELECT name, value FROM duckdb_settings()").to_pylist()
    assert len(rows) > 50
    for row in rows:
        value = str(row["value"] or "")
        assert not any(p in value for p in paths), row
        assert not value.startswith("/"), row
    for name in ["home_directory", "temp_directory", "secret_directory", "extension_directory",
                 "allowed_directories", "allowed_paths", "file_search_path"]:
        at = lake.sql(f"SELECT current_setting('{name}')::VARCHAR AS v")
        v = at.column("v")[0].as_py() or ""
        assert not any(p in v for p in paths), (name, v)


@pytest.mark.parametrize("query", [
    "SELECT * FROM read_text('.tmp/x')",
    "SELECT * FROM read_text('lake/tables/images/ingest/d.parquet')",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_blob('{root}/.dvc')",
    "SELECT * FROM glob('*')",
    "SELECT * FROM glob('{root}/**')",
    "SELECT * FROM parquet_metadata('lake/tables/images/ingest/d.parquet')",
    "SELECT * FROM duckdb_extensions()",
    "SELECT * FROM duckdb_secrets()",
    "SELECT * FROM read_json_auto('{root}/../*.json')",
])
def test_file_functions_fail_without_showing_paths(lake: Catalog, tmp_path: Path, query: str):
    with pytest.raises(SQLError) as info:
        lake.sql(query.replace("{root}", str(lake.ws.root)))
    msg = str(info.value)
    assert not any(p in msg for p in _machine_paths(lake, tmp_path)), msg


def test_python_variables_are_not_tables(lake: Catalog):
    secret_frame = pa.table({"password": ["hunter2"]})  # noqa: F841 - must stay invisible
    with pytest.raises(SQLError, match="secret_frame"):
        lake.sql("SELECT * FROM secret_frame")


def test_derived_views_work_in_the_sandbox(lake: Catalog):
    lake.write("sources", [
        {"source_id": "d:impl", "dataset_id": "d", "negatives": "implicit",
         "code_map": '{"(absent)": {"value": 0, "meaning": "negative"}}'},
        {"source_id": "d:expl", "dataset_id": "d", "negatives": "explicit"},
    ], stage="ingest", partition="d")
    lake.write("findings", [
        {"source_id": "d:impl", "finding": "Effusion", "shared_finding": "effusion"},
        {"source_id": "d:expl", "finding": "effusion", "shared_finding": "effusion"},
    ], stage="ingest", partition="d")
    lake.write("coverage", [{"image_id": f"d:{i}", "source_id": "d:impl"} for i in range(3)],
               stage="ingest", partition="d")
    lake.write("annotations", [
        {"image_id": "d:0", "source_id": "d:impl", "annotator": "", "finding": "Effusion",
         "value": 1.0, "meaning": "positive"},
        *({"image_id": f"d:{i}", "source_id": "d:expl", "annotator": "", "finding": "effusion",
           "value": 1.0, "meaning": "positive"} for i in range(3)),
    ], stage="ingest", partition="d")
    lake.write("quarantine", [{"stage": "ingest", "dataset_id": "d", "file": "f.csv", "row": 1,
                               "item": "x", "reason": "bad"}], stage="ingest", partition="d")
    dense = lake.sql("SELECT image_id, value, implicit FROM labels_dense "
                     "WHERE source_id = 'd:impl' ORDER BY 1").to_pylist()
    assert dense == [{"image_id": "d:0", "value": 1.0, "implicit": False},
                     {"image_id": "d:1", "value": 0.0, "implicit": True},
                     {"image_id": "d:2", "value": 0.0, "implicit": True}]
    dis = lake.sql("SELECT image_id, n_sources FROM discrepancies ORDER BY 1").to_pylist()
    assert dis == [{"image_id": "d:1", "n_sources": 2}, {"image_id": "d:2", "n_sources": 2}]
    summary = lake.sql("SELECT reason, n_rows FROM quarantine_summary").to_pylist()
    assert summary == [{"reason": "bad", "n_rows": 1}]


# --- 4. broken files -----------------------------------------------------------------------
def _corrupt(good: bytes, kind: str) -> bytes:
    if kind == "zero":
        return b""
    if kind == "junk":
        return b"not a parquet file\n" * 20
    if kind == "truncated":
        return good[: len(good) // 2]
    data = bytearray(good)  # valid magic bytes and footer, garbage where the data pages are
    for i in range(8, min(len(data) - 64, 400)):
        data[i] = 0xA5
    return bytes(data)


@pytest.mark.parametrize("kind, reason", [
    ("zero", "zero bytes"), ("junk", "not a Parquet file"), ("truncated", "truncated"),
    ("pages", ""),
])
def test_broken_file_gives_one_line_naming_it(lake: Catalog, kind: str, reason: str,
                                              tmp_path: Path):
    good = (lake.ws.tables_dir / "images" / "ingest" / "d.parquet").read_bytes()
    bad = lake.ws.tables_dir / "images" / "ingest" / "x.parquet"
    bad.write_bytes(_corrupt(good, kind))
    shown = "lake/tables/images/ingest/x.parquet is not a valid Parquet file"
    attempts = [
        lambda: lake.sql("SELECT * FROM images"),
        lambda: lake.sql("SELECT i.image_id FROM images i JOIN datasets USING (dataset_id)"),
        lambda: lake.query("SELECT * FROM images"),
        lambda: lake.read("images"),
        lambda: lake.read("images", where="dataset_id = 'd'", columns=["image_id"]),
    ]
    for attempt in attempts:
        with pytest.raises(SQLError) as info:
            attempt()
        msg = str(info.value)
        assert isinstance(info.value, BrokenFileError)
        assert msg.startswith(shown), msg
        assert reason in msg and "delete it or re-run the stage that writes images" in msg
        assert "\n" not in msg
        assert not any(p in msg for p in _machine_paths(lake, tmp_path)), msg
    # queries that do not read images are not affected
    assert lake.sql("SELECT count(*) AS n FROM datasets").to_pylist() == [{"n": 1}]
    assert lake.query("SELECT count(*) AS n FROM datasets").item() == 1
    assert lake.read("datasets").height == 1
    assert lake.sql("SELECT count(*) AS n FROM labels_dense").to_pylist() == [{"n": 0}]
    # the command line prints one line
    res = CliRunner().invoke(main, ["sql", "SELECT count(*) FROM images", "-w",
                                    str(lake.ws.root)])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {shown}"), res.output
    res = CliRunner().invoke(main, ["sql", "SELECT count(*) AS n FROM datasets", "-w",
                                    str(lake.ws.root), "--format", "csv"])
    assert res.exit_code == 0 and res.stdout.splitlines() == ["n", "1"]
    bad.unlink()  # what the message says to do
    assert lake.sql("SELECT count(*) AS n FROM images").to_pylist() == [{"n": 3}]


def test_ui_connection_reports_broken_file_in_one_line(lake: Catalog):
    from medlake.ui import cache

    (lake.ws.tables_dir / "images" / "ingest" / "x.parquet").write_bytes(b"")
    with pytest.raises(SQLError, match=r"^lake/tables/images/ingest/x\.parquet is not a valid "
                                       r"Parquet file \(zero bytes\)"):
        cache.query(lake, "SELECT count(*) FROM images")
    assert cache.query(lake, "SELECT count(*) AS n FROM datasets").item() == 1


# --- 5. readers while writers replace files ------------------------------------------------
def test_readers_never_fail_while_a_table_is_rewritten(lake: Catalog):
    """A writer thread replaces one partition (two sizes), publishes and removes another in
    transactions; readers of every kind, in a loop, only ever see a complete state."""
    big, small = 20_000, 5_000
    lake.write("images", _images("b", big), stage="ingest", partition="b")
    frames = {n: conform("images", _images("b", n)) for n in (big, small)}
    extra = _images("c", 300)
    dest = lake.tables.path("images", "ingest", "b")
    stop = threading.Event()
    writes = [0]
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            i = 0
            while not stop.is_set():
                write_parquet_atomic(frames[small if i % 2 else big], dest)
                with lake.transaction() as tx:
                    if i % 2:
                        tx.delete("images", stage="ingest", partition="c")
                    else:
                        tx.write("images", extra, stage="ingest", partition="c")
                i += 1
                writes[0] = i
                stop.wait(0.002)
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(e)

    from medlake.ui import cache

    readers = {
        "sql": lambda: lake.sql("SELECT dataset_id, count(*) AS n FROM images GROUP BY 1")
        .to_pylist(),
        "query": lambda: lake.query("SELECT dataset_id, count(*) AS n FROM images GROUP BY 1")
        .to_dicts(),
        "read": lambda: lake.read("images").group_by("dataset_id").len("n").to_dicts(),
        "read_eq": lambda: [{"dataset_id": "b", "n": lake.read(
            "images", where="dataset_id = 'b'", columns=["image_id"]).height}],
        "ui": lambda: cache.query(
            lake, "SELECT dataset_id, count(*) AS n FROM images GROUP BY 1").to_dicts(),
    }
    seen: dict[str, set] = {k: set() for k in readers}
    th = threading.Thread(target=writer, daemon=True)
    th.start()
    try:
        t0 = time.monotonic()
        rounds = 0
        while ((time.monotonic() - t0 < 5 or writes[0] < 10 or rounds < 3)
               and time.monotonic() - t0 < 120):
            for name, read in readers.items():
                counts = {r["dataset_id"]: r["n"] for r in read()}  # must never raise
                assert counts.get("d", 3) == 3
                assert counts["b"] in (big, small), (name, counts)
                assert counts.get("c", 300) == 300, (name, counts)
                seen[name].add(counts["b"])
            rounds += 1
    finally:
        stop.set()
        th.join(timeout=60)
    assert not failures, failures
    assert writes[0] >= 10 and rounds >= 3


def test_readers_never_fail_during_reviews_compaction(lake: Catalog):
    """Verdict files are added and merged away (files removed) while queries read them."""
    from medlake.catalog import reviews

    stop = threading.Event()
    done = [0]
    failures: list[BaseException] = []

    def reviewer() -> None:
        try:
            i = 0
            while not stop.is_set():
                for _ in range(3):
                    reviews.record(lake, reviews.image_verdict(f"d:{i}", "ok", "ana"))
                    i += 1
                reviews.compact(lake)
                done[0] = i
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(e)

    th = threading.Thread(target=reviewer, daemon=True)
    th.start()
    try:
        t0 = time.monotonic()
        last = 0
        while (time.monotonic() - t0 < 4 or done[0] < 12) and time.monotonic() - t0 < 120:
            n = lake.sql("SELECT count(DISTINCT review_id) AS n FROM reviews").column("n")[0]
            m = lake.query("SELECT count(DISTINCT review_id) AS n FROM reviews").item()
            k = lake.read("reviews", columns=["review_id"])["review_id"].n_unique()
            assert last <= n.as_py() <= m <= k  # verdicts only ever grow
            last = k
    finally:
        stop.set()
        th.join(timeout=60)
    assert not failures, failures
    assert done[0] >= 12
