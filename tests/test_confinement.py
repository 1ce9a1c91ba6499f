"""Paths from recipes and params.yaml stay inside the workspace and real_data; credentials
never reach the committed DVC config (issue #13)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from medlake.catalog import Catalog, CatalogError, Workspace
from medlake.catalog.recipes import RecipeError, resolve_path
from medlake.cli.main import main


@pytest.fixture()
def roots(tmp_path):
    ws, real = tmp_path / "ws", tmp_path / "real"
    (ws / "data").mkdir(parents=True)
    real.mkdir()
    (ws / "data/pairs.csv").write_text("a\n")
    (real / "r.csv").write_text("a\n")
    (tmp_path / "outside.csv").write_text("secret\n")
    return ws, real


@pytest.mark.parametrize("raw", ["/etc/passwd", "../outside.csv", "data/../../outside.csv",
                                 "real:../outside.csv", "real:/etc/passwd"])
def test_paths_leaving_the_roots_are_refused(roots, raw) -> None:
    ws, real = roots
    with pytest.raises(RecipeError) as e:
        resolve_path(raw, ws_root=ws, real_data=real, key="drop_outliers.list")
    msg = str(e.value)
    assert msg.startswith("drop_outliers.list: ") and repr(raw) in msg
    assert "absolute" in msg or "outside" in msg


def test_symlink_leaving_the_workspace_is_refused(roots, tmp_path) -> None:
    ws, real = roots
    os.symlink(tmp_path / "outside.csv", ws / "data/link.csv")
    with pytest.raises(RecipeError, match="outside the workspace"):
        resolve_path("data/link.csv", ws_root=ws, real_data=real)


def test_paths_inside_are_resolved(roots) -> None:
    ws, real = roots
    assert resolve_path("data/pairs.csv", ws_root=ws, real_data=real) == (ws / "data/pairs.csv").resolve()
    assert resolve_path("real:r.csv", ws_root=ws, real_data=real) == (real / "r.csv").resolve()


def test_recipe_list_outside_is_an_error_not_a_quarantine_row(tmp_path) -> None:
    """The audit's case: a drop_outliers list pointing at /etc/passwd went into quarantine."""
    from versions_helpers import build_toy, write_recipe

    from medlake.pipelines import materialize

    ws = Workspace.init(tmp_path / "ws")
    cat = Catalog(ws)
    build_toy(cat)
    write_recipe(cat, "evil", "dataset: toy\nparent: toy@orig\nrules:\n"
                              "  - drop_outliers: {list: /etc/passwd}\n")
    with pytest.raises(RecipeError, match="absolute paths are not allowed"):
        materialize.run(cat, "evil")
    assert not (ws.versions_dir / "evil").exists()
    assert not cat.tables.files("quarantine", stage="materialize")


def test_params_paths_are_confined(tmp_path) -> None:
    from medlake.pipelines import ingest

    ws = Workspace.init(tmp_path / "ws")
    (tmp_path / "x.csv").write_text("a\n")
    ws.params_file.write_text(yaml.safe_dump({"ingest": [{"format": "ham10000",
                                                          "path": "../x.csv"}]}))
    with pytest.raises(CatalogError, match=r"ingest\[0\]\.path.*outside the workspace"):
        ingest.plan(Catalog(ws))


@pytest.mark.parametrize("args", [
    ["--remote", "s3://bucket/p", "--endpoint-url", "http://KEY:SECRET@127.0.0.1:9000"],
    ["--remote", "https://user:pw@example.org/dvc"],
])
def test_init_refuses_credentials_in_urls(tmp_path, args) -> None:
    r = CliRunner().invoke(main, ["init", str(tmp_path / "ws"), *args])
    assert r.exit_code == 1 and "carries credentials" in r.output
    assert "KEY:SECRET" not in r.output and "user:pw" not in r.output
    cfg = tmp_path / "ws/.dvc/config"
    assert not cfg.exists() or ("KEY:SECRET" not in cfg.read_text() and "user:pw" not in cfg.read_text())


