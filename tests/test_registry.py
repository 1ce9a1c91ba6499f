"""Stages declared once: typed params, generated dvc.yaml / params.yaml / hints / docs, code
dependencies derived from imports (checked with real DVC), one import namespace."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from medlake.catalog import Workspace
from medlake.catalog.params import ParamsError, scalar_fields
from medlake.cli.main import main
from medlake.pipelines import registry
from medlake.pipelines import workspace_pipeline as wp

REPO = Path(__file__).resolve().parents[1]


def _ws(tmp_path: Path, params: dict) -> Workspace:
    root = tmp_path / "ws"
    (root / ".dvc").mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return Workspace(root)


# --- typed params --------------------------------------------------------------------------
def _bad_value(tp):
    return "not-a-number" if tp in (int, float, bool) else 12345


@pytest.mark.parametrize("name", [n for n, s in registry.stages().items() if s.params])
def test_every_block_rejects_unknown_key_and_wrong_type(tmp_path, name) -> None:
    stage = registry.stages()[name]
    good = registry.default_params()[name]
    # an unknown (misspelled) key
    if stage.list_field:
        bad = [{"format": "ham10000", "path": "x.csv", "pathh": "y"}]
        where = "ingest.entries[0].pathh"
    else:
        bad = {**good, "thresold": 1}
        where = f"{name}.thresold"
    ws = _ws(tmp_path, {name: bad})
    with pytest.raises(ParamsError) as e:
        registry.validate(ws)
    assert "params.yaml" in str(e.value) and where in str(e.value) and "unknown key" in str(e.value)
    # a wrong type
    if stage.list_field:
        bad, where = [{"format": "ham10000", "path": 7}], "ingest.entries[0].path"
    else:
        fields = scalar_fields(stage.params)
        if fields:
            f, tp = fields[0]
            bad, where = {**good, f.name: _bad_value(tp)}, f"{name}.{f.name}"
        else:  # only containers (leakage: pairs)
            first = next(iter(good))
            bad, where = {**good, first: "a text, not a mapping"}, f"{name}.{first}"
    shutil.rmtree(tmp_path / "ws")
    ws = _ws(tmp_path, {name: bad})
    with pytest.raises(ParamsError) as e:
        registry.validate(ws)
    msg = str(e.value)
    assert "params.yaml" in msg and where in msg and "found" in msg and "allowed" in msg


def test_out_of_range_and_nested_errors_name_the_key(tmp_path) -> None:
    ws = _ws(tmp_path, {"duplicates": {"ncc": 1.5}})
    with pytest.raises(ParamsError, match=r"duplicates\.ncc: found 1.5 .*between -1 and 1"):
        registry.validate(ws)
    shutil.rmtree(tmp_path / "ws")
    ws = _ws(tmp_path, {"agreement": {"binarise": {"middle_as": "maybe"}}})
    with pytest.raises(ParamsError, match=r"agreement\.binarise\.middle_as: found 'maybe'"):
        registry.validate(ws)
    shutil.rmtree(tmp_path / "ws")
    ws = _ws(tmp_path, {"outlier": {"k": 3}})  # a misspelled block
    with pytest.raises(ParamsError, match=r"outlier: unknown key \(did you mean 'outliers'\?\)"):
        registry.validate(ws)


def test_cli_checks_params_file_and_flags(tmp_path) -> None:
    ws = Workspace.init(tmp_path / "ws", params_text=registry.default_params_yaml())
    (ws.root / "params.yaml").write_text(
        ws.params_file.read_text().replace("outliers: {k: 10", "outliers: {kk: 10"))
    r = CliRunner().invoke(main, ["outliers", "--workspace", str(ws.root)])
    assert r.exit_code == 1 and "params.yaml: outliers.kk: unknown key" in r.output
    (ws.root / "params.yaml").write_text(registry.default_params_yaml())
    r = CliRunner().invoke(main, ["outliers", "--k", "0", "--workspace", str(ws.root)])
    assert r.exit_code == 1 and "outliers.k: found 0" in r.output and ">= 1" in r.output


def test_default_params_yaml_validates_to_the_defaults(tmp_path) -> None:
    root = tmp_path / "ws"
    (root / ".dvc").mkdir(parents=True)
    (root / "params.yaml").write_text(registry.default_params_yaml())
    got = registry.validate(Workspace(root))
    for name, s in registry.stages().items():
        if s.params and s.check_block is None:
            assert got[name] == s.params(), name


def test_repository_params_yaml_is_valid() -> None:
    registry.validate(Workspace(REPO))


# --- generated files -----------------------------------------------------------------------
def test_committed_dvc_yaml_is_the_generated_one() -> None:
    assert (REPO / "dvc.yaml").read_text() == wp.render(Workspace(REPO)), (
        "dvc.yaml differs from the stage declarations: run 'medlake pipeline'")


def test_docs_stage_table_and_params_are_generated() -> None:
    doc = (REPO / "docs/ARCHITECTURE.md").read_text()
    for start, end, text in (("<!-- stages:begin -->", "<!-- stages:end -->", registry.docs_table()),
                             ("<!-- params:begin -->", "<!-- params:end -->", registry.params_doc())):
        body = doc.split(start, 1)[1].split(end, 1)[0].strip()
        assert body == text.strip(), f"docs/ARCHITECTURE.md {start}: regenerate it"


def test_ui_hints_come_from_the_declarations() -> None:
    from medlake.ui.data import HINTS

    assert HINTS == registry.hints()
    assert HINTS["pairs"] == "medlake fingerprint, medlake embed, then medlake duplicates"
    assert HINTS["lineage"].endswith("then medlake materialize RECIPE")
    for t in ("fingerprints", "outliers", "agreement", "leakage", "embeddings", "clusters"):
        assert t in HINTS


def test_code_deps_follow_the_imports() -> None:
    deps = {n: set(wp.code_deps(s.module, REPO)) for n, s in registry.stages().items()}
    assert {"pipelines/verify.py", "catalog/vectors.py", "catalog/paths.py",
            "pipelines/fingerprint.py"} <= deps["duplicates"]
    assert {"pipelines/_agreement_labels.py", "catalog/consensus.py",
            "catalog/stats.py"} <= deps["agreement"]
    adapters = {f"pipelines/adapters/{p.name}" for p in (REPO / "pipelines/adapters").glob("*.py")}
    assert adapters | {"catalog/ingestkit.py", "catalog/tables.py"} <= deps["ingest"]
    assert {"pipelines/leakage.py", "catalog/recipes.py", "catalog/versions.py",
            "catalog/shards.py", "pipelines/export.py"} <= deps["materialize"]
    # a stage does not depend on another stage's module it does not import
    assert "pipelines/agreement.py" not in deps["fingerprint"]
    assert not any(d.startswith("medlake/cli") for d in deps["fingerprint"])


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


def test_touching_each_imported_module_marks_its_stages_changed(tmp_path) -> None:
    """In a copy of this repository, with a lock whose code deps match the files: appending
    a comment to a module marks exactly the stages that import it (DVC's own status)."""
    from dvc.repo import Repo

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    copy = tmp_path / "repo"
    for f in files:
        src = REPO / f
        if src.is_file():
            (copy / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, copy / f)
    (copy / ".dvc").mkdir(exist_ok=True)
    shutil.copy2(REPO / ".dvc/config", copy / ".dvc/config")
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    gen = yaml.safe_load((copy / "dvc.yaml").read_text())["stages"]
    code = {}
    for name, st in gen.items():
        body = st.get("do") or st
        code[name] = [d for d in body.get("deps", []) if d.endswith(".py")]
    recipes = yaml.safe_load((copy / "params.yaml").read_text())["materialize"]["recipes"]
    lock = {"schema": "2.0", "stages": {}}
    addr = {n: [(f"{n}@{r}", r) for r in recipes] if "foreach" in gen[n] else [(n, None)]
            for n in gen}
    for name, names in addr.items():
        body = gen[name].get("do") or gen[name]
        for a, item in names:
            files = [d.replace("${item}", item or "") for d in body.get("deps", [])]
            files = [d for d in files if (copy / d).is_file()]  # code, lock file, recipe
            lock["stages"][a] = {"cmd": "x", "deps": [
                {"path": d, "hash": "md5", "md5": _md5(copy / d), "size": (copy / d).stat().st_size}
                for d in files]}
    (copy / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))

    def modified() -> dict[str, set[str]]:
        with Repo(str(copy)) as repo:
            status = repo.status()
        out: dict[str, set[str]] = {}
        for st, items in status.items():
            for it in items:
                if isinstance(it, dict):
                    for path, what in (it.get("changed deps") or {}).items():
                        if what == "modified":
                            out.setdefault(path, set()).add(st.split(":")[-1].split("@")[0])
        return out

    assert not modified(), "baseline lock should match every code dependency"
    every = sorted({d for ds in code.values() for d in ds})
    assert len(every) > 20
    for f in every:
        p = copy / f
        before = p.read_bytes()
        p.write_bytes(before + b"\n# touched\n")
        try:
            got = modified().get(f, set())
        finally:
            p.write_bytes(before)
        want = {n for n, ds in code.items() if f in ds}
        assert got == want, f"touching {f}: DVC reports {sorted(got)}, expected {sorted(want)}"


