"""A workspace: a git + DVC repository holding raw data, the lake and recipes.

Layout::

    <root>/
      .dvc/ .git/ dvc.yaml params.yaml findings.yaml data/ recipes/
      lake/tables/<table>/<stage>/<partition>.parquet
      lake/vectors/            LanceDB tables
      lake/versions/<name>/    materialised dataset versions
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medlake.catalog.errors import WorkspaceError

log = logging.getLogger(__name__)

DEFAULT_PARAMS: dict[str, Any] = {
    "real_data": "../shared/data",
}

GITIGNORE_LINES = ["/data/", "/lake/", "/.venv/", "__pycache__/"]

# leftovers of a writer killed mid-write (removed by the next medlake process, see
# catalog/tables.py: recover) must never be hashed into a DVC output
DVCIGNORE_LINES = [
    "# medlake: temporary files of writers in progress, leftovers of a killed run",
    ".*.tmp",
    ".*.tmp-*",
    ".*.old-*",
    ".journal/",
    "*.intent",
]


@dataclass(frozen=True)
class Workspace:
    """Paths of one workspace. Create with :meth:`find` or :meth:`init`."""

    root: Path

    # --- paths ------------------------------------------------------------------------------
    @property
    def lake(self) -> Path:
        return self.root / "lake"

    @property
    def tables_dir(self) -> Path:
        return self.lake / "tables"

    @property
    def vectors_dir(self) -> Path:
        return self.lake / "vectors"

    @property
    def versions_dir(self) -> Path:
        return self.lake / "versions"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def recipes_dir(self) -> Path:
        return self.root / "recipes"

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def findings_file(self) -> Path:
        return self.root / "findings.yaml"

    # --- settings ---------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """``params.yaml`` as a dict (empty when the file is absent)."""
        if not self.params_file.exists():
            return {}
        try:
            data = yaml.safe_load(self.params_file.read_text()) or {}
        except yaml.YAMLError as e:
            raise WorkspaceError(f"{self.params_file}: not valid YAML ({e}); fix or delete it") from e
        if not isinstance(data, dict):
            raise WorkspaceError(f"{self.params_file}: expected a mapping at the top level")
        return data

    def param(self, dotted: str, default: Any = None) -> Any:
        """One value of ``params.yaml`` by dotted key, e.g. ``duplicates.threshold``."""
        cur: Any = self.params()
        for part in dotted.split("."):
            if not isinstance(cur, dict) or part not in cur:
                return default
            cur = cur[part]
        return cur

    def real_data_dir(self) -> Path | None:
        """Folder of the public metadata files, from ``MEDLAKE_REAL_DATA`` or ``params.yaml``.

        Returns None when it does not exist (real-data steps are then skipped, with a message).
        """
        raw = os.environ.get("MEDLAKE_REAL_DATA") or self.param("real_data") or ""
        if not raw:
            return None
        p = Path(raw)
        if not p.is_absolute():
            p = self.root / p
        return p.resolve() if p.is_dir() else None

    def relpath(self, p: Path | str) -> str:
        """``p`` relative to the workspace root where possible (for messages and tables)."""
        p = Path(p)
        try:
            return str(p.resolve().relative_to(self.root))
        except ValueError:
            return os.path.relpath(p.resolve(), self.root)

    # --- finding and creating ---------------------------------------------------------------
    @classmethod
    def find(cls, start: Path | str | None = None) -> Workspace:
        """The nearest folder at or above ``start`` (default: cwd) that holds ``.dvc/``.

        Raises
        ------
        WorkspaceError
            When no parent folder is a DVC repository.
        """
        here = Path(start or Path.cwd()).resolve()
        if start is not None and not here.is_dir():
            raise WorkspaceError(f"--workspace {start}: no such folder; give the folder of a "
                                 f"workspace, or create one with 'medlake init {start}'")
        for cand in (here, *here.parents):
            if (cand / ".dvc").is_dir():
                return cls(cand)
        if start is not None:
            raise WorkspaceError(f"--workspace {start}: not a medlake workspace (no .dvc/ folder "
                                 f"at or above it); create one with 'medlake init {start}'")
        raise WorkspaceError(
            f"no medlake workspace at or above {here} (no .dvc/ folder found); "
            "run 'medlake init DIR' to create one, or pass --workspace DIR"
        )

    @classmethod
    def init(cls, root: Path | str, *, remote: str | None = None,
             params_text: str | None = None) -> Workspace:
        """Create a workspace at ``root`` or complete an existing one without destroying anything.

        Runs ``git init`` and ``dvc init`` where they are missing, adds a default local DVC
        remote (``<root>/../<name>-dvc-remote`` unless ``remote`` is given, stored as an
        absolute path so that every clone, in any folder, finds the same remote), writes
        ``params.yaml`` (``params_text``, else the minimal settings) and ``findings.yaml``
        only when absent, adds medlake's temporary-file patterns to ``.dvcignore``
        (:data:`DVCIGNORE_LINES`), and creates ``data/``, ``lake/`` and ``recipes/``. The pipeline
        (``dvc.yaml``) is written by the caller (``medlake init`` generates it).

        Example
        -------
        >>> ws = Workspace.init(tmp_path / "ws")  # doctest: +SKIP
        """
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        for exe in ("git", "dvc"):
            if shutil.which(exe) is None and not (exe == "dvc" and _dvc_exe()):
                raise WorkspaceError(f"'{exe}' is not on PATH; install it (it comes with medlake's venv)")
        if not (root / ".git").exists():
            _run(["git", "init", "-q"], root)
        if not (root / ".dvc").exists():
            _run([*_dvc_exe(), "init", "-q"], root)
            _run([*_dvc_exe(), "config", "core.autostage", "true"], root)
        ws = cls(root)
        for d in (ws.data_dir, ws.lake, ws.recipes_dir):
            d.mkdir(exist_ok=True)
        if not ws.params_file.exists():
            ws.params_file.write_text(params_text or yaml.safe_dump(DEFAULT_PARAMS, sort_keys=False))
        if not ws.findings_file.exists():
            from medlake.catalog.vocab import default_findings_yaml

            ws.findings_file.write_text(default_findings_yaml())
        gi = root / ".gitignore"
        have = gi.read_text().splitlines() if gi.exists() else []
        missing = [ln for ln in GITIGNORE_LINES if ln not in have]
        if missing:
            gi.write_text("\n".join([*have, *missing]) + "\n")
        write_dvcignore(root)
        if not _dvc_has_remote(root):
            from medlake.catalog.storage import refuse_credentials

            url = remote or str(root.parent / f"{root.name}-dvc-remote")
            refuse_credentials(url, "--remote")
            if "://" not in url:
                Path(url).expanduser().mkdir(parents=True, exist_ok=True)
                # absolute (DVC resolves a relative remote against .dvc/ of each clone, so a
                # clone elsewhere, or DVC's temporary clone for 'dvc import', would miss it);
                # a path under the home folder is kept as ~/..., the same for every user
                full = Path(url).expanduser().resolve()
                home = Path.home().resolve()
                url = ("~/" + full.relative_to(home).as_posix()) if full.is_relative_to(home) \
                    else full.as_posix()
            _run([*_dvc_exe(), "remote", "add", "-d", "local", url], root)
        return ws


def write_dvcignore(root: Path) -> None:
    """Add :data:`DVCIGNORE_LINES` that ``<root>/.dvcignore`` lacks (the others are kept)."""
    path = Path(root) / ".dvcignore"
    have = path.read_text().splitlines() if path.exists() else []
    missing = [ln for ln in DVCIGNORE_LINES if ln not in have]
    if missing:
        path.write_text("\n".join([*have, *missing]) + "\n")


def _dvc_exe() -> list[str]:
    """The ``dvc`` of this Python environment (the venv's), else the one on PATH."""
    import sys

    cand = Path(sys.executable).parent / "dvc"
    if cand.exists():
        return [str(cand)]
    found = shutil.which("dvc")
    return [found] if found else []


def _dvc_has_remote(root: Path) -> bool:
    out = subprocess.run(
        [*_dvc_exe(), "remote", "list"], cwd=root, capture_output=True, text=True, check=False
    )
    return bool(out.stdout.strip())


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise WorkspaceError(
            f"'{' '.join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd))}' failed "
            f"(exit {res.returncode}) in {cwd}:\n{(res.stdout + res.stderr).strip()[-4000:]}"
        )
    return res.stdout


def run_dvc(args: list[str], cwd: Path, *, env: dict[str, str] | None = None) -> str:
    """Run this environment's ``dvc ARGS`` in ``cwd``; :class:`WorkspaceError` with its output."""
    exe = _dvc_exe()
    if not exe:
        raise WorkspaceError("'dvc' is not installed in this environment (it comes with medlake)")
    return _run([*exe, *args], cwd, env)
