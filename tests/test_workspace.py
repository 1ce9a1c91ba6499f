"""`medlake init`: a real git + DVC workspace; re-running destroys nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from medlake.catalog import Workspace, WorkspaceError
from medlake.cli.main import main


def test_init_creates_git_dvc_remote_and_folders(tmp_path):
    res = CliRunner().invoke(main, ["init", str(tmp_path / "ws")])
    assert res.exit_code == 0, res.output
    root = tmp_path / "ws"
    for p in (".git", ".dvc", "data", "lake", "recipes", "dvc.yaml", "params.yaml", "findings.yaml"):
        assert (root / p).exists(), p
    from configobj import ConfigObj  # DVC's own config format

    cfg = ConfigObj(str(root / ".dvc" / "config"))
    assert cfg["core"]["remote"] == "local"
    url = cfg['remote "local"']["url"]
    # absolute (or ~/...): a relative remote resolves against each clone's .dvc/ folder
    import os

    assert os.path.isabs(os.path.expanduser(url))
    assert Path(os.path.expanduser(url)).resolve() == (tmp_path / "ws-dvc-remote").resolve()
    assert (tmp_path / "ws-dvc-remote").is_dir()


def test_init_twice_keeps_user_files(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    ws.params_file.write_text("custom: 1\n")
    (ws.data_dir / "mine.csv").write_text("a\n1\n")
    (ws.lake / "keep.txt").write_text("x")
    Workspace.init(tmp_path / "ws")
    assert ws.params_file.read_text() == "custom: 1\n"
    assert (ws.data_dir / "mine.csv").exists() and (ws.lake / "keep.txt").exists()


def test_init_with_given_remote(tmp_path):
    ws = Workspace.init(tmp_path / "ws", remote=str(tmp_path / "elsewhere"))
    cfg = (ws.root / ".dvc" / "config").read_text()
    assert "elsewhere" in cfg


def test_find_walks_up_and_explains_when_missing(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    deep = ws.root / "data" / "a" / "b"
    deep.mkdir(parents=True)
    assert Workspace.find(deep).root == ws.root
    with pytest.raises(WorkspaceError, match="medlake init"):
        Workspace.find(tmp_path)


def test_commands_take_workspace_option():
    """Every command except init accepts --workspace."""
    for name, cmd in main.commands.items():
        if name == "init":
            continue
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        assert "--workspace" in opts, f"medlake {name} lacks --workspace"


def test_missing_workspace_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["sql", "SELECT 1"])
    assert res.exit_code == 1
    assert "no medlake workspace" in res.output and "medlake init" in res.output