def test_default_remote_resolves_the_same_from_a_clone_elsewhere(tmp_path) -> None:
    """The committed remote is absolute, so DVC in a clone anywhere finds the same folder."""
    import subprocess

    from dvc.repo import Repo

    r = CliRunner().invoke(main, ["init", str(tmp_path / "a/ws")])
    assert r.exit_code == 0, r.output
    src = tmp_path / "a/ws"
    for k, v in (("user.email", "t@e.org"), ("user.name", "t")):
        subprocess.run(["git", "config", k, v], cwd=src, check=True)
    subprocess.run(["git", "add", "-A"], cwd=src, check=True)
    subprocess.run(["git", "commit", "-qm", "x"], cwd=src, check=True)
    clone = tmp_path / "elsewhere/deeper/clone"
    clone.parent.mkdir(parents=True)
    subprocess.run(["git", "clone", "-q", str(src), str(clone)], check=True)
    want = (tmp_path / "a/ws-dvc-remote").resolve()
    for root in (src, clone):
        with Repo(str(root)) as repo:
            url = repo.config["remote"]["local"]["url"]
        assert Path(os.path.expanduser(url)).resolve() == want


def _full(root: Path, rel: str) -> Path | str:
    """The reference: the whole path resolved at once (what resolve_inside did per path)."""
    base = root.resolve()
    try:
        target = (base / rel.strip().replace("\\", "/")).resolve()
    except RuntimeError:  # a symlink loop
        return "loop"
    return target if target == base or base in target.parents else "outside"


def test_folder_cached_resolver_equals_resolving_each_path(tmp_path) -> None:
    """InsideResolver (each folder resolved once, then one lstat per file) gives what
    resolving every whole path gives, over symlinked folders and files, '..', missing
    files and links that leave the root, in any order of calls."""
    from medlake.catalog.imageio import ImageReadError, InsideResolver

    root, out = tmp_path / "root", tmp_path / "out"
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    out.mkdir()
    for f in ("a/x.png", "a/b/y.png", "c/z.png"):
        (root / f).write_bytes(b"x")
    (out / "secret.png").write_bytes(b"s")
    (root / "inlink").symlink_to(root / "a" / "b")          # folder link staying inside
    (root / "outlink").symlink_to(out)                      # folder link leaving
    (root / "a" / "f.png").symlink_to(root / "c" / "z.png")  # file link staying inside
    (root / "a" / "g.png").symlink_to(out / "secret.png")   # file link leaving
    (root / "a" / "up").symlink_to("..")                    # relative link back up
    (root / "a" / "loop").symlink_to(root / "a" / "loop2")
    (root / "a" / "loop2").symlink_to(root / "a" / "loop")
    rels = ["a/x.png", "a/b/y.png", "inlink/y.png", "inlink/../x.png", "outlink/secret.png",
            "a/f.png", "a/g.png", "a/up/c/z.png", "a/up/../out/secret.png", "a/missing.png",
            "missing/dir/m.png", "a/b/../../c/z.png", "a/b/../../../out/secret.png", "a/.",
            "a/..", "a/b/", "./a/x.png", "a//x.png", "a\\b\\y.png", " c/z.png ", "a/up/up/x.png",
            "inlink/..", "a/loop/x.png", "a/loop"]
    resolver = InsideResolver(root)
    for order in (rels, rels[::-1]):
        resolver = InsideResolver(root)  # a fresh cache for each order of calls
        for rel in order:
            want = _full(root, rel)
            try:
                got: Path | str = resolver(rel)
            except ImageReadError as e:
                assert (want, e.reason) in (("outside", "path resolves outside the images root"),
                                            ("loop", "unresolvable path")), rel
                continue
            assert got == want, rel
    for bad in ("", "  ", "/etc/passwd", "C:/x.png"):
        with pytest.raises(ImageReadError):
            resolver(bad)