# --- user workspaces -------------------------------------------------------------------------
def test_user_stages_are_kept_and_version_is_a_param(tmp_path, monkeypatch) -> None:
    r = CliRunner().invoke(main, ["init", str(tmp_path / "ws")])
    assert r.exit_code == 0, r.output
    ws = Workspace(tmp_path / "ws")
    gen = yaml.safe_load((ws.root / "dvc.yaml").read_text())["stages"]
    assert list(gen) == ["ingest", "fingerprint", "embed", "duplicates", "outliers", "leakage",
                         "agreement"]  # materialize appears with the first recipe
    assert all("medlake_version" in s["params"] for s in gen.values())
    assert not any(d.endswith(".py") for s in gen.values() for d in s.get("deps", []))
    import medlake

    assert ws.params()["medlake_version"] == medlake.__version__
    # a user's own stage, and a user's stage under a generated name, survive regeneration
    doc = yaml.safe_load((ws.root / "dvc.yaml").read_text())
    doc["stages"]["train"] = {"cmd": "python train.py", "deps": ["lake/versions"]}
    doc["stages"]["outliers"] = {"cmd": "python my_outliers.py"}
    (ws.root / "dvc.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    r = CliRunner().invoke(main, ["pipeline", "--workspace", str(ws.root)])
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load((ws.root / "dvc.yaml").read_text())["stages"]
    assert doc["train"] == {"cmd": "python train.py", "deps": ["lake/versions"]}
    assert doc["outliers"] == {"cmd": "python my_outliers.py"}
    assert doc["embed"]["meta"] == {"medlake": "generated"}
    # an upgrade of medlake changes the parameter every generated stage depends on
    monkeypatch.setattr(medlake, "__version__", "99.0.0")
    monkeypatch.setattr(wp, "__version__", "99.0.0")
    r = CliRunner().invoke(main, ["pipeline", "--workspace", str(ws.root)])
    assert r.exit_code == 0, r.output
    assert Workspace(ws.root).params()["medlake_version"] == "99.0.0"


def test_ingest_and_materialize_record_themselves_in_the_pipeline(tmp_path) -> None:
    from medlake.catalog import Catalog
    from medlake.pipelines import materialize
    from medlake.pipelines.ingest import run_stage

    r = CliRunner().invoke(main, ["init", str(tmp_path / "ws")])
    assert r.exit_code == 0, r.output
    ws = Workspace(tmp_path / "ws")
    outside = tmp_path / "elsewhere.csv"
    outside.write_text("x\n")
    entry = wp.ingest_entry(ws, "ham10000", outside, None, {})
    assert entry == {"format": "ham10000", "path": "data/inputs/elsewhere.csv"}
    assert (ws.root / "data/inputs/elsewhere.csv").read_text() == "x\n"
    assert wp.record_ingest(ws, entry) and not wp.record_ingest(ws, entry)  # once
    assert ws.params()["ingest"] == [entry]
    assert "# stage fingerprint" in ws.params_file.read_text()  # comments kept
    wp.refresh(ws)
    deps = yaml.safe_load((ws.root / "dvc.yaml").read_text())["stages"]["ingest"]["deps"]
    assert "data/inputs" in deps
    (ws.root / "recipes/r1.yaml").write_text("dataset: d\nparent: d@s\n")
    assert wp.record_recipe(ws, "r1")
    st = yaml.safe_load((ws.root / "dvc.yaml").read_text())["stages"]["materialize"]
    assert st["foreach"] == "${materialize.recipes}" and "recipes/${item}.yaml" in st["do"]["deps"]
    assert callable(run_stage) and callable(materialize.run_stage)
    assert Catalog(ws).ws.params()["materialize"]["recipes"] == ["r1"]


def test_installed_names_live_under_medlake(tmp_path) -> None:
    """From outside the repository only 'medlake' imports; nothing generic is top level."""
    code = ("import importlib.util as u, medlake.catalog, medlake.pipelines, medlake.ui, "
            "medlake.cli.main, medlake.demo.synthetic\n"
            "print([n for n in ('catalog', 'pipelines', 'ui', 'cli', 'demo') if u.find_spec(n)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ""}, check=True)
    assert out.stdout.strip() == "[]"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'medlake = "medlake.cli.main:main"' in pyproject
    # product code never imports the demo code
    for folder in ("catalog", "pipelines", "ui", "medlake"):
        for f in (REPO / folder).rglob("*.py"):
            if folder == "medlake" and f.name in ("demo.py", "synth.py"):
                continue  # the 'medlake demo' / 'medlake synth' commands
            text = f.read_text()
            assert "from medlake.demo" not in text and "import medlake.demo" not in text, f
