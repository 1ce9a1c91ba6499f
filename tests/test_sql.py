"""`medlake sql`: views over every table, read-only, sandboxed to the lake."""

from __future__ import annotations

import polars as pl
import pytest
from click.testing import CliRunner

from medlake.catalog import Catalog, SQLError
from medlake.catalog.schema import TABLES
from medlake.cli.main import main


@pytest.fixture
def filled(catalog: Catalog) -> Catalog:
    catalog.write("images", pl.DataFrame({
        "image_id": ["d:1", "d:2", "d:3"], "dataset_id": ["d"] * 3, "group_id": ["g1", "g1", "g2"],
    }), stage="ingest", partition="d")
    return catalog


def test_every_table_is_queryable_even_when_empty(catalog: Catalog):
    for name, ts in TABLES.items():
        at = catalog.sql(f"SELECT * FROM {name}")
        assert at.num_rows == 0
        assert at.column_names == ts.schema.names


def test_query_returns_rows(filled: Catalog):
    at = filled.sql("SELECT group_id, count(*) AS n FROM images GROUP BY 1 ORDER BY 1")
    assert at.to_pylist() == [{"group_id": "g1", "n": 2}, {"group_id": "g2", "n": 1}]


@pytest.mark.parametrize("query, words", [
    ("SELECT * FROM read_csv('/etc/passwd')", "disabled"),
    ("SELECT * FROM read_text('/etc/hostname')", "disabled"),
    ("COPY (SELECT 1) TO 'lake/out.csv'", "only read queries"),
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO 'lake/out.csv'", "only read queries"),
    ("COPY images TO '/srv/medlake-leak.csv'", "only read queries"),
    ("CREATE TABLE t AS SELECT 1", "only read queries"),
    ("ATTACH 'x.db'", "only read queries"),
    ("INSTALL httpfs", "only read queries"),
    ("SET enable_external_access = true", "only read queries"),
    ("SELECT 1; COPY (SELECT 1) TO 'x.csv'", "only read queries"),
])
def test_sandbox_refuses_files_and_writes(filled: Catalog, query, words, tmp_path):
    with pytest.raises(SQLError, match=words):
        filled.sql(query)
    assert not (filled.ws.lake / "out.csv").exists()


def test_cli_sql_formats_and_errors(filled: Catalog):
    r = CliRunner()
    ws = str(filled.ws.root)
    res = r.invoke(main, ["sql", "SELECT image_id FROM images ORDER BY 1", "-w", ws, "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == ["image_id", "d:1", "d:2", "d:3"]
    res = r.invoke(main, ["sql", "SELECT count(*) AS n FROM images", "-w", ws, "--format", "json"])
    assert res.output.strip() == '{"n":3}'
    res = r.invoke(main, ["sql", "SELECT * FROM read_csv('/etc/passwd')", "-w", ws])
    assert res.exit_code == 1
    assert "Error:" in res.output and "disabled" in res.output
    assert "Traceback" not in res.output
    res = r.invoke(main, ["sql", "SELEC nonsense", "-w", ws])
    assert res.exit_code == 1 and "parse" in res.output
